"""Simple rewards that need no model: plain differentiable callables of the reward signature.

- :func:`brightness`: the mean pixel value of each sample, the reward that the ``brightness``
  recipe type (``visalign train``/``steer``/``score --reward brightness``) and the smoke tests use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["brightness"]


def brightness(images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """Mean pixel value per sample: the simplest reward, for smoke tests and first runs.

    Args:
        images: ``(B, C, H, W)`` images or ``(B, F, C, H, W)`` videos in [0, 1].
        prompts: ignored; accepted so that it is a plain-callable reward.

    Returns:
        `torch.Tensor`: ``(B,)`` float rewards, differentiable with respect to ``images``.
    """
    return images.float().flatten(1).mean(1)
