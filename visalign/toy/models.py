"""Architectures of the shipped toy models, built from configs (random weights, seeded).

The lab script ``scripts/toy/train_t2i.py`` (in the repository, not the installed package) trains
these; nothing here downloads anything. Every component is a stock transformers or diffusers
class, so the trained folders load with the ordinary ``from_pretrained`` calls and run in the
stock pipelines:

- :func:`build_clip`: the toy CLIP reward, a ``CLIPModel`` + ``CLIPProcessor`` at 32 px;
- :func:`build_vae`: a 2× ``AutoencoderKL`` (32×32×3 pixels ↔ 16×16×4 latents);
- :func:`build_t2i`: a ``StableDiffusion3Pipeline`` (two tiny CLIP text towers, a
  zero-output T5 stand-in, a 6-layer ``SD3Transformer2DModel``, the VAE above and a
  ``FlowMatchEulerDiscreteScheduler``).

The sizes were chosen so each model trains in well under 30 minutes on two CPU cores (see
``visalign/toy/MODELS.md`` for the measured numbers).
"""

from __future__ import annotations

import torch

from visalign.toy.tokenizer import toy_t5_tokenizer, toy_tokenizer

__all__ = [
    "CLIP_MAX_LENGTH",
    "TEXT_MAX_LENGTH",
    "build_clip",
    "build_clip_processor",
    "build_vae",
    "build_t2i",
    "zero_t5",
]

#: Padded text length of the toy CLIP reward: a two-shape caption with CLIPScore's
#: "A photo depicts " prefix is 20 tokens.
CLIP_MAX_LENGTH = 32
#: Padded text length of the generators' CLIP towers (stock SD3 pads to the tokenizer's
#: ``model_max_length``): every single-shape caption fits with room to spare.
TEXT_MAX_LENGTH = 16


def _image_processor_cls():
    """CLIP's image processor that needs no torchvision (transformers 5 splits PIL/torchvision)."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as cls
    return cls


def build_clip_processor(image_size: int = 32):
    """The toy CLIP's ``CLIPProcessor``: toy tokenizer + a ``image_size`` px image processor.

    The image processor resizes the shortest side to ``image_size`` and centre-crops, with CLIP's
    normalisation; visalign's rewards read these settings and redo them in torch.
    """
    from transformers import CLIPProcessor

    image_processor = _image_processor_cls()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=toy_tokenizer(model_max_length=CLIP_MAX_LENGTH))


def build_clip(
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    num_layers: int = 2,
    projection_dim: int = 64,
):
    """A tiny ``CLIPModel`` for the toy world, with random weights, and its ``CLIPProcessor``.

    Args:
        seed: seeds the weights.
        image_size, patch_size: the vision tower sees (image_size / patch_size)² patches; at
            32 px and patch 4 a medium shape spans about 2×2 patches.
        hidden_size, num_layers: width and depth of both towers (4 attention heads each).
        projection_dim: the size of the joint embedding space.

    Returns:
        `(CLIPModel, CLIPProcessor)`.
    """
    from transformers import CLIPConfig, CLIPModel

    processor = build_clip_processor(image_size)
    tok = processor.tokenizer
    common = dict(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=4
    )
    text = dict(
        common,
        vocab_size=len(tok),
        max_position_embeddings=CLIP_MAX_LENGTH,
        # CLIP pools at the first end-of-text token; padding is the same token, so the
        # first occurrence is the real end of the caption.
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(common, image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    return CLIPModel(config), processor


def build_vae(seed: int = 0, *, latent_channels: int = 4, channels: tuple[int, ...] = (8, 16)):
    """A tiny ``AutoencoderKL`` that halves each side: 32×32×3 pixels ↔ 16×16×4 latents.

    ``len(channels)`` levels give a scale factor of ``2 ** (len(channels) - 1)``. The mid-block
    attention is off: at 16×16 the convolutions already see the whole shape, and attention would
    dominate the cost. ``scaling_factor``/``shift_factor`` are placeholders here; training sets
    them from the latents' statistics.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        norm_num_groups=min(8, min(channels)),
        sample_size=32,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
        # Stock pipelines upcast the VAE to fp32 when this is set; the toy VAE is tiny, so keep it.
        force_upcast=True,
    )


def _clip_text_tower(hidden_size: int, num_layers: int, projection_dim: int, vocab_size: int, tok) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            projection_dim=projection_dim,
            max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )


def zero_t5(dim: int):
    """A one-layer ``T5EncoderModel`` that outputs exactly zeros, and its tokenizer.

    Stock SD3 replaces a missing T5 by ``max_sequence_length`` rows of zeros, but
    ``StableDiffusion3Pipeline.from_pretrained`` refuses a folder whose ``text_encoder_3`` is
    null unless the caller passes ``text_encoder_3=None``. So the toy folder ships this stand-in:
    T5's final RMSNorm multiplies by its weight, which is zero here, so the output is the same
    zeros for any prompt and the pipeline computes exactly what it would without a T5 (the
    transformer never learned anything from those rows). Built from a fixed seed, separately
    from the trained parts.
    """
    from transformers import T5Config, T5EncoderModel

    tok = toy_t5_tokenizer()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=dim,
            d_kv=8,
            d_ff=dim,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="relu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.random.set_rng_state(gen_state)  # leave the caller's random stream untouched
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model.eval().requires_grad_(False), tok


def build_t2i(
    vae=None,
    seed: int = 0,
    *,
    text_hidden: int = 32,
    text_layers: int = 2,
    num_layers: int = 6,
    num_heads: int = 4,
    head_dim: int = 32,
    patch_size: int = 2,
    shift: float = 1.0,
):
    """The toy T2I model: a ``StableDiffusion3Pipeline`` with random weights.

    SD3 concatenates the penultimate hidden states of its two CLIP towers along the features
    (``2 * text_hidden``, which is the transformer's ``joint_attention_dim``), then appends T5
    tokens; without a T5 (``text_encoder_3=None``) those are ``max_sequence_length`` rows of zeros.
    The pooled embedding is the two towers' projections, concatenated. ``text_encoder_3`` is
    :func:`zero_t5`, which outputs exactly those zeros but lets the folder load with a plain
    ``from_pretrained``.

    Args:
        vae: a trained ``AutoencoderKL`` (default: a fresh :func:`build_vae`).
        seed: seeds the text towers and the transformer.
        text_hidden, text_layers: each CLIP text tower (≥ 2 layers, since SD3 reads the
            penultimate layer).
        num_layers, num_heads, head_dim, patch_size: the ``SD3Transformer2DModel``.
        shift: the ``FlowMatchEulerDiscreteScheduler`` shift written into the folder.

    Returns:
        `StableDiffusion3Pipeline` on the CPU in fp32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    vae = build_vae(seed) if vae is None else vae
    tok = toy_tokenizer(model_max_length=TEXT_MAX_LENGTH)
    torch.manual_seed(seed)
    towers = [_clip_text_tower(text_hidden, text_layers, text_hidden, len(tok), tok) for _ in range(2)]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=32 // scale,
        patch_size=patch_size,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=2 * text_hidden,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=2 * text_hidden,
        # Room for up to 4× the trained token grid (64 px), though only 32 px is trained.
        pos_embed_max_size=2 * 32 // scale // patch_size * 2,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    t5, t5_tok = zero_t5(2 * text_hidden)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=towers[0],
        tokenizer=tok,
        text_encoder_2=towers[1],
        tokenizer_2=toy_tokenizer(model_max_length=TEXT_MAX_LENGTH),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
