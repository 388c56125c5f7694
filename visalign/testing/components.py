"""The building blocks of the tiny pipelines: component recipes and the tiny shared components.

A family's spec (see :mod:`visalign.testing.image_families` and
:mod:`visalign.testing.video_families`) maps each constructor argument of its stock pipeline to a
:class:`_Recipe` (a builder and its config, which ``tiny_pipeline``'s dict overrides update) or to
a ready value. This module holds what several families share: the text and image encoder widths,
the tiny CLIP / T5 text towers and their tokenizer pairs, the 2D ``AutoencoderKL``, the tiny CLIP
vision tower and image processor, and the flow-matching scheduler config. Every builder is called
with the RNG already seeded (:func:`visalign.testing.pipelines.tiny_pipeline` seeds each component
separately).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from diffusers import AutoencoderKL
from transformers import ProcessorMixin, Qwen2VLProcessor  # noqa: F401  (ProcessorMixin: see QwenVLImageProcessor)

from visalign.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

# Widths shared between components; the denoisers' text dimensions are derived from these.
_CLIP_DIM = 32  # hidden size and projection size of every tiny CLIP tower
_T5_DIM = 64  # d_model of the tiny T5/UMT5; SD3 needs >= the two CLIP widths concatenated
_IMAGE_SIZE = 32  # native size of the tiny CLIP vision tower (Wan I2V)

_FLOW_SHIFT_3 = dict(num_train_timesteps=1000, shift=3.0)  # SD3 and Wan 480p


@dataclass(frozen=True)
class _Recipe:
    """How to build one component: ``build(**config)``. A dict override updates ``config``."""

    build: Callable[..., Any]
    config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Component builders (called with the RNG already seeded)
# ---------------------------------------------------------------------------------------------


def _clip_text_encoder(with_projection: bool = False, **config):
    """A 2-layer CLIP text tower; ``with_projection`` gives ``CLIPTextModelWithProjection``.

    Two layers, because SDXL and SD3 read the penultimate hidden state.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()  # ~1 ms; gives the vocabulary size and special ids
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": _CLIP_DIM,
        "intermediate_size": 2 * _CLIP_DIM,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        # 77 positions as in real CLIP, so the tokenizer's padded length can be raised up to 77.
        "max_position_embeddings": 77,
        "projection_dim": _CLIP_DIM,
        # The pooled output is taken at the first eos token; CLIP finds it through eos_token_id.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config,
    }
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(CLIPTextConfig(**config))


def _t5_encoder(umt5: bool = False, **config):
    """A 2-layer T5 v1.1-style encoder (``umt5=True``: ``UMT5EncoderModel``, as Wan uses)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = {
        "vocab_size": len(tiny_t5_tokenizer()),
        "d_model": _T5_DIM,
        "d_kv": 16,
        "d_ff": 2 * _T5_DIM,
        "num_layers": 2,
        "num_heads": 4,
        # Relative position buckets handle any length, so stock 256/512-token calls work.
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        **config,
    }
    if umt5:
        return UMT5EncoderModel(UMT5Config(**config))
    return T5EncoderModel(T5Config(**config))


def _autoencoder_kl(**config):
    """A 2-block ``AutoencoderKL``: scale factor 2, so 32 px images are 16x16 latents."""
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "sample_size": 32,
        **config,
    }
    return AutoencoderKL(**config)


def _clip_vision_encoder(with_projection: bool = False, **config):
    """A tiny CLIP vision tower for Wan 2.1 I2V, which reads its penultimate hidden state.

    ``CLIPVisionModel`` by default, the class ``WanImageToVideoPipeline`` declares (another class
    makes ``from_pretrained`` warn about the type); ``with_projection=True`` gives
    ``CLIPVisionModelWithProjection``, whose hidden states are the same.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    config = {
        "hidden_size": _CLIP_DIM,
        "intermediate_size": 2 * _CLIP_DIM,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": _IMAGE_SIZE,
        "patch_size": 8,
        "projection_dim": _CLIP_DIM,
        **config,
    }
    model_cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    return model_cls(CLIPVisionConfig(**config))


def _clip_image_processor(**config):
    """A CLIP image processor that resizes to the tiny vision tower's input size.

    Without torchvision, transformers 5's ``CLIPImageProcessor`` falls back to the PIL backend with
    a warning; asking for the PIL class directly gives the same processor, silently.
    """
    import transformers

    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    config = {
        "size": {"shortest_edge": _IMAGE_SIZE},
        "crop_size": {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        **config,
    }
    return processor_cls(**config)


# ---------------------------------------------------------------------------------------------
# Recipes of component groups, under the naming scheme of the diffusers pipelines
# ---------------------------------------------------------------------------------------------


def _clip_text(name: str, with_projection: bool) -> dict[str, _Recipe]:
    """The tokenizer + text encoder pair of one CLIP tower, under SD's naming scheme."""
    suffix = name.removeprefix("text_encoder")
    return {
        f"tokenizer{suffix}": _Recipe(tiny_clip_tokenizer),
        name: _Recipe(_clip_text_encoder, {"with_projection": with_projection}),
    }


def _t5_text(name: str, umt5: bool = False) -> dict[str, _Recipe]:
    """The tokenizer + text encoder pair of a T5 tower (``umt5=True``: Wan's UMT5)."""
    suffix = name.removeprefix("text_encoder")
    return {
        f"tokenizer{suffix}": _Recipe(tiny_t5_tokenizer),
        name: _Recipe(_t5_encoder, {"umt5": True} if umt5 else {}),
    }


def _latent16_vae(scaling_factor: float, shift_factor: float) -> _Recipe:
    """The 16-channel ``AutoencoderKL`` without quant convs of SD3 and Flux, with its latent stats."""
    return _Recipe(
        _autoencoder_kl,
        dict(
            latent_channels=16,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Decoder-only LLM / VLM text encoders of the 2025 families (Qwen-Image, FLUX.2, Z-Image) and
# their offline byte-level BPE tokenizers
# ---------------------------------------------------------------------------------------------

_LLM_DIM = 32  # hidden size of the tiny Qwen2.5-VL / Qwen3 / Mistral3 text models

# Single tokens of the tiny LLM tokenizers: the words of the pipelines' fixed prompt templates and
# system messages (so that Qwen-Image's 34 dropped template tokens are exactly its system prefix,
# as with the real tokenizer), the toy world's words and common prompt and edit-instruction words.
_LLM_WORDS = tuple(
    dict.fromkeys(
        (
            # Qwen-Image / Qwen-Image-Edit templates
            "system user assistant describe the image by detailing color shape size texture quantity text "
            "spatial relationships of objects and background key features input then explain how user's "
            "instruction should alter or modify generate a new that meets requirements while maintaining "
            "consistency with original where appropriate picture "
            # FLUX.2's system message
            "you are an ai reasons about descriptions give structured responses focusing on object "
            "attribution actions without speculation "
            # prompts, the toy world and edit instructions
            "an in at over to from into is it its this make turn change add remove replace move put keep "
            "same colour photo red green blue yellow orange purple black white circle square triangle left "
            "right top bottom center middle cat dog bird horse car house tree man woman astronaut riding "
            "sky ocean city night sunset mountain river beautiful high quality low blurry ugly portrait "
            "landscape"
        ).split()
    )
)

_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)
_MISTRAL_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")

#: Qwen3's chat template, reduced to what the pipelines render: plain-string messages and the
#: ``enable_thinking`` switch (False adds the empty think block, as Qwen3's template does).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

#: A Mistral-style template for FLUX.2's batched ``apply_chat_template`` of typed-content messages.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@lru_cache(maxsize=4)
def _word_bpe(words: tuple[str, ...]) -> tuple[dict, list]:
    """Byte-level BPE vocabulary and merges that spell each word (and " word") as one token."""
    from visalign.pipelines.tokenizers import _apply_merges, _byte_symbols

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    space = symbols[ord(" ")]
    for word in [*words, *(w.capitalize() for w in words)]:
        for form in (word, space + word):
            pieces = _apply_merges(list(form), merges)
            left = pieces[0]
            for right in pieces[1:]:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
                left = left + right
    return vocab, merges


def tiny_llm_tokenizer(flavour: str = "qwen", words=_LLM_WORDS, model_max_length: int = 32768):
    """An offline byte-level BPE tokenizer (the Qwen2 pre-tokenizer) in which each word is one token.

    Each word, capitalised or not, with or without a leading space ("Ġword"), is one token; any
    other text still tokenizes byte by byte, so nothing is unknown. ``flavour="qwen"`` adds Qwen's
    special tokens (``<|im_start|>``, ``<|image_pad|>``, ...) and :data:`QWEN3_CHAT_TEMPLATE`;
    ``"mistral"`` adds Mistral's (``[INST]``, ``[SYSTEM_PROMPT]``, ...) and
    :data:`MISTRAL_CHAT_TEMPLATE`. About 10 ms; survives ``save_pretrained``/``from_pretrained``.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = _word_bpe(tuple(words))
    vocab = dict(vocab)
    if flavour == "qwen":
        specials, template = _QWEN_SPECIAL_TOKENS, QWEN3_CHAT_TEMPLATE
        roles = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    elif flavour == "mistral":
        specials, template = _MISTRAL_SPECIAL_TOKENS, MISTRAL_CHAT_TEMPLATE
        roles = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    else:
        raise ValueError(f"flavour must be 'qwen' or 'mistral', got {flavour!r}")
    for special in specials:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, chat_template=template, **roles
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in roles.values()]})
    return tokenizer


def _token_ids(tokenizer) -> dict:
    return dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def _qwen25_vl_text_encoder(**config):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (2-layer text model, 1-layer vision tower).

    The vision tower keeps the real patch size 14, 2x2 merge and temporal patch 2, so the real
    processor arithmetic holds; ``out_hidden_size`` feeds the text width.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_llm_tokenizer("qwen")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=_LLM_DIM,
        intermediate_size=2 * _LLM_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        **_token_ids(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=_LLM_DIM,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[0],
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    config = {"text_config": text, "vision_config": vision, **ids, **config}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))


def _qwen3_text_encoder(causal_lm: bool = False, **config):
    """A tiny Qwen3 text model: ``Qwen3Model`` (Z-Image) or ``Qwen3ForCausalLM`` (FLUX.2 klein)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    tokenizer = tiny_llm_tokenizer("qwen")
    config = {
        **dict(
            vocab_size=len(tokenizer),
            hidden_size=_LLM_DIM,
            intermediate_size=2 * _LLM_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=8192,
            **_token_ids(tokenizer),
        ),
        **config,
    }
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(Qwen3Config(**config))


def _mistral3_text_encoder(**config):
    """A tiny ``Mistral3ForConditionalGeneration`` (FLUX.2 [dev]): 1-layer Pixtral tower, Mistral text model.

    FLUX.2 stacks the hidden states of layers 10, 20 and 30, so the text model keeps 30 layers
    (each 16 wide).
    """
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = tiny_llm_tokenizer("mistral")
    text = dict(
        model_type="mistral",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=8192,
        **_token_ids(tokenizer),
    )
    vision = dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=64,
        patch_size=14,
    )
    config = {
        "text_config": text,
        "vision_config": vision,
        "image_token_index": tokenizer.convert_tokens_to_ids("[IMG]"),
        **config,
    }
    return Mistral3ForConditionalGeneration(Mistral3Config(**config))


def _qwen2vl_processor(**config):
    """A ``Qwen2VLProcessor`` (PIL image processor + :func:`tiny_llm_tokenizer`) for the edit pipelines.

    ``max_pixels`` keeps the VLM's view of a source image small (at most 4 merged image tokens);
    the pipeline still resizes the source to about 1 MP for its VAE, as stock does.
    """
    import transformers

    try:  # transformers 5's PIL processor, silently (the default class warns without torchvision)
        processor_cls = transformers.Qwen2VLImageProcessorPil
    except AttributeError:
        processor_cls = transformers.Qwen2VLImageProcessor
    config = {
        "min_pixels": 28 * 28,
        "max_pixels": 56 * 56,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        **config,
    }
    return QwenVLImageProcessor(image_processor=processor_cls(**config), tokenizer=tiny_llm_tokenizer("qwen"))


class QwenVLImageProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video sub-processor.

    transformers' ``Qwen2VLVideoProcessor`` imports torchvision at module level, which the default
    environment does not have (``ENVIRONMENT.md``); the edit pipelines pass images only. diffusers
    saves it as a custom component of this module and finds its loader through the base classes
    this module exposes (``ProcessorMixin``), so tiny edit pipelines survive ``save_pretrained`` /
    ``from_pretrained``.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
