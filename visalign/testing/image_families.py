"""The tiny specs of the image families: SD 1.5, SDXL, SD3 and FLUX.1-dev.

Each builder returns ``(pipeline class, {constructor argument: _Recipe or value})`` for
:func:`visalign.testing.pipelines.tiny_pipeline`, which registers it under the family name. The
tiny denoisers keep what the stock pipelines depend on (latent channels, VAE scaling and shift
factors, SDXL's ``text_time`` conditioning, Flux's guidance embedding and dynamic shifting); a
new image family is one more builder here, made of the shared parts of
:mod:`visalign.testing.components`.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from visalign.testing.components import (
    _CLIP_DIM,
    _FLOW_SHIFT_3,
    _LLM_DIM,
    _T5_DIM,
    _autoencoder_kl,
    _clip_text,
    _latent16_vae,
    _mistral3_text_encoder,
    _qwen2vl_processor,
    _qwen3_text_encoder,
    _qwen25_vl_text_encoder,
    _Recipe,
    _t5_text,
    tiny_llm_tokenizer,
)

_DDIM_SD15 = dict(  # DDIM as SD 1.5 / SDXL configure it (see PITFALLS: leading spacing, offset 1)
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
_FLOW_FLUX = dict(  # the scheduler config FLUX.1-dev ships
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _sdxl_unet(**config):
    """SDXL-style UNet whose ``text_time`` embedding input matches the second CLIP tower.

    SDXL adds 6 size/crop numbers (each embedded to ``addition_time_embed_dim``) to the pooled text
    embedding of ``text_encoder_2``; ``projection_class_embeddings_input_dim`` must equal that sum,
    so it is derived here unless given.
    """
    config = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],  # no attention at full res
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "cross_attention_dim": 2 * _CLIP_DIM,  # both CLIP towers' hidden states, concatenated
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        **config,
    }
    time_dims = 6 * config["addition_time_embed_dim"]
    config.setdefault("projection_class_embeddings_input_dim", time_dims + _CLIP_DIM)
    return UNet2DConditionModel(**config)


def _sd() -> tuple[type, dict[str, Any]]:
    unet = dict(
        sample_size=16,  # with the VAE's factor 2: the stock default size is 32 px
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=4,
        cross_attention_dim=_CLIP_DIM,
    )
    return StableDiffusionPipeline, {
        **_clip_text("text_encoder", with_projection=False),
        "unet": _Recipe(UNet2DConditionModel, unet),
        "vae": _Recipe(_autoencoder_kl, {"scaling_factor": 0.18215}),
        "scheduler": _Recipe(DDIMScheduler, dict(_DDIM_SD15)),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _sdxl() -> tuple[type, dict[str, Any]]:
    return StableDiffusionXLPipeline, {
        **_clip_text("text_encoder", with_projection=False),
        **_clip_text("text_encoder_2", with_projection=True),
        "unet": _Recipe(_sdxl_unet),
        "vae": _Recipe(_autoencoder_kl, {"scaling_factor": 0.13025}),
        "scheduler": _Recipe(DDIMScheduler, dict(_DDIM_SD15)),
        # Explicit, so outputs do not depend on whether invisible-watermark happens to be installed.
        "add_watermarker": False,
    }


def _sd3() -> tuple[type, dict[str, Any]]:
    transformer = dict(
        sample_size=16,  # stock default size 32 px
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=32,  # must equal num_attention_heads * attention_head_dim
        pooled_projection_dim=2 * _CLIP_DIM,  # both CLIP projections, concatenated
        pos_embed_max_size=32,  # up to 32x32 patches, i.e. 128 px
    )
    return StableDiffusion3Pipeline, {
        **_clip_text("text_encoder", with_projection=True),
        **_clip_text("text_encoder_2", with_projection=True),
        **_t5_text("text_encoder_3"),
        "transformer": _Recipe(SD3Transformer2DModel, transformer),
        "vae": _latent16_vae(scaling_factor=1.5305, shift_factor=0.0609),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_SHIFT_3)),
    }


def _flux() -> tuple[type, dict[str, Any]]:
    transformer = dict(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_CLIP_DIM,  # CLIPTextModel's pooled output
        guidance_embeds=True,  # FLUX.1-dev: guidance_scale feeds an embedding, not CFG
        axes_dims_rope=[4, 6, 6],  # must sum to attention_head_dim
    )
    return FluxPipeline, {
        **_clip_text("text_encoder", with_projection=False),
        **_t5_text("text_encoder_2"),
        "transformer": _Recipe(FluxTransformer2DModel, transformer),
        "vae": _latent16_vae(scaling_factor=0.3611, shift_factor=0.1159),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_FLUX)),
    }


# ---------------------------------------------------------------------------------------------
# The 2025 image families: Qwen-Image (+ Edit), FLUX.2 [dev] / [klein], Z-Image, FLUX.1 Kontext
# ---------------------------------------------------------------------------------------------

_FLOW_QWEN_IMAGE = dict(  # the scheduler config Qwen-Image ships
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
_FLOW_FLUX2 = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,  # FLUX.2's
    time_shift_type="exponential",
)
_FLOW_Z_IMAGE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)  # Z-Image-Turbo's


def _qwen_image_transformer(**config):
    from diffusers import QwenImageTransformer2DModel

    config = {
        **dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_LLM_DIM,
            axes_dims_rope=(4, 6, 6),
        ),
        **config,
    }
    return QwenImageTransformer2DModel(**config)


def _qwen_image() -> tuple[type, dict[str, Any]]:
    """Qwen-Image: Qwen2.5-VL text encoder (last hidden state, 34 template tokens dropped), the
    Wan-style 3D VAE (8x, per-channel latent mean/std), true CFG with a norm rescale.
    """
    from diffusers import QwenImagePipeline

    return QwenImagePipeline, {
        "tokenizer": _Recipe(tiny_llm_tokenizer),
        "text_encoder": _Recipe(_qwen25_vl_text_encoder),
        "transformer": _Recipe(_qwen_image_transformer),
        "vae": _Recipe(_qwen_image_vae),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_QWEN_IMAGE)),
    }


def _qwen_image_edit() -> tuple[type, dict[str, Any]]:
    """Qwen-Image-Edit: Qwen-Image plus the source image, seen by the VLM (``processor``) and
    concatenated to the sequence as VAE latents.
    """
    from diffusers import QwenImageEditPipeline

    _, parts = _qwen_image()
    return QwenImageEditPipeline, {**parts, "processor": _Recipe(_qwen2vl_processor)}


def _flux2_transformer(**config):
    from diffusers import Flux2Transformer2DModel

    config = {
        **dict(
            patch_size=1,
            in_channels=128,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * 16,
            axes_dims_rope=(4, 4, 4, 4),
            timestep_guidance_channels=32,
            mlp_ratio=2.0,
            guidance_embeds=True,
        ),
        **config,
    }
    return Flux2Transformer2DModel(**config)


def _flux2() -> tuple[type, dict[str, Any]]:
    """FLUX.2 [dev]: Mistral-3 text encoder (layers 10, 20, 30 stacked), 32-channel VAE with 2x2
    patches normalised by its batch-norm statistics, embedded guidance.
    """
    from diffusers import Flux2Pipeline

    return Flux2Pipeline, {
        "tokenizer": _Recipe(tiny_llm_tokenizer, {"flavour": "mistral"}),
        "text_encoder": _Recipe(_mistral3_text_encoder),
        "transformer": _Recipe(_flux2_transformer),
        "vae": _Recipe(_flux2_vae),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_FLUX2)),
    }


def _flux2_klein() -> tuple[type, dict[str, Any]]:
    """FLUX.2 [klein] base: Qwen3 text encoder (layers 9, 18, 27 stacked, so 28 tiny layers), no
    guidance embedding, CFG with the empty negative prompt as two forwards.
    """
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline, {
        "tokenizer": _Recipe(tiny_llm_tokenizer),
        "text_encoder": _Recipe(
            _qwen3_text_encoder,
            {"causal_lm": True, "num_hidden_layers": 28, "hidden_size": 16, "intermediate_size": 32, "head_dim": 8},
        ),
        "transformer": _Recipe(_flux2_transformer, {"guidance_embeds": False}),
        "vae": _Recipe(_flux2_vae),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_FLUX2)),
        "is_distilled": False,
    }


def _z_image_transformer(**config):
    from diffusers import ZImageTransformer2DModel

    config = {
        **dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=_LLM_DIM,
            axes_dims=[4, 6, 6],
            axes_lens=[256, 64, 64],
        ),
        **config,
    }
    return ZImageTransformer2DModel(**config)


def _z_image() -> tuple[type, dict[str, Any]]:
    """Z-Image: Qwen3 text encoder (penultimate hidden state, unpadded), the FLUX.1 VAE, a
    single-stream DiT that predicts −v at t = 1 − σ; CFG as ``c + s·(c − u)``.
    """
    from diffusers import ZImagePipeline

    return ZImagePipeline, {
        "tokenizer": _Recipe(tiny_llm_tokenizer),
        "text_encoder": _Recipe(_qwen3_text_encoder),
        "transformer": _Recipe(_z_image_transformer),
        "vae": _latent16_vae(scaling_factor=0.3611, shift_factor=0.1159),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_Z_IMAGE)),
    }


def _flux_kontext() -> tuple[type, dict[str, Any]]:
    """FLUX.1 Kontext [dev]: FLUX.1-dev plus the source image's packed latents on the sequence."""
    from diffusers import FluxKontextPipeline

    _, parts = _flux()
    return FluxKontextPipeline, {**parts, "image_encoder": None, "feature_extractor": None}


def _qwen_image_vae(**config):
    """A tiny ``AutoencoderKLQwenImage``: the real 8x spatial factor and 16 channels with the real
    ``latents_mean``/``latents_std`` (its config defaults), 4 channels per level and no extra residual
    blocks, so that stock Qwen-Image-Edit's 1 MP source encodes in about 2 s on one CPU thread.
    """
    from diffusers import AutoencoderKLQwenImage

    config = {
        "base_dim": 4,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 0,
        "temperal_downsample": [False, True, True],
        **config,
    }
    return AutoencoderKLQwenImage(**config)


def _flux2_vae(**config):
    """A tiny ``AutoencoderKLFlux2`` (scale factor 2, 32 latent channels, 2x2 patches).

    The batch-norm statistics that normalise FLUX.2's patchified latents get random values (a
    fresh BatchNorm has mean 0 and variance 1), so the tests exercise the normalisation.
    """
    import torch
    from diffusers import AutoencoderKLFlux2

    config = {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 32,
        "sample_size": 32,
        **config,
    }
    vae = AutoencoderKLFlux2(**config)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae
