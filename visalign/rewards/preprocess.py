"""Torch-only image preprocessing for reward models (docs/math.md §7).

Everything here is plain tensor code on (B, 3, H, W) floats in [0, 1], so it runs batched on the
images' device and gradients flow back to the pixels. It reproduces the PIL path of the usual
image processors closely (bicubic with antialias, as PIL does when it shrinks):

- CLIP, PickScore, LLaVA-style VLMs: resize the shortest side to ``size``, then centre-crop.
- HPSv2 (open_clip ``ResizeMaxSize``): resize the longest side to ``size``, then zero-pad to a
  square, the image centred.
- then normalise with the CLIP mean and std.

:class:`ImageTransform` bundles these and can be read off a transformers image processor
(``ImageTransform.from_processor(processor.image_processor)``), so a reward preprocesses exactly as
its checkpoint expects, tiny test models included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from visalign.errors import ConfigError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "resize",
    "resize_shortest_side",
    "resize_longest_side",
    "center_crop",
    "pad_to_size",
    "resize_longest_and_pad",
    "normalize",
    "ImageTransform",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes, as image processors store them.
_PIL_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize(
    images: torch.Tensor,
    size: int | Sequence[int],
    *,
    mode: str = "bicubic",
    antialias: bool = True,
    clamp: bool = True,
) -> torch.Tensor:
    """Resizes (B, C, H, W) images to ``size`` = (height, width).

    Args:
        images: floats, (B, C, H, W).
        size: the output (height, width), or one int for a square.
        mode: ``"bicubic"`` (default), ``"bilinear"`` or ``"nearest"``.
        antialias: low-pass filter when shrinking, as PIL does (bicubic/bilinear only).
        clamp: clip to [0, 1] afterwards, as PIL's uint8 output is; bicubic overshoots slightly.
    """
    h, w = _pair(size)
    if tuple(images.shape[-2:]) == (h, w):
        return images
    dtype = images.dtype
    x = images.float()
    if mode == "nearest":
        x = F.interpolate(x, size=(h, w), mode="nearest")
    else:
        x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=antialias)
    if clamp:
        x = x.clamp(0.0, 1.0)
    return x.to(dtype)


def resize_shortest_side(images: torch.Tensor, size: int, **kwargs) -> torch.Tensor:
    """Resizes so the shorter side is ``size``, keeping the aspect ratio.

    The longer side becomes ``int(size * long / short)`` (truncated), as transformers computes it.
    Keyword arguments go to :func:`resize`.
    """
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    out = (size, new_long) if h <= w else (new_long, size)
    return resize(images, out, **kwargs)


def resize_longest_side(images: torch.Tensor, size: int, **kwargs) -> torch.Tensor:
    """Resizes so the longer side is ``size``, keeping the aspect ratio.

    The sides become ``round(side * size / max(h, w))``, as open_clip's ``ResizeMaxSize`` does.
    Keyword arguments go to :func:`resize`.
    """
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    return resize(images, (round(h * scale), round(w * scale)), **kwargs)


def pad_to_size(images: torch.Tensor, size: int | Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """Pads (B, C, H, W) images to ``size`` with ``fill``, the image centred.

    Odd padding puts the extra row/column at the bottom/right.
    """
    th, tw = _pair(size)
    h, w = images.shape[-2:]
    ph, pw = max(th - h, 0), max(tw - w, 0)
    if ph == 0 and pw == 0:
        return images
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def center_crop(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Crops the centre (height, width) = ``size``; zero-pads first if the image is smaller.

    The top-left corner is ``((H - h) // 2, (W - w) // 2)``, as transformers computes it.
    """
    th, tw = _pair(size)
    images = pad_to_size(images, (max(th, images.shape[-2]), max(tw, images.shape[-1])))
    h, w = images.shape[-2:]
    top, left = (h - th) // 2, (w - tw) // 2
    return images[..., top : top + th, left : left + tw]


def resize_longest_and_pad(images: torch.Tensor, size: int, fill: float = 0.0, **kwargs) -> torch.Tensor:
    """HPSv2's resize: longest side to ``size``, then pad to ``size`` x ``size`` with ``fill``."""
    return pad_to_size(resize_longest_side(images, size, **kwargs), size, fill)


def normalize(images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``(images - mean) / std`` per channel, on (..., 3, H, W)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - m) / s


@dataclass
class ImageTransform:
    """A reward model's preprocessing, as a differentiable function of [0, 1] pixels.

    Args:
        resize_mode: ``"shortest"`` (shortest side to ``size``), ``"longest_pad"``
            (longest side to ``size`` then pad), ``"exact"`` (resize to ``size`` x ``size`` or
            ``(h, w)``) or ``"none"``.
        size: the resize target (an int, or (height, width) for ``"exact"``).
        crop_size: the centre crop after resizing, or ``None``.
        mean, std: the normalisation, or ``None`` for none.
        interpolation: ``"bicubic"`` (default), ``"bilinear"`` or ``"nearest"``.
        antialias: antialias when shrinking (default True).
        fill: the padding value of ``"longest_pad"``, in pixel units before normalising.

    Example::

        t = ImageTransform.from_processor(clip_processor.image_processor)
        pixel_values = t(images)        # (B, 3, 224, 224), normalised, differentiable
    """

    resize_mode: str = "shortest"
    size: Any = 224
    crop_size: Any = 224
    mean: Sequence[float] | None = CLIP_MEAN
    std: Sequence[float] | None = CLIP_STD
    interpolation: str = "bicubic"
    antialias: bool = True
    fill: float = 0.0

    def __call__(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Preprocesses (B, 3, H, W) floats in [0, 1]; computed in float32, cast to ``dtype``."""
        x = images.float()
        kw = dict(mode=self.interpolation, antialias=self.antialias)
        if self.resize_mode == "shortest":
            x = resize_shortest_side(x, int(self.size), **kw)
        elif self.resize_mode == "longest_pad":
            x = resize_longest_and_pad(x, int(self.size), self.fill, **kw)
        elif self.resize_mode == "exact":
            x = resize(x, self.size, **kw)
        elif self.resize_mode != "none":
            raise ConfigError(
                f"unknown resize_mode {self.resize_mode!r}; use 'shortest', 'longest_pad', 'exact' or 'none'."
            )
        if self.crop_size is not None:
            x = center_crop(x, self.crop_size)
        if self.mean is not None and self.std is not None:
            x = normalize(x, self.mean, self.std)
        return x if dtype is None else x.to(dtype)

    @classmethod
    def from_processor(cls, image_processor: Any) -> ImageTransform:
        """Reads the settings of a transformers image processor (CLIP/LLaVA style).

        Supports ``size={"shortest_edge": s}`` and ``size={"height": h, "width": w}``, with an
        optional centre crop. Processors that tile or patchify images (Qwen2-VL, LLaVA-NeXT ...)
        raise :class:`~visalign.errors.ConfigError`.
        """
        ip = getattr(image_processor, "image_processor", image_processor)  # a full processor too
        size = _get(ip, "size")
        do_resize = _get(ip, "do_resize", True)
        if not do_resize or size is None:
            mode, target = "none", None
        elif isinstance(size, int):
            mode, target = "shortest", size
        elif "shortest_edge" in size and size.get("longest_edge") is None:
            mode, target = "shortest", int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            mode, target = "exact", (int(size["height"]), int(size["width"]))
        else:
            raise ConfigError(
                f"{type(ip).__name__} with size={dict(size)} does not map to a plain resize/crop; "
                "torch preprocessing supports CLIP-style processors (shortest_edge or "
                "height/width, optional centre crop)."
            )
        crop = None
        if _get(ip, "do_center_crop", False):
            cs = _get(ip, "crop_size")
            crop = (int(cs["height"]), int(cs["width"])) if isinstance(cs, dict) else cs
        mean = std = None
        if _get(ip, "do_normalize", True):
            mean, std = tuple(_get(ip, "image_mean", CLIP_MEAN)), tuple(_get(ip, "image_std", CLIP_STD))
        resample = _get(ip, "resample", 3)
        interp = _PIL_MODES.get(int(getattr(resample, "value", resample)), "bicubic")
        return cls(resize_mode=mode, size=target, crop_size=crop, mean=mean, std=std, interpolation=interp)

    @classmethod
    def clip(cls, size: int = 224) -> ImageTransform:
        """The CLIP/PickScore preprocessing at ``size`` (shortest side, crop, CLIP normalisation)."""
        return cls("shortest", size, size, CLIP_MEAN, CLIP_STD)

    @classmethod
    def hps(cls, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> ImageTransform:
        """HPSv2's preprocessing: longest side to ``size``, zero-pad, normalise."""
        return cls("longest_pad", size, None, mean, std)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    if value is None:
        return default
    if not isinstance(value, (int, float, str, bool, tuple, list, dict)):
        try:  # transformers' SizeDict iterates as (key, value) pairs of its set fields
            value = dict(value)
        except (TypeError, ValueError):
            return value
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
    return value
