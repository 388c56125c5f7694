"""What scoring a batch returns inside visalign: the total and its named parts.

``reward(images, prompts)`` returns a tensor (B,), and that stays the public contract: any plain
callable is a reward. Inside visalign, trainers, steering and the CLI call every reward through
:func:`~visalign.rewards.call_reward`, which returns a :class:`RewardResult`::

    result = call_reward(reward, images, prompts)
    result.total                      # (B,) float32: what the reward returns when called
    result.components["clip"]         # (B,) weight · (normalised) score of the part "clip"
    result.raw["clip"]                # (B,) the part's own score, unweighted
    result.weights["clip"]            # its weight

For a reward with parts (:class:`~visalign.rewards.Combined`, the heads of a
:class:`~visalign.rewards.MultiHeadVideoReward`) the components add up to ``total`` and
``components``, ``raw`` and ``weights`` have the same keys. A single reward has no parts: the
three dicts are empty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["RewardResult"]


@dataclass
class RewardResult:
    """The scores of one batch, with their named parts.

    Attributes:
        total: (B,) float32, the reward of each sample.
        components: name → (B,) weighted part; they add up to ``total``.
            Empty for a reward without parts.
        raw: name → (B,) each part's own score, before weighting (and
            before any normalisation). Empty for a reward without parts.
        weights: name → the weight of each component. Empty for a reward
            without parts. With normalisation off, ``components[k] == weights[k] * raw[k]``.
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RewardResult:
        """A new result with ``fn`` applied to every tensor (the weights are copied)."""
        return RewardResult(
            fn(self.total),
            {k: fn(v) for k, v in self.components.items()},
            {k: fn(v) for k, v in self.raw.items()},
            dict(self.weights),
        )

    def select(self, index) -> RewardResult:
        """The rows at ``index`` (an int slice, a list, or a bool/long tensor) of every tensor."""
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(index, torch.Tensor):
            return self._map(lambda t: t[index.to(t.device)])
        return self._map(lambda t: t[index])

    def detach(self) -> RewardResult:
        """Every tensor detached from the graph (for logging, or as advantages)."""
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> RewardResult:
        """Every tensor moved with ``Tensor.to(*args, **kwargs)``, e.g. ``result.to("cpu")``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def float(self) -> RewardResult:
        """Every tensor as float32."""
        return self._map(torch.Tensor.float)

    @staticmethod
    def cat(results: Sequence[RewardResult]) -> RewardResult:
        """Concatenates the results of consecutive chunks of one batch (same parts, same weights)."""
        results = list(results)
        if not results:
            raise ValueError("RewardResult.cat needs at least one result.")
        first = results[0]
        for r in results[1:]:
            if r.components.keys() != first.components.keys() or r.raw.keys() != first.raw.keys():
                raise ValueError(
                    f"cannot concatenate results with different parts: "
                    f"{sorted(first.components)} and {sorted(r.components)}."
                )
        return RewardResult(
            torch.cat([r.total for r in results]),
            {k: torch.cat([r.components[k] for r in results]) for k in first.components},
            {k: torch.cat([r.raw[k] for r in results]) for k in first.raw},
            dict(first.weights),
        )
