"""Weighted sums of named rewards, with optional per-reward running normalisation.

    total = sum_k  w_k * n_k(r_k(images, prompts))

where ``n_k`` is the identity, or, with ``normalize=True``, ``(r - mean_k) / sqrt(var_k + eps)``
under running statistics of reward k (updated with each batch before it is normalised, so the
first batch is normalised by its own statistics). Normalising keeps a reward with a large scale
(PickScore ~ 21, aesthetic ~ 5) from drowning one with a small scale (HPS ~ 0.3).

:meth:`Combined.evaluate` returns a :class:`~visalign.rewards.RewardResult`: the total, every
component (``w_k * n_k(r_k)``, which add up to the total), every raw score ``r_k`` and every weight
``w_k``, for logging and for per-reward advantages. Each member is scored once per call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from visalign.errors import ConfigError
from visalign.rewards.base import Reward, as_reward, call_reward, is_differentiable
from visalign.rewards.result import RewardResult

__all__ = ["Combined", "RunningNorm"]


class RunningNorm(nn.Module):
    """Running mean and variance of a scalar stream, as buffers (saved in ``state_dict``).

    Args:
        momentum: ``None`` (default) pools every sample seen so far (exact
            Chan/Welford merge); a value in (0, 1] gives an exponential moving average that follows
            a drifting reward.
        eps: added to the variance before the square root (default 1e-6).
    """

    def __init__(self, momentum: float | None = None, eps: float = 1e-6):
        super().__init__()
        if momentum is not None and not 0 < momentum <= 1:
            raise ConfigError(f"momentum must be in (0, 1] or None; got {momentum}.")
        self.momentum, self.eps = momentum, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merges the batch ``x`` (any shape) into the statistics."""
        x = x.detach().to(self.mean.device, torch.float64).reshape(-1)
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean(), x.var(unbiased=False)
        if self.count == 0:
            self.mean.copy_(b_mean)
            self.var.copy_(b_var)
        elif self.momentum is None:
            total = self.count + n
            delta = b_mean - self.mean
            m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
            self.mean.add_(delta * n / total)
            self.var.copy_(m2 / total)
        else:
            m = self.momentum
            delta = b_mean - self.mean
            self.mean.add_(m * delta)
            self.var.copy_((1 - m) * self.var + m * b_var + m * (1 - m) * delta**2)
        self.count.add_(n)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps)``; only centred while fewer than 2 samples were seen."""
        mean = self.mean.to(x.device, x.dtype)
        if self.count < 2:
            return x - mean
        return (x - mean) / torch.sqrt(self.var + self.eps).to(x.device, x.dtype)


class Combined(Reward):
    """A weighted sum of named rewards.

    Args:
        rewards: name -> reward, or name -> ``(reward, weight)``; a reward is a
            :class:`Reward` or any callable ``(images, prompts) -> Tensor[B]``; weight defaults
            to 1.
        normalize: normalise each reward by its running statistics (default False).
        momentum: see :class:`RunningNorm`.
        eps: see :class:`RunningNorm` (default 1e-6).
        name (`str`, defaults to ``"combined"``).

    Calling it returns the total (B,). :meth:`evaluate` (and :func:`~visalign.rewards.call_reward`)
    returns a :class:`~visalign.rewards.RewardResult` with the total, the components
    ``w_k * n_k(r_k)``, the raw scores ``r_k`` and the weights ``w_k``; the normalised score of
    reward k is ``components[k] / weights[k]``. Set ``update_stats = False`` (or pass
    ``update_stats=False``) to freeze the running statistics, e.g. for evaluation. Conditioning is
    passed to each reward that takes it. Differentiable when every reward is.

    Example::

        reward = Combined({"clip": (CLIPScore(), 1.0), "aesthetic": (Aesthetic(), 0.5)},
                          normalize=True)
        out = reward.evaluate(images, prompts)
        out.total, out.components["clip"], out.raw["aesthetic"], out.weights["aesthetic"]
    """

    default_name = "combined"
    input_kind = "any"

    def __init__(
        self,
        rewards: Mapping[str, Any],
        *,
        normalize: bool = False,
        momentum: float | None = None,
        eps: float = 1e-6,
        name: str | None = None,
    ):
        if not rewards:
            raise ConfigError("Combined needs at least one reward.")
        members, weights = {}, {}
        for key, value in rewards.items():
            if not isinstance(key, str) or not key or "." in key:
                raise ConfigError(f"reward names must be non-empty strings without '.'; got {key!r}.")
            reward, weight = value if isinstance(value, tuple) else (value, 1.0)
            members[key], weights[key] = reward, float(weight)
        super().__init__(name=name, differentiable=all(map(is_differentiable, members.values())), batch_size=None)
        self.rewards = nn.ModuleDict({k: as_reward(r) for k, r in members.items()})
        self.weights = weights
        self.needs_prompts = any(getattr(r, "needs_prompts", True) for r in self.rewards.values())
        self.normalize = normalize
        self.norms = nn.ModuleDict({k: RunningNorm(momentum, eps) for k in members}) if normalize else None
        self.update_stats = True

    @property
    def accepted_conditioning(self) -> set[str] | None:
        keys = {"update_stats"}
        for reward in self.rewards.values():
            accepted = reward.accepted_conditioning
            if accepted is None:
                return None
            keys |= accepted
        return keys

    def non_differentiable(self) -> list[str]:
        """The names of the members through which no gradient flows."""
        return [key for key, reward in self.rewards.items() if not is_differentiable(reward)]

    def score_parts(
        self, images: torch.Tensor, prompts: list[str] | None, *, update_stats: bool | None = None, **conditioning
    ) -> RewardResult:
        update = self.update_stats if update_stats is None else update_stats
        raw, comps = {}, {}
        for key, reward in self.rewards.items():
            r = call_reward(reward, images, prompts, **conditioning).total
            raw[key] = r
            if self.norms is not None:
                if update:
                    self.norms[key].update(r)
                r = self.norms[key].normalize(r)
            comps[key] = self.weights[key] * r
        total = torch.stack(list(comps.values())).sum(0)
        return RewardResult(total, comps, raw, dict(self.weights))

    def score(self, images: torch.Tensor, prompts: list[str] | None, **conditioning) -> torch.Tensor:
        return self.score_parts(images, prompts, **conditioning).total
