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

The families' specs live in :mod:`visalign.testing.image_families` and
:mod:`visalign.testing.video_families`, built from the shared parts of
:mod:`visalign.testing.components`; this module registers them by name (:data:`FAMILIES`,
:data:`DEFAULT_SIZES`) and builds them (:func:`tiny_pipeline`). Adding a family is a builder in
the right family module plus one entry in ``_SPECS`` and one in :data:`DEFAULT_SIZES` here.

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
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline

from visalign.errors import ConfigError, UnknownFamilyError
from visalign.testing.components import _Recipe
from visalign.testing.image_families import (
    _flux,
    _flux2,
    _flux2_klein,
    _flux_kontext,
    _qwen_image,
    _qwen_image_edit,
    _sd,
    _sd3,
    _sdxl,
    _z_image,
)
from visalign.testing.video_families import (
    _hunyuan_video15,
    _hunyuan_video15_i2v,
    _wan22,
    _wan22_i2v,
    _wan22_ti2v,
    _wan22_ti2v_i2v,
    _wan_i2v,
    _wan_t2v,
)

__all__ = ["DEFAULT_SIZES", "FAMILIES", "tiny_pipeline"]

# Family name -> builder of its spec: (pipeline class, {constructor argument: _Recipe or value}).
_SPECS: dict[str, Callable[[], tuple[type, dict[str, Any]]]] = {
    "sd": _sd,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
    "qwen-image": _qwen_image,
    "qwen-image-edit": _qwen_image_edit,
    "flux2": _flux2,
    "flux2-klein": _flux2_klein,
    "z-image": _z_image,
    "flux-kontext": _flux_kontext,
    "wan-t2v": _wan_t2v,
    "wan-i2v": _wan_i2v,
    "wan22": _wan22,
    "wan22-i2v": _wan22_i2v,
    "wan22-ti2v": _wan22_ti2v,
    "wan22-ti2v-i2v": _wan22_ti2v_i2v,
    "hunyuan-video15": _hunyuan_video15,
    "hunyuan-video15-i2v": _hunyuan_video15_i2v,
}

#: The families :func:`tiny_pipeline` builds, in a stable order (use it to parametrize tests):
#: ``("sd", "sdxl", "sd3", "flux", "wan-t2v", "wan-i2v")``.
FAMILIES: tuple[str, ...] = tuple(_SPECS)

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
    # Qwen-Image's VAE keeps the real 8x factor: 64 px is an 8x8 latent, 16 tokens after 2x2 packing.
    "qwen-image": dict(height=64, width=64),
    "qwen-image-edit": dict(height=64, width=64),
    "flux2": dict(height=32, width=32),
    "flux2-klein": dict(height=32, width=32),
    "z-image": dict(height=32, width=32),
    "flux-kontext": dict(height=32, width=32),
    "wan-t2v": dict(height=32, width=32, num_frames=5),
    "wan-i2v": dict(height=32, width=32, num_frames=5),
    "wan22": dict(height=32, width=32, num_frames=5),
    "wan22-i2v": dict(height=32, width=32, num_frames=5),
    # The Wan 2.2 VAE compresses 16x and the transformer patches 2x2: 64 px is a 4x4 latent, 2x2 tokens.
    "wan22-ti2v": dict(height=64, width=64, num_frames=5),
    "wan22-ti2v-i2v": dict(height=64, width=64, num_frames=5),
    # HunyuanVideo 1.5's VAE keeps the real 16x factor (patch 1): 32 px is a 2x2 latent per frame.
    "hunyuan-video15": dict(height=32, width=32, num_frames=5),
    "hunyuan-video15-i2v": dict(height=32, width=32, num_frames=5),
}
assert tuple(DEFAULT_SIZES) == FAMILIES, "DEFAULT_SIZES needs an entry per family, in _SPECS' order"


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
