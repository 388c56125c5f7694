"""What a sampling run produces and stores: the sampler's settings (:class:`SamplerSpec`) and the
:class:`Trajectory` (every state, the per-step Gaussians and log-probs, and what recomputing them needs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from visalign.errors import SamplerError
from visalign.pipelines.base import Conditioning, Geometry, Policy, Schedule
from visalign.sampling.options import SAMPLERS, default_eta

__all__ = ["SamplerSpec", "Trajectory"]


@dataclass(frozen=True)
class SamplerSpec:
    """How transitions are drawn. Stored in every Trajectory so log-probs are recomputed identically.

    Attributes:
        sampler: ``"ode"``, ``"sde"``, ``"cps"`` or ``"ddim"`` (resolved per family by :meth:`resolve`).
        noise: the flow SDE's diffusion coefficient, ``"flow"`` (Flow-GRPO) or ``"dance"`` (DanceGRPO).
        eta: the noise level (η for sde/ddim, the angle fraction a for cps).
        reduce: log-prob reduction over non-batch dims, ``"mean"`` (default) or ``"sum"``.
        window: ``(start, end)`` step indices where the sampler is stochastic; the ODE runs elsewhere.
            None means every step.
        num_steps: the schedule's length S. The last step (S−1) is always deterministic: it lands
            on the clean prediction x̂0 (the ODE's last step), so no noise is left in the output;
            it carries no log-prob and is never trained (docs/math.md §1, "The last step").
    """

    sampler: str = "sde"
    noise: str = "flow"
    eta: float = 0.7
    reduce: str = "mean"
    window: tuple[int, int] | None = None
    num_steps: int | None = None

    @staticmethod
    def resolve(
        policy: Policy, sampler: str, noise: str, eta: float | None, reduce: str, window, num_steps: int
    ) -> SamplerSpec:
        """Validates the options for ``policy`` and fills the defaults."""
        if sampler not in SAMPLERS:
            raise SamplerError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
        if policy.is_flow and sampler == "ddim":
            raise SamplerError(
                f"sampler='ddim' is for DDPM families; {policy.family} is a flow model: use 'sde' or 'cps'."
            )
        if not policy.is_flow:
            if sampler == "cps":
                raise SamplerError(f"sampler='cps' is for flow models; {policy.family} is a DDPM model: use 'ddim'.")
            sampler = "ddim" if sampler == "sde" else sampler
        if noise not in ("flow", "dance"):
            raise SamplerError(f"Unknown SDE noise {noise!r}; use noise='flow' (Flow-GRPO) or 'dance' (DanceGRPO).")
        if reduce not in ("mean", "sum"):
            raise SamplerError(f"Unknown log-prob reduction {reduce!r}; use 'mean' or 'sum'.")
        if eta is None:
            eta = default_eta(sampler, noise)
        if eta < 0:
            raise SamplerError(f"eta must be >= 0, got {eta}.")
        if window is not None:
            start, end = (int(window[0]), int(window[1]))
            if not 0 <= start < end <= num_steps:
                raise SamplerError(
                    f"sde_window={tuple(window)} must satisfy 0 <= start < end <= num_steps={num_steps}."
                )
            window = (start, end)
        return SamplerSpec(sampler, noise, float(eta), reduce, window, int(num_steps))

    def kind_at(self, step: int) -> str:
        """The transition used at ``step``: the sampler inside the window and before the last step, else ``"ode"``."""
        if self.window is not None and not self.window[0] <= step < self.window[1]:
            return "ode"
        if self.num_steps is not None and step == self.num_steps - 1:
            return "ode"
        if self.eta == 0:  # zero noise is the ODE, bit for bit (CPS's x̂0/x̂1 form only equals it up to rounding)
            return "ode"
        return self.sampler


@dataclass
class Trajectory:
    """One batch of sampled trajectories, with everything needed to recompute log-probs.

    Attributes:
        images: decoded output in [0, 1], (B, 3, H, W) or (B, T, 3, H, W); None if not decoded.
        latents: every state, (B, S+1, ...) in the denoiser's layout; ``latents[:, 0]`` is the noise.
        log_probs: (B, S) float32 log-prob of each transition; 0 where ``sde_mask`` is False.
            None for the ODE sampler.
        means: (B, S, ...) the Gaussian mean of each transition.
        stds: (S,) the std of each transition (0 for deterministic steps).
        sde_mask: (S,) bool, the steps that carry a log-prob (std > 0).
        schedule: the σ table (flow) or ᾱ table (DDPM) and the timesteps used, as at rollout.
        x0: (B, S, ...) each step's clean prediction x̂0, when ``return_x0=True``.
        prompts: the B prompts (group-expanded).
        conditioning: the encoded prompts (and I2V images), reused by :func:`log_prob`.
        geometry: the pixel size; ``cond_images``: the I2V first frames, (B, 3, H, W), or None.
        spec: the :class:`SamplerSpec`; ``group_size``: samples per prompt.
    """

    images: torch.Tensor | None
    latents: torch.Tensor
    log_probs: torch.Tensor | None
    means: torch.Tensor
    stds: torch.Tensor
    sde_mask: torch.Tensor
    schedule: Schedule
    prompts: list[str]
    conditioning: Conditioning
    geometry: Geometry
    spec: SamplerSpec
    x0: torch.Tensor | None = None
    cond_images: torch.Tensor | None = None
    group_size: int = 1

    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule.timesteps

    @property
    def sigmas(self) -> torch.Tensor | None:
        return self.schedule.sigmas

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    def select(self, index) -> Trajectory:
        """The trajectories of the samples at ``index`` (a slice, list or long tensor)."""
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[index.to(t.device) if isinstance(index, torch.Tensor) else index]  # noqa: E731
        positions = range(len(self.prompts))[index] if isinstance(index, slice) else index.tolist()
        return dataclasses.replace(
            self,
            images=pick(self.images),
            latents=pick(self.latents),
            log_probs=pick(self.log_probs),
            means=pick(self.means),
            x0=pick(self.x0),
            cond_images=pick(self.cond_images),
            prompts=[self.prompts[i] for i in positions],
            conditioning=self.conditioning.select(index),
        )

    @staticmethod
    def cat(items: Sequence[Trajectory]) -> Trajectory:
        """Concatenates trajectories sampled with the same settings along the batch."""
        first = items[0]
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(t, name) for t in items])  # noqa: E731
        return dataclasses.replace(
            first,
            images=cat("images"),
            latents=cat("latents"),
            log_probs=cat("log_probs"),
            means=cat("means"),
            x0=cat("x0"),
            cond_images=cat("cond_images"),
            prompts=[p for t in items for p in t.prompts],
            conditioning=Conditioning.cat([t.conditioning for t in items]),
        )
