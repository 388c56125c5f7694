"""The tiny specs of the video families: Wan 2.1 text-to-video and image-to-video.

Each builder returns ``(pipeline class, {constructor argument: _Recipe or value})`` for
:func:`visalign.testing.pipelines.tiny_pipeline`, which registers it under the family name. The
tiny models keep the real Wan VAE's 8x spatial / 4x temporal compression and Wan 2.1 I2V's 36
input channels and CLIP image embeddings; a new video family is one more builder here, made of
the shared parts of :mod:`visalign.testing.components` and this module's Wan parts.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

from visalign.testing.components import (
    _CLIP_DIM,
    _FLOW_SHIFT_3,
    _T5_DIM,
    _clip_image_processor,
    _clip_vision_encoder,
    _Recipe,
    _t5_text,
)


def _wan_vae(**config):
    """A tiny ``AutoencoderKLWan`` with the real 8x spatial and 4x temporal compression."""
    config = {
        "base_dim": 8,
        "z_dim": 16,  # 16 channels, so the stock per-channel latents_mean/std lists apply
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        **config,
    }
    return AutoencoderKLWan(**config)


def _wan_shared() -> dict[str, _Recipe]:
    """The components both Wan pipelines share: UMT5 text side, Wan VAE, flow-matching Euler."""
    return {
        **_t5_text("text_encoder", umt5=True),
        "vae": _Recipe(_wan_vae),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_SHIFT_3)),
    }


def _wan_transformer_config(**config) -> dict:
    """The tiny ``WanTransformer3DModel`` config (T2V); I2V changes a few keys via ``config``."""
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 12,  # rope splits a head as 4 (t) + 4 (h) + 4 (w)
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": _T5_DIM,
        "freq_dim": 32,
        "ffn_dim": 64,
        "num_layers": 2,
        "rope_max_seq_len": 32,
        **config,
    }


def _wan_t2v() -> tuple[type, dict[str, Any]]:
    return WanPipeline, {
        **_wan_shared(),
        "transformer": _Recipe(WanTransformer3DModel, _wan_transformer_config()),
    }


def _wan_i2v() -> tuple[type, dict[str, Any]]:
    transformer = _wan_transformer_config(
        in_channels=36,  # 16 noisy latent + 4 mask + 16 first-frame latent channels
        image_dim=_CLIP_DIM,  # Wan 2.1 I2V: CLIP image tokens enter through extra K/V
        added_kv_proj_dim=24,  # = num_attention_heads * attention_head_dim
    )
    return WanImageToVideoPipeline, {
        **_wan_shared(),
        "image_encoder": _Recipe(_clip_vision_encoder),
        "image_processor": _Recipe(_clip_image_processor),
        "transformer": _Recipe(WanTransformer3DModel, transformer),
    }
