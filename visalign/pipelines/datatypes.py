"""The small data types a Policy hands the sampler: the output size (:class:`Geometry`), the
discretisation of one run (:class:`Schedule`) and the encoded prompts (:class:`Conditioning`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Conditioning", "Geometry", "Schedule"]


@dataclass(frozen=True)
class Geometry:
    """The pixel size of what is generated. ``num_frames`` is None for images."""

    height: int
    width: int
    num_frames: int | None = None


@dataclass
class Schedule:
    """The discretisation used by one sampling run, read from the scheduler (never re-derived).

    Attributes:
        timesteps: (S,) float32, the scheduler's timesteps (σ·1000 for flow, integer t for DDPM).
        sigmas: (S+1,) float32 σ table for rectified flow, ending at the final σ; None for DDPM.
        alphas_cumprod: (S,) ᾱ_t of each step, DDPM only.
        alphas_cumprod_prev: (S,) ᾱ of each step's target (the scheduler's ``prev_timestep``), DDPM only.
        clip_sample: DDIM's x̂0 clamp range, or None when the scheduler does not clip.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None
    alphas_cumprod_prev: torch.Tensor | None = None
    clip_sample: float | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def is_flow(self) -> bool:
        return self.sigmas is not None

    def noise_level(self, step) -> torch.Tensor:
        """The noise level of the state at ``step``: σ (flow) or ᾱ_t (DDPM), as :meth:`Policy.add_noise` takes it."""
        return self.sigmas[step] if self.is_flow else self.alphas_cumprod[step]

    def to(self, device) -> Schedule:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def _map_batched(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_batched(v, fn) for k, v in value.items()}
    return value


def _cat_batched(values: Sequence):
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(values), dim=0)
    if isinstance(first, dict):
        return {k: _cat_batched([v[k] for v in values]) for k in first}
    return first


@dataclass
class Conditioning:
    """Everything the denoiser needs besides the latents and the timestep, for a batch.

    Attributes:
        cond: keyword tensors for the conditional branch, batch first (nested dicts allowed).
        uncond: the same for the unconditional/negative branch, or None when there is no CFG.
        guidance_scale: the CFG scale applied as ``u + s·(c − u)`` when ``uncond`` is set.
        shared: keyword values that are not batched (e.g. FLUX's position ids).
    """

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None
    guidance_scale: float = 1.0
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def do_cfg(self) -> bool:
        return self.uncond is not None

    def __len__(self) -> int:
        def first_len(d):
            for v in d.values():
                if isinstance(v, torch.Tensor):
                    return v.shape[0]
                if isinstance(v, dict):
                    n = first_len(v)
                    if n is not None:
                        return n
            return None

        return first_len(self.cond)

    def _map(self, fn) -> Conditioning:
        return dataclasses.replace(
            self,
            cond=_map_batched(self.cond, fn),
            uncond=None if self.uncond is None else _map_batched(self.uncond, fn),
        )

    def select(self, index) -> Conditioning:
        """The conditioning of the samples at ``index`` (an int tensor, list or slice)."""
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        return self._map(lambda t: t[index.to(t.device) if isinstance(index, torch.Tensor) else index])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each sample repeated ``repeats`` times in place (prompt p → rows p·G … p·G+G−1)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenates conditionings of the same policy and settings along the batch."""
        first = items[0]
        return dataclasses.replace(
            first,
            cond=_cat_batched([c.cond for c in items]),
            uncond=None if first.uncond is None else _cat_batched([c.uncond for c in items]),
        )
