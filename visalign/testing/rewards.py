"""Tiny offline reward models for tests, notebooks and benchmarks.

Everything is built from configs with random weights (seeded) and offline tokenizers, in eval
mode; nothing is downloaded. Building any of them takes well under a second.

    from visalign.testing.rewards import tiny_clip, tiny_aesthetic, tiny_vlm
    model, processor = tiny_clip()                      # CLIPModel + CLIPProcessor, 32 px
    model, processor = tiny_clip(trained=True)          # + a few seconds of contrastive training
                                                        #   on colour swatches: "red" > "blue" etc.
    reward = va.rewards.CLIPScore(model, processor)

- :func:`tiny_clip` / :func:`tiny_clip_tokenizer`: CLIP with 1-layer towers, byte-level BPE.
- :func:`tiny_aesthetic`: an :class:`~visalign.rewards.AestheticMLP` sized for the tiny CLIP.
- :func:`tiny_vlm` / :func:`tiny_vlm_tokenizer`: LLaVA (tiny CLIP vision tower + 1-layer Llama) and
  its processor, with a chat template and single-token "yes"/"Yes"/" yes"/... answers.
- :func:`tiny_open_clip`: an open_clip ``CLIP`` for HPSv2 tests (needs the ``openclip`` extra).
- :func:`color_images`: solid-colour image batches for constructed test cases.
- :func:`brightness`: the mean pixel value, a differentiable plain-callable reward any tiny model can move
  (defined in :mod:`visalign.rewards.simple`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from visalign.pipelines.tokenizers import word_clip_tokenizer
from visalign.rewards.simple import brightness  # re-exported: the runtime reward, public here too

__all__ = [
    "COLORS",
    "brightness",
    "color_images",
    "tiny_clip_tokenizer",
    "tiny_clip",
    "train_tiny_clip",
    "tiny_aesthetic",
    "tiny_vlm_tokenizer",
    "tiny_vlm",
    "tiny_open_clip",
    "TINY_VLM_CHAT_TEMPLATE",
]


# Swatches for color_images and the tiny CLIP (black and white too); not the toy world's palette, toy.world.COLORS.
COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.9, 0.9, 0.1),
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
}

_CLIP_WORDS = (
    "a",
    "an",
    "the",
    "photo",
    "depicts",
    "image",
    "of",
    "picture",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "cat",
    "dog",
    "square",
    "circle",
    "cube",
)


def color_images(
    colors: Sequence[str], size: int | tuple[int, int] = 32, noise: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """A (len(colors), 3, H, W) batch of solid images in [0, 1], optionally with pixel noise.

    Args:
        colors: names from :data:`COLORS`.
        size: H = W, or (H, W).
        noise: the std of Gaussian noise added (then clamped to [0, 1]).
        seed: seeds the noise.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rgb = torch.tensor([COLORS[c] for c in colors], dtype=torch.float32)
    x = rgb[:, :, None, None].expand(-1, 3, h, w).clone()
    if noise:
        g = torch.Generator().manual_seed(seed)
        x = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x


def tiny_clip_tokenizer(words: Sequence[str] = _CLIP_WORDS, model_max_length: int = 77):
    """An offline ``CLIPTokenizer`` in which each of ``words`` is one token; any other text still
    tokenizes (byte by byte). Survives save/load_pretrained.
    """
    return word_clip_tokenizer(words, model_max_length)


def _image_processor(size: int):
    """A CLIP image processor at ``size`` px that needs no torchvision."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_clip(
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    projection_dim: int = 16,
    trained: bool = False,
    steps: int = 60,
):
    """A tiny ``CLIPModel`` (1-layer text and vision towers) and its ``CLIPProcessor``.

    Args:
        seed: seeds the random weights.
        image_size, patch_size, hidden_size, projection_dim: the architecture.
        trained: also run :func:`train_tiny_clip` (about a second), so that colour words match
            colour swatches: CLIPScore(red image, "red") > CLIPScore(red image, "blue").
        steps: training steps when ``trained``.

    Returns:
        `(CLIPModel, CLIPProcessor)`, the model in eval mode.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=_image_processor(image_size), tokenizer=tokenizer)
    if trained:
        train_tiny_clip(model, processor, steps=steps, seed=seed)
    return model, processor


def train_tiny_clip(
    model,
    processor,
    *,
    steps: int = 60,
    lr: float = 3e-3,
    seed: int = 0,
    colors: Sequence[str] = ("red", "green", "blue", "yellow"),
):
    """A few steps of CLIP's contrastive loss on noisy colour swatches vs ``"a photo of {colour}"``.

    Leaves the model in eval mode; returns it. Deterministic for a given seed. Runs on one CPU
    thread (restored afterwards): for a model this small, more threads only add contention.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, processor, steps, lr, seed, colors)
    finally:
        torch.set_num_threads(threads)


def _train(model, processor, steps, lr, seed, colors):
    from visalign.rewards.preprocess import ImageTransform

    transform = ImageTransform.from_processor(processor.image_processor)
    tokens = processor.tokenizer([f"a photo of {c}" for c in colors], padding=True, return_tensors="pt")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels = torch.arange(len(colors))
    model.train()
    for step in range(steps):
        images = color_images(colors, model.config.vision_config.image_size, noise=0.05, seed=seed * 1000 + step)
        out = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=transform(images)
        )
        loss = (
            torch.nn.functional.cross_entropy(out.logits_per_image, labels)
            + torch.nn.functional.cross_entropy(out.logits_per_text, labels)
        ) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_aesthetic(seed: int = 0, *, projection_dim: int = 16):
    """An :class:`~visalign.rewards.AestheticMLP` and a tiny CLIP to feed it.

    Returns:
        `(AestheticMLP, CLIPModel, CLIPProcessor)`; the MLP takes ``projection_dim`` inputs.
    """
    from visalign.rewards.aesthetic import AestheticMLP

    model, processor = tiny_clip(seed, projection_dim=projection_dim)
    torch.manual_seed(seed + 1)
    return AestheticMLP(projection_dim).eval(), model, processor


_VLM_WORDS = (
    "yes no does this image show a the red green blue yellow cat dog square circle "
    "please answer or is better than first second reference candidate photo prompt "
    "both generated for judge how well each matches its visual quality and "
    "plausibility user assistant"
).split()

TINY_VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@lru_cache(maxsize=1)
def _vlm_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = list(_VLM_WORDS) + [w.capitalize() for w in _VLM_WORDS] + ["YES", "NO"]
    corpus = []
    for w in words:  # each word at a line start (no space) and after a space ("Ġ" form)
        corpus += [w, f"a {w}", f"{w} {w}"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
    )
    tok.train_from_iterator(corpus * 2, trainer=trainer)
    return tok.to_str()


def tiny_vlm_tokenizer():
    """An offline byte-level BPE tokenizer in which "yes", " yes", "Yes", " Yes", "YES" (and the
    same for "no") are each one token. Deterministic.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_vlm_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=4096,
    )


def tiny_vlm(seed: int = 0, *, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32):
    """A tiny ``LlavaForConditionalGeneration`` (1-layer CLIP vision tower, 1-layer Llama) and its
    ``LlavaProcessor`` (CLIP image processor, :func:`tiny_vlm_tokenizer`, a simple chat template).

    Returns:
        `(LlavaForConditionalGeneration, LlavaProcessor)`, the model in eval mode.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_vlm_tokenizer()
    processor = LlavaProcessor(
        image_processor=_image_processor(image_size),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_VLM_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


def tiny_open_clip(seed: int = 0, *, image_size: int = 32, width: int = 32, embed_dim: int = 16):
    """A tiny open_clip ``CLIP`` (1-layer towers) and open_clip's offline tokenizer.

    Needs the ``openclip`` extra (raises :class:`~visalign.errors.MissingDependencyError`).

    Returns:
        `(open_clip.CLIP, tokenizer)`, the model in eval mode.
    """
    from visalign.errors import require

    open_clip = require("open_clip", "openclip", "tiny_open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=1, width=width, head_width=16, patch_size=8, image_size=image_size, mlp_ratio=2.0
        ),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=2, layers=1, mlp_ratio=2.0),
    ).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")
