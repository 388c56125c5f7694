"""Tiny random-weight diffusers pipelines of every family visalign supports, built offline.

:func:`tiny_pipeline` returns a *stock* diffusers pipeline (``StableDiffusionPipeline``,
``FluxPipeline``, ...) whose models are built from small configs with random weights and whose
tokenizers come from :mod:`visalign.testing.tokenizers`. Nothing is downloaded. Each family builds
in a few tens of milliseconds and runs its stock ``__call__`` at :data:`DEFAULT_SIZES` in a fraction
of a second on a CPU, so tests can exercise the real pipeline code paths: text encoding, CFG,
latent packing, scheduler, VAE decode, ``save_pretrained`` / ``from_pretrained``.

The tiny models keep the structure of the real ones where the pipelines depend on it: the same
component classes, latent channels, VAE scaling and shift factors, SDXL's ``text_time``
conditioning, Flux's guidance embedding (FLUX.1-dev) and dynamic shifting, Wan 2.1 I2V's 36 input
channels and CLIP image embeddings. Schedulers are the deterministic ones visalign reproduces
(DDIM for SD/SDXL, flow-matching Euler for the others), not the multistep samplers some real
checkpoints ship.

Example::

    >>> import torch
    >>> from visalign.testing import tiny_pipeline
    >>> from visalign.testing.pipelines import DEFAULT_SIZES
    >>> pipe = tiny_pipeline("flux", seed=0)
    >>> out = pipe("a red circle", num_inference_steps=2, output_type="pt",
    ...            generator=torch.Generator().manual_seed(0), **DEFAULT_SIZES["flux"])
    >>> out.images.shape
    torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

from visalign.errors import ConfigError, UnknownFamilyError
from visalign.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

__all__ = ["DEFAULT_SIZES", "FAMILIES", "tiny_pipeline"]

#: The families :func:`tiny_pipeline` builds, in a stable order (use it to parametrize tests).
FAMILIES = ("sd", "sdxl", "sd3", "flux", "wan-t2v", "wan-i2v")

#: Small ``__call__`` sizes that work for each family, as keyword arguments for the stock call:
#: ``pipe(prompt, **DEFAULT_SIZES[family])``. Only the video families have ``num_frames`` (the image
#: pipelines do not accept it). Images are 32x32: with the tiny VAEs' scale factor of 2 that is a
#: 16x16 latent (64 tokens for SD3 and for Flux after 2x2 packing). Wan's VAE keeps the real
#: 8x spatial / 4x temporal compression, so 32x32x5 frames is a 4x4x2 latent; Wan needs height
#: and width divisible by 16 and ``num_frames`` of the form 4k+1.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "sd": dict(height=32, width=32),
    "sdxl": dict(height=32, width=32),
    "sd3": dict(height=32, width=32),
    "flux": dict(height=32, width=32),
    "wan-t2v": dict(height=32, width=32, num_frames=5),
    "wan-i2v": dict(height=32, width=32, num_frames=5),
}

# Widths shared between components; the denoisers' text dimensions are derived from these.
_CLIP_DIM = 32  # hidden size and projection size of every tiny CLIP tower
_T5_DIM = 64  # d_model of the tiny T5/UMT5; SD3 needs >= the two CLIP widths concatenated
_IMAGE_SIZE = 32  # native size of the tiny CLIP vision tower (Wan I2V)

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
_FLOW_SHIFT_3 = dict(num_train_timesteps=1000, shift=3.0)  # SD3 and Wan 480p
_FLOW_FLUX = dict(  # the scheduler config FLUX.1-dev ships
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


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


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------


def _clip_text(name: str, with_projection: bool) -> dict[str, _Recipe]:
    """The tokenizer + text encoder pair of one CLIP tower, under SD's naming scheme."""
    suffix = name.removeprefix("text_encoder")
    return {
        f"tokenizer{suffix}": _Recipe(tiny_clip_tokenizer),
        name: _Recipe(_clip_text_encoder, {"with_projection": with_projection}),
    }


def _wan_shared() -> dict[str, _Recipe]:
    """The components both Wan pipelines share: UMT5 text side, Wan VAE, flow-matching Euler."""
    return {
        "tokenizer": _Recipe(tiny_t5_tokenizer),
        "text_encoder": _Recipe(_t5_encoder, {"umt5": True}),
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
        "tokenizer_3": _Recipe(tiny_t5_tokenizer),
        "text_encoder_3": _Recipe(_t5_encoder),
        "transformer": _Recipe(SD3Transformer2DModel, transformer),
        "vae": _Recipe(
            _autoencoder_kl,
            dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False),
        ),
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
        "tokenizer_2": _Recipe(tiny_t5_tokenizer),
        "text_encoder_2": _Recipe(_t5_encoder),
        "transformer": _Recipe(FluxTransformer2DModel, transformer),
        "vae": _Recipe(
            _autoencoder_kl,
            dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
        ),
        "scheduler": _Recipe(FlowMatchEulerDiscreteScheduler, dict(_FLOW_FLUX)),
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


_SPECS: dict[str, Callable[[], tuple[type, dict[str, Any]]]] = {
    "sd": _sd,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
    "wan-t2v": _wan_t2v,
    "wan-i2v": _wan_i2v,
}
assert tuple(_SPECS) == FAMILIES


def _component_seed(seed: int, name: str) -> int:
    # One seed per component, so overriding one component's config leaves the others' weights as
    # they were (a single stream would shift every component built after it).
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def tiny_pipeline(family: str, seed: int = 0, **overrides) -> DiffusionPipeline:
    r"""Builds a tiny stock diffusers pipeline of ``family`` with random weights, offline.

    Every ``torch.nn.Module`` component is in eval mode, and the progress bar is disabled. The
    caller's global torch RNG is left untouched.

    Args:
        family (`str`):
            One of :data:`FAMILIES`: ``"sd"`` (``StableDiffusionPipeline``), ``"sdxl"``
            (``StableDiffusionXLPipeline``), ``"sd3"`` (``StableDiffusion3Pipeline``), ``"flux"``
            (``FluxPipeline``, guidance-distilled like FLUX.1-dev), ``"wan-t2v"`` (``WanPipeline``)
            or ``"wan-i2v"`` (``WanImageToVideoPipeline``, Wan 2.1 style with a CLIP image encoder).
        seed (`int`, *optional*, defaults to 0):
            Seeds the random weights. The same seed gives bit-identical weights; each component
            draws from its own seed, so overriding one component does not change the others.
        **overrides:
            Keyword arguments of the pipeline's constructor, plus ``dtype``:

            - ``<component>=<dict>``: updates the config of a built-in component before it is
              built, e.g. ``unet={"layers_per_block": 2}``, ``scheduler={"shift": 1.0}``,
              ``tokenizer={"model_max_length": 77}``. The keys are the keyword arguments of the
              diffusers model / scheduler constructor, of the transformers config class (text and
              image encoders; ``with_projection`` / ``umt5`` pick the model class), or of the
              tokenizer builders in :mod:`visalign.testing.tokenizers`. Keeping the components
              consistent with each other (e.g. ``cross_attention_dim`` with the text encoder
              width) is up to the caller.
            - ``<component>=<object or None>``: uses that object as is, e.g.
              ``scheduler=DDPMScheduler()`` or ``text_encoder_3=None``. Modules given this way are
              put in eval mode too.
            - Any other constructor argument is passed through, e.g.
              ``force_zeros_for_empty_prompt=False`` for SDXL.
            - ``dtype`` (`torch.dtype`): casts the pipeline's modules after building in float32, so
              a bfloat16 pipeline has the rounded weights of the float32 one with the same seed.

    Returns:
        `diffusers.DiffusionPipeline`: the stock pipeline of that family. Call it with
        :data:`DEFAULT_SIZES` and a few steps; every ``__call__`` default (text lengths 256 for
        SD3 and 512 for Flux and Wan included) works too.

    Raises:
        `UnknownFamilyError`: ``family`` is not in :data:`FAMILIES`.
        `ConfigError`: an override names no constructor argument, or gives a dict for a component
            without a built-in recipe.

    Example::

        >>> pipe = tiny_pipeline("sd3", seed=1, transformer={"num_layers": 2}, dtype=torch.bfloat16)
        >>> pipe.transformer.config.num_layers, pipe.transformer.dtype
        (2, torch.bfloat16)
    """
    if family not in _SPECS:
        raise UnknownFamilyError(
            f"Unknown model family {family!r}. visalign.testing.tiny_pipeline builds these "
            f"families: {', '.join(FAMILIES)}. Pass one of them."
        )
    pipeline_cls, parts = _SPECS[family]()
    dtype = overrides.pop("dtype", None)

    accepted = [p for p in inspect.signature(pipeline_cls.__init__).parameters if p != "self"]
    for name, value in overrides.items():
        if name not in accepted:
            raise ConfigError(
                f"tiny_pipeline({family!r}) got the override {name}=..., but "
                f"{pipeline_cls.__name__} takes none of that name. Valid overrides: dtype, "
                f"{', '.join(accepted)}."
            )
        recipe = parts.get(name)
        if isinstance(value, dict):
            if not isinstance(recipe, _Recipe):
                raise ConfigError(
                    f"tiny_pipeline({family!r}) got a config dict for {name!r}, but has no "
                    f"built-in {name!r} to configure. Pass a ready {name} object (or None) instead."
                )
            parts[name] = _Recipe(recipe.build, {**recipe.config, **value})
        else:
            parts[name] = value

    components = {}
    # fork_rng restores the caller's CPU RNG afterwards: building a test fixture must not change
    # which random numbers the test itself draws next.
    with torch.random.fork_rng(devices=[]):
        for name, part in parts.items():
            if isinstance(part, _Recipe):
                torch.manual_seed(_component_seed(seed, name))
                part = part.build(**part.config)
            if isinstance(part, torch.nn.Module):
                part.eval()  # modules built from a config start in train mode, dropout on
            components[name] = part

    pipe = pipeline_cls(**components)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
