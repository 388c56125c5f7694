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
from typing import Any

from diffusers import AutoencoderKL

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
        dict(latent_channels=16, scaling_factor=scaling_factor, shift_factor=shift_factor,
             use_quant_conv=False, use_post_quant_conv=False),
    )
