"""DRaFT's pure pieces (docs/math.md §5): the loss and the placement of the gradient window.

DRaFT is Clark et al., arXiv 2309.17400; the random truncation is AlignProp's (Prabhudesai et al.,
arXiv 2310.03739).
"""

from __future__ import annotations

import torch

from visalign.errors import ConfigError

__all__ = ["draft_loss", "grad_window"]


def draft_loss(rewards: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """loss = −Σ r / total (−mean(r) for one batch; ``total`` is the whole step's batch for micro-batches)."""
    return -rewards.float().sum() / (rewards.shape[0] if total is None else total)


def grad_window(num_steps: int, truncation: int | None, mode: str, generator: torch.Generator | None) -> int:
    """The first step of the gradient window: the window is ``[start, num_steps)``, one contiguous block.

    Args:
        num_steps: S.
        truncation: K, or None for the full chain.
        mode: ``"fixed"`` (the last K steps) or ``"random"`` (the last K' steps, K' uniform in [1, K]).
        generator: the draw's random source (drawn once per rollout).
    """
    k = num_steps if truncation is None else truncation
    if not 1 <= k <= num_steps:
        raise ConfigError(f"truncation={truncation} must be in [1, num_steps={num_steps}].")
    if mode == "random":
        k = int(torch.randint(1, k + 1, (1,), generator=generator))
    elif mode != "fixed":
        raise ConfigError(f"truncation_mode must be 'fixed' or 'random'; got {mode!r}.")
    return num_steps - k
