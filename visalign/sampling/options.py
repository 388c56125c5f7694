"""The one home of the sampling options: their names, defaults, types and help, written once.

:class:`SamplingOptions` is what every sampling entry point shares. :func:`visalign.sample` and the
steering functions take its fields as keywords (their defaults come from here), every trainer
config inherits its fields flat (``va.GRPOConfig(num_steps=10, eta=0.7)``, ``num_steps: 10`` in a
YAML recipe), and the CLI builds its sampling flags from the field metadata. Flat rather than
nested, because recipes, overrides (``eta=0.5``) and users' code already spell them flat, and a
trainer config is one list of keys that ``describe()`` prints in one table.

An algorithm that needs a different default redeclares the field with :func:`sampling_field`,
which keeps the help text::

    @dataclass
    class MyConfig(RolloutConfig):
        num_steps: int = sampling_field("num_steps", 10)

The SDE window is a schedule, so that trainers can move it between iterations
(:meth:`SamplingOptions.sde_window_at`); ``va.sample(sde_window=(start, end))`` is a fixed window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from visalign.config import ConfigBase, config_field, override_default

__all__ = ["DEFAULT_ETA", "SAMPLERS", "SamplingOptions", "sampling_field"]

SAMPLERS = ("ode", "sde", "cps", "ddim")
# η when ``eta=None``: keyed by (sampler, noise) for the flow SDE, by sampler otherwise.
DEFAULT_ETA = {("sde", "flow"): 0.7, ("sde", "dance"): 0.3, "cps": 0.8, "ddim": 1.0}


def default_eta(sampler: str, noise: str) -> float:
    """The noise level used when ``eta`` is None (0 for the ODE)."""
    return DEFAULT_ETA.get((sampler, noise), DEFAULT_ETA.get(sampler, 0.0))


def _eta_defaults_text() -> str:
    return ", ".join(f"{'/'.join(k) if isinstance(k, tuple) else k} {v:g}" for k, v in DEFAULT_ETA.items())


@dataclass
class SamplingOptions(ConfigBase):
    """How trajectories are sampled (see :func:`visalign.sample` and docs/math.md §1)."""

    num_steps: int = config_field(20, "Denoising steps per sample.", metadata={"flags": ("--steps", "--num-steps")})
    guidance_scale: float | None = config_field(
        None, "CFG scale (FLUX.1-dev: the embedded guidance); None uses the family's default."
    )
    sampler: Literal["ode", "sde", "cps", "ddim"] = config_field(
        "sde",
        "Transition: ode, sde (the flow SDE; DDIM with η on SD/SDXL), cps (Flow-GRPO's "
        "coefficient-preserving step) or ddim (DDPO); only sde, cps and ddim have log-probs.",
    )
    noise: Literal["flow", "dance"] = config_field(
        "flow", "The flow SDE's diffusion coefficient: flow (Flow-GRPO, g = η·√(σ/(1−σ))) or dance (DanceGRPO, g = η)."
    )
    eta: float | None = config_field(
        None, f"Noise level (the angle fraction for cps); 0 gives the ODE; None uses {_eta_defaults_text()}."
    )
    same_noise_in_group: bool = config_field(
        False,
        "Share the initial noise within each group of samples of one prompt (DanceGRPO).",
        metadata={"cli": False},
    )
    log_prob_reduce: Literal["mean", "sum"] = config_field(
        "mean",
        "Log-prob reduction over the latent dimensions: mean (the peers' default; clip ranges carry over "
        "across resolutions) or sum (the joint density).",
        metadata={"cli": False},
    )
    sde_window_size: int | None = config_field(
        None,
        "Run the SDE only in a window of this many steps (ODE elsewhere; Flow-GRPO-Fast, MixGRPO); None: every step.",
        metadata={"cli": False},
    )
    sde_window_mode: Literal["fixed", "sliding", "random", "mixgrpo"] = config_field(
        "fixed",
        "Window placement over training iterations: fixed start; sliding (moves one step every "
        "sde_window_shift_every iterations, wraps around at full size); random (start drawn uniformly per iteration, "
        "the same on every rank: Flow-GRPO-Fast); mixgrpo (slides like sliding but shrinks at the end of the range, "
        "[start, min(start+size, hi)), then rolls back: MixGRPO).",
        metadata={"cli": False},
    )
    sde_window_start: int = config_field(
        0, "First step of a fixed window (and of the sliding window's first position).", metadata={"cli": False}
    )
    sde_window_shift_every: int = config_field(
        1, "Iterations between sliding-window moves (MixGRPO: 25).", metadata={"cli": False}
    )
    sde_window_range: tuple[int, int] | None = config_field(
        None,
        "Steps [lo, hi) the window stays within: random draws the start from [lo, hi−size] (Flow-GRPO-Fast: "
        "(0, num_steps//2)), sliding and mixgrpo move through it; None: the whole schedule [0, num_steps) "
        "(mixgrpo: [0, num_steps−1), the last step being always the ODE). Keep hi <= num_steps−1 for exactly "
        "size stochastic steps.",
        metadata={"cli": False},
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.num_steps >= 1, "num_steps", ">= 1")
        c(self.eta is None or self.eta >= 0, "eta", ">= 0 or None", "None uses the sampler's default.")
        c(
            self.sde_window_size is None or 1 <= self.sde_window_size <= self.num_steps,
            "sde_window_size",
            f"in [1, num_steps={self.num_steps}] or None",
            "None makes every step stochastic.",
        )
        c(self.sde_window_start >= 0, "sde_window_start", ">= 0")
        c(self.sde_window_shift_every >= 1, "sde_window_shift_every", ">= 1")
        if self.sde_window_range is not None:
            lo, hi = self.sde_window_range
            c(
                self.sde_window_size is not None,
                "sde_window_range",
                "None without sde_window_size",
                "Set sde_window_size too (Flow-GRPO-Fast: 3).",
            )
            size = self.sde_window_size or 1
            c(
                0 <= lo and lo + size <= hi <= self.num_steps,
                "sde_window_range",
                f"(lo, hi) with 0 <= lo, lo + sde_window_size <= hi <= num_steps={self.num_steps}",
                f"Flow-GRPO-Fast uses (0, num_steps//2) = (0, {self.num_steps // 2}).",
            )

    @classmethod
    def sampling_field_names(cls) -> list[str]:
        """The keys of the sampling options (what a trainer config inherits from here)."""
        return [f.name for f in dataclasses.fields(SamplingOptions)]

    def sampling_options(self) -> SamplingOptions:
        """These options as a plain :class:`SamplingOptions` (a trainer config keeps its other keys)."""
        return SamplingOptions(**{k: getattr(self, k) for k in self.sampling_field_names()})

    def sde_window_bounds(self) -> tuple[int, int]:
        """The range [lo, hi) the SDE window stays within: ``sde_window_range`` or its default."""
        if self.sde_window_range is not None:
            return tuple(self.sde_window_range)
        size = self.sde_window_size or 1
        return 0, self.num_steps - (1 if self.sde_window_mode == "mixgrpo" and self.num_steps > size else 0)

    def sde_window_last_start(self) -> int | None:
        """The latest step any window of the schedule starts at (None without a window)."""
        if self.sde_window_size is None:
            return None
        lo, hi = self.sde_window_bounds()
        if self.sde_window_mode == "fixed":
            return min(max(self.sde_window_start, lo), hi - self.sde_window_size)
        return hi - 1 if self.sde_window_mode == "mixgrpo" else hi - self.sde_window_size

    def sde_window_at(self, iteration: int, seed: int = 0) -> tuple[int, int] | None:
        """The SDE window ``(start, end)`` of training iteration ``iteration`` (None: every step).

        Within the range [lo, hi) (``sde_window_range``; see its help for the default), with
        W = ``sde_window_size`` and k = ``iteration // sde_window_shift_every``:

        - ``fixed``: start = ``sde_window_start`` (clamped to [lo, hi−W]);
        - ``sliding``: start = lo + (s0 − lo + k) mod (hi−W−lo+1), s0 the clamped ``sde_window_start``;
          the window keeps its size and wraps around;
        - ``random``: start uniform on [lo, hi−W], drawn from ``(seed, iteration)``, so the same on
          every rank (Flow-GRPO-Fast);
        - ``mixgrpo``: start = lo + (s0 − lo + k) mod (hi−lo), window [start, min(start+W, hi)): it
          shrinks near hi and rolls back to lo once it would be empty (MixGRPO, docs/math.md §10).
        """
        if self.sde_window_size is None:
            return None
        size, mode = self.sde_window_size, self.sde_window_mode
        lo, hi = self.sde_window_bounds()
        first = min(max(self.sde_window_start, lo), hi - size)
        shifts = iteration // self.sde_window_shift_every
        if mode == "fixed":
            start = first
        elif mode == "sliding":
            start = lo + (first - lo + shifts) % (hi - size - lo + 1)
        elif mode == "mixgrpo":
            start = lo + (first - lo + shifts) % (hi - lo)
            return (start, min(start + size, hi))
        else:
            g = torch.Generator().manual_seed(seed * 7919 + iteration)
            start = lo + int(torch.randint(hi - size - lo + 1, (1,), generator=g))
        return (start, start + size)

    def sample_kwargs(self, iteration: int = 0, seed: int = 0) -> dict[str, Any]:
        """The keywords of :func:`visalign.sample` these options stand for (the window of ``iteration``)."""
        return dict(
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            sampler=self.sampler,
            noise=self.noise,
            eta=self.eta,
            same_noise_in_group=self.same_noise_in_group,
            reduce=self.log_prob_reduce,
            sde_window=self.sde_window_at(iteration, seed),
        )


DEFAULTS = SamplingOptions()


def sampling_field(name: str, default: Any) -> Any:
    """A redeclaration of the sampling option ``name`` with another default and the same help."""
    return override_default(SamplingOptions, name, default)
