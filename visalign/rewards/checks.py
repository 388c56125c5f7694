"""Input and output checks every reward call goes through: pixels, prompts and scores.

A bad batch raises :class:`~visalign.errors.InvalidInputError` naming the reward and saying how to
fix the input; a reward that returns anything but B finite numbers raises
:class:`~visalign.errors.RewardError` at once, instead of a NaN loss later.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from visalign.errors import InvalidInputError, RewardError

__all__ = ["RANGE_TOLERANCE", "check_images", "check_prompts", "check_scores"]

RANGE_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- validation
def check_images(images: Any, kind: str = "image", *, name: str = "reward", check_range: bool = True) -> torch.Tensor:
    """Checks that ``images`` is a float pixel batch in [0, 1] and returns it unchanged.

    Args:
        images: the tensor to check.
        kind: ``"image"`` for (B, 3, H, W), ``"video"`` for (B, T, 3, H, W), ``"any"`` for either.
        name: the reward's name, for the message.
        check_range: also check that values lie in [0, 1] (costs a min/max; a device sync on GPU).

    Raises:
        InvalidInputError: the tensor has the wrong type, dtype, rank, channel count or range.
    """
    where = f"{name}: "
    if not isinstance(images, torch.Tensor):
        raise InvalidInputError(
            f"{where}images must be a torch.Tensor of floats in [0, 1] shaped (B, 3, H, W) "
            f"(or (B, T, 3, H, W) for video); got {type(images).__name__}. Convert PIL/numpy "
            "images with torch.from_numpy(np.asarray(img)).permute(2, 0, 1) / 255."
        )
    if not images.is_floating_point():
        hint = " Divide uint8 images by 255." if images.dtype == torch.uint8 else ""
        raise InvalidInputError(f"{where}images must be floating point in [0, 1]; got dtype {images.dtype}.{hint}")
    expected = {"image": "(B, 3, H, W)", "video": "(B, T, 3, H, W)", "any": "(B, 3, H, W) or (B, T, 3, H, W)"}[kind]
    ranks = {"image": (4,), "video": (5,), "any": (4, 5)}[kind]
    shape = tuple(images.shape)
    if images.dim() not in ranks:
        if kind == "image" and images.dim() == 5:
            raise InvalidInputError(
                f"{where}this is an image reward and expects {expected}, but got a video batch of "
                f"shape {shape}. Wrap it: SegmentalVideoReward(reward, segments=4) scores videos "
                "frame by frame."
            )
        if kind == "video" and images.dim() == 4:
            raise InvalidInputError(
                f"{where}this is a video reward and expects {expected}; got {shape}. For a batch of "
                "single frames use images[:, None]."
            )
        hint = " Add the batch dimension with images[None]." if images.dim() in (3, 4) else ""
        raise InvalidInputError(
            f"{where}expected images shaped {expected}; got rank {images.dim()} with shape {shape}.{hint}"
        )
    channels = shape[-3]
    if channels != 3:
        if shape[-1] == 3:
            hint = (
                " The tensor looks channels-last: move channels with .permute(0, 3, 1, 2) "
                "(video: .permute(0, 1, 4, 2, 3))."
            )
        elif channels == 1:
            hint = " For grayscale, repeat the channel: images.expand(..., 3, H, W)."
        elif channels == 4:
            hint = " Drop the alpha channel: images[..., :3, :, :]."
        else:
            hint = ""
        raise InvalidInputError(
            f"{where}expected 3 (RGB) channels at dim -3 of {expected}; got {channels} in shape {shape}.{hint}"
        )
    if shape[0] == 0:
        raise InvalidInputError(f"{where}got an empty batch (shape {shape}).")
    if check_range:
        with torch.no_grad():
            lo, hi = torch.aminmax(images.detach())
            lo, hi = float(lo), float(hi)
        if math.isnan(lo) or math.isnan(hi):
            raise InvalidInputError(f"{where}images contain NaN.")
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            if lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE:
                hint = (
                    " They look like [-1, 1] (a VAE decoder's raw output): map them with "
                    "(images + 1) / 2, or clamp to [0, 1]."
                )
            elif lo >= 0 and hi <= 255:
                hint = " They look like [0, 255]: divide by 255."
            else:
                hint = " Clamp or rescale them to [0, 1]."
            raise InvalidInputError(f"{where}image values must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g}.{hint}")
    return images


def check_prompts(prompts: Any, batch: int, *, name: str = "reward", required: bool = True) -> list[str] | None:
    """Checks that ``prompts`` is a list of ``batch`` strings and returns it as a list.

    Args:
        prompts: a list or tuple of strings, one per image; ``None`` when ``required`` is False.
        batch: the number of images.
        name: the reward's name, for the message.
        required: whether the reward uses prompts at all.

    Raises:
        InvalidInputError: a bare string, an empty list, a non-string item or a length mismatch.
    """
    where = f"{name}: "
    if prompts is None:
        if required:
            raise InvalidInputError(f"{where}needs prompts: a list of {batch} strings, one per image.")
        return None
    if isinstance(prompts, str):
        raise InvalidInputError(
            f"{where}prompts must be a list of strings, one per image; got a single str. "
            f"Pass [prompt] * {batch} to use it for every image."
        )
    if not isinstance(prompts, (list, tuple)):
        raise InvalidInputError(f"{where}prompts must be a list of strings; got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise InvalidInputError(f"{where}got an empty prompt list for {batch} image(s); pass one prompt per image.")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InvalidInputError(
            f"{where}every prompt must be a str; item {bad[0]} is {type(prompts[bad[0]]).__name__}."
        )
    if len(prompts) != batch:
        raise InvalidInputError(
            f"{where}got {len(prompts)} prompts for {batch} images; pass exactly one prompt per "
            "image (repeat a prompt for each of its samples)."
        )
    return list(prompts)


def check_scores(scores: Any, batch: int, device: torch.device, *, name: str = "reward") -> torch.Tensor:
    """Checks a reward's output and returns it as float32 on ``device``.

    Raises:
        RewardError: the output is not a number per sample, or contains NaN/inf.
    """
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores)
        except Exception as exc:
            raise RewardError(
                f"reward '{name}' returned {type(scores).__name__}; expected a Tensor of shape ({batch},)."
            ) from exc
    if tuple(scores.shape) != (batch,):
        hint = " Squeeze the last dim with .squeeze(-1)." if tuple(scores.shape) == (batch, 1) else ""
        raise RewardError(
            f"reward '{name}' returned shape {tuple(scores.shape)}; expected ({batch},), one score per sample.{hint}"
        )
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.bool)):
        raise RewardError(f"reward '{name}' returned dtype {scores.dtype}; expected real numbers.")
    scores = scores.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(scores.detach()).all()):
        raise RewardError(f"reward '{name}' returned non-finite values {scores.detach().cpu().tolist()}.")
    return scores
