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


# ---------------------------------------------------------------------------------------------
# Wan 2.2: two experts (A14B) and TI2V-5B (expand_timesteps, the 48-channel Wan 2.2 VAE)
# ---------------------------------------------------------------------------------------------


def _wan22_vae(**config):
    """A tiny Wan 2.2 VAE (TI2V-5B's): 48 latent channels, 2x2 pixel patches, 16x spatial / 4x temporal.

    The per-channel ``latents_mean``/``latents_std`` are fixed made-up values (48 of each), so the
    tests exercise the normalisation.
    """
    config = {
        "base_dim": 8,
        "z_dim": 48,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "is_residual": True,
        "in_channels": 12,  # 3 colours x a 2x2 pixel patch
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
        "latents_mean": [round(0.1 * ((7 * i) % 11 - 5), 3) for i in range(48)],
        "latents_std": [round(0.8 + 0.05 * (i % 9), 3) for i in range(48)],
        **config,
    }
    return AutoencoderKLWan(**config)


def _wan22() -> tuple[type, dict[str, Any]]:
    """Wan 2.2 A14B T2V: two experts of the same architecture (each with its own random weights).

    boundary_ratio is 0.8 (the real T2V-A14B has 0.875): with shift 3 and 4 steps, t = 1000, 858,
    602, 9, so each expert runs two steps.
    """
    return WanPipeline, {
        **_wan_shared(),
        "transformer": _Recipe(WanTransformer3DModel, _wan_transformer_config()),
        "transformer_2": _Recipe(WanTransformer3DModel, _wan_transformer_config()),
        "boundary_ratio": 0.8,
    }


def _wan22_i2v() -> tuple[type, dict[str, Any]]:
    """Wan 2.2 A14B I2V: two 36-channel experts without CLIP image tokens (``image_dim`` None, as the
    real I2V-A14B) and boundary_ratio 0.8 (the real one is 0.9), so each expert runs two of 4 steps.
    """
    transformer = _wan_transformer_config(in_channels=36)
    return WanImageToVideoPipeline, {
        **_wan_shared(),
        "image_encoder": None,
        "image_processor": None,
        "transformer": _Recipe(WanTransformer3DModel, transformer),
        "transformer_2": _Recipe(WanTransformer3DModel, transformer),
        "boundary_ratio": 0.8,
    }


def _wan22_ti2v_parts() -> dict[str, Any]:
    return {
        **_t5_text("text_encoder", umt5=True),
        "vae": _Recipe(_wan22_vae),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_SHIFT_3)),
        "transformer": _Recipe(WanTransformer3DModel, _wan_transformer_config(in_channels=48, out_channels=48)),
        "expand_timesteps": True,
    }


def _wan22_ti2v() -> tuple[type, dict[str, Any]]:
    """Wan 2.2 TI2V-5B text-to-video: one 48-channel transformer with per-token timesteps."""
    return WanPipeline, _wan22_ti2v_parts()


def _wan22_ti2v_i2v() -> tuple[type, dict[str, Any]]:
    """Wan 2.2 TI2V-5B image-to-video: the first latent frame is the image's, kept clean (timestep 0)."""
    return WanImageToVideoPipeline, {**_wan22_ti2v_parts(), "image_encoder": None, "image_processor": None}


# ---------------------------------------------------------------------------------------------
# HunyuanVideo 1.5: Qwen2.5-VL + ByT5 text, SigLIP image tokens (I2V), 32-channel 16x VAE
# ---------------------------------------------------------------------------------------------

# The words of HunyuanVideo 1.5's system message, so that the tiny tokenizer spells its template
# prefix in about as many tokens as the real one (stock crops a fixed 108 tokens).
_HUNYUAN15_WORDS = tuple(
    "you are a helpful assistant describe the video by detailing following aspects main content and theme "
    "of color shape size texture quantity text spatial relationships objects actions events behaviors "
    "temporal physical movement changes background environment light style atmosphere camera angles "
    "movements transitions used in".split()
)
_HUNYUAN15_TEXT_DIM = 32  # the tiny Qwen2.5-VL text model's width
_HUNYUAN15_GLYPH_DIM = 32  # the tiny ByT5 encoder's width
_HUNYUAN15_IMAGE_DIM = 16  # the tiny SigLIP tower's width


def _hunyuan15_tokenizer():
    """The Qwen2 tokenizer (chat template, offline) with HunyuanVideo's system-message words added."""
    from visalign.testing.components import _LLM_WORDS, tiny_llm_tokenizer

    return tiny_llm_tokenizer("qwen", words=tuple(dict.fromkeys(_LLM_WORDS + _HUNYUAN15_WORDS)))


def _hunyuan15_text_encoder(**config):
    """A 3-layer ``Qwen2_5_VLTextModel`` (stock reads the third-last hidden state)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    tokenizer = _hunyuan15_tokenizer()
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": _HUNYUAN15_TEXT_DIM,
        "intermediate_size": 2 * _HUNYUAN15_TEXT_DIM,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        **config,
    }
    return Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**config))


def _byt5_tokenizer(**config):
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(**config)  # byte-level: no vocabulary file


def _byt5_encoder(**config):
    """A 1-layer ``T5EncoderModel`` over ByT5's 384 byte ids (HunyuanVideo's glyph-text encoder)."""
    from transformers import T5Config, T5EncoderModel

    config = {
        "vocab_size": 384,
        "d_model": _HUNYUAN15_GLYPH_DIM,
        "d_kv": 8,
        "d_ff": 2 * _HUNYUAN15_GLYPH_DIM,
        "num_layers": 1,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        **config,
    }
    return T5EncoderModel(T5Config(**config))


def _hunyuan15_vae(**config):
    """A tiny ``AutoencoderKLHunyuanVideo15``: the real 32 channels and 16x spatial / 4x temporal factors.

    VAE slicing is on: the diffusers 0.42 VAE attention fails on a batch of more than one video, so
    the stock pipeline can decode a batch only one sample at a time.
    """
    from diffusers import AutoencoderKLHunyuanVideo15

    config = {"block_out_channels": [8, 8, 16, 32, 64], "layers_per_block": 1, "latent_channels": 32, **config}
    vae = AutoencoderKLHunyuanVideo15(**config)
    vae.enable_slicing()
    return vae


def _hunyuan15_transformer_config(**config) -> dict:
    return {
        "in_channels": 65,  # 32 noisy + 32 condition latent channels + 1 mask
        "out_channels": 32,
        "num_attention_heads": 2,
        "attention_head_dim": 16,  # rope splits a head as 4 (t) + 6 (h) + 6 (w)
        "num_layers": 2,
        "num_refiner_layers": 1,
        "text_embed_dim": _HUNYUAN15_TEXT_DIM,
        "text_embed_2_dim": _HUNYUAN15_GLYPH_DIM,
        "image_embed_dim": _HUNYUAN15_IMAGE_DIM,
        "rope_axes_dim": (4, 6, 6),
        "target_size": 32,  # the size bucket of a 32x32 image is 32x32 (stock I2V sizes the video from the image)
        **config,
    }


def _hunyuan15_shared() -> dict[str, Any]:
    from diffusers import ClassifierFreeGuidance

    return {
        "tokenizer": _Recipe(_hunyuan15_tokenizer),
        "text_encoder": _Recipe(_hunyuan15_text_encoder),
        "tokenizer_2": _Recipe(_byt5_tokenizer),
        "text_encoder_2": _Recipe(_byt5_encoder),
        "vae": _Recipe(_hunyuan15_vae),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(num_train_timesteps=1000, shift=5.0)),
        "guider": _Recipe(ClassifierFreeGuidance, dict(guidance_scale=6.0)),
    }


def _hunyuan_video15() -> tuple[type, dict[str, Any]]:
    from diffusers import HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Pipeline, {
        **_hunyuan15_shared(),
        "transformer": _Recipe(HunyuanVideo15Transformer3DModel, _hunyuan15_transformer_config(task_type="t2v")),
    }


def _siglip_vision_encoder(**config):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = {
        "hidden_size": _HUNYUAN15_IMAGE_DIM,
        "intermediate_size": 2 * _HUNYUAN15_IMAGE_DIM,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        **config,
    }
    return SiglipVisionModel(SiglipVisionConfig(**config))


def _siglip_image_processor(**config):
    """SigLIP's image processor at the tiny tower's 32 px (the PIL class: no torchvision needed)."""
    import transformers

    processor_cls = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)
    return processor_cls(**{"size": {"height": 32, "width": 32}, **config})


def _hunyuan_video15_i2v() -> tuple[type, dict[str, Any]]:
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Transformer3DModel

    return HunyuanVideo15ImageToVideoPipeline, {
        **_hunyuan15_shared(),
        "image_encoder": _Recipe(_siglip_vision_encoder),
        "feature_extractor": _Recipe(_siglip_image_processor),
        "transformer": _Recipe(HunyuanVideo15Transformer3DModel, _hunyuan15_transformer_config(task_type="i2v")),
    }
