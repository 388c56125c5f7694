"""The options of :class:`~visalign.algorithms.awm.AWMTrainer` (Advantage Weighted Matching, docs/math.md §9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visalign.losses.awm import num_usable_strata
from visalign.sampling.options import sampling_field
from visalign.training.config import AdvantageOptions, RolloutConfig, config_field, override_default

__all__ = ["AWMConfig"]

DEFAULT_STRATA = 6


@dataclass
class AWMConfig(AdvantageOptions, RolloutConfig):
    """AWM options (docs/math.md §9) on top of :class:`~visalign.training.config.RolloutConfig`.

    The defaults are the official SD3.5-M GenEval ones where they carry over: 14 ODE steps without
    CFG (the official PickScore setting; GenEval/OCR use a stochastic SA-Solver, any of our samplers
    works), global-std advantages clipped to ±5 and divided by 5, 6 strata of the rollout's steps
    without σ = 1, ghuber weighting with p = 0.25, clip range 1, base anchor 1e-3, EMA anchor 1
    with d = min(0.3, 0.001·s), lr 3e-4. Training is always cond-only.
    """

    sampler: Literal["ode", "sde", "cps", "ddim"] = sampling_field("sampler", "ode")
    num_steps: int = sampling_field("num_steps", 14)
    guidance_scale: float | None = sampling_field("guidance_scale", 1.0)
    advantage_std: Literal["group", "global"] = override_default(AdvantageOptions, "advantage_std", "global")
    advantage_clip: float | None = override_default(AdvantageOptions, "advantage_clip", 5.0)
    advantage_eps: float = override_default(AdvantageOptions, "advantage_eps", 1e-4)
    learning_rate: float = override_default(RolloutConfig, "learning_rate", 3e-4)
    time_sampling: Literal["discrete_wo_init", "discrete"] = config_field(
        "discrete_wo_init",
        "Noise-level draw over the rollout's step indices: K strata of [1, ⌊S·fraction⌋) "
        "(discrete_wo_init, never σ = 1; GenEval/OCR) or of [0, ⌊S·fraction⌋) (discrete; PickScore).",
    )
    num_strata: int | None = config_field(
        None,
        "K, the noise levels per sample (one per stratum, shared by a micro-batch); None: 6, or as many as "
        "the steps allow.",
    )
    timestep_fraction: float = config_field(
        0.9, "The strata cover step indices below ⌊num_steps·fraction⌋ (official 0.9: 12 of 14)."
    )
    weighting: Literal["ghuber", "uniform"] = config_field(
        "ghuber", "ℓ = −σ·((m+1e-10)^p − 1e-10^p)/p (ghuber, official) or ℓ = −m (uniform), m the matching error."
    )
    ghuber_power: float = config_field(0.25, "The power p of the ghuber weighting (p = 1 gives σ·m).")
    clip_range: float = config_field(
        1.0,
        "PPO clip ε on ρ = exp(ℓ − ℓ_old); official 1, i.e. [0, 2]. On-policy ρ = 1, so it only binds on "
        "later updates of a rollout.",
    )
    ref_beta: float = config_field(
        1e-3,
        "Weight of the anchor mean((v_θ − v_base)²) to the base model (official 1e-3 GenEval, 3e-3 OCR, "
        "1e-4 PickScore); 0 disables it and saves a forward.",
    )
    ema_anchor_beta: float = config_field(
        1.0, "Weight of the anchor mean((v_θ − v_ema)²) to an EMA of the policy (official 1); 0 disables it."
    )
    ema_anchor_rate: float = config_field(
        1e-3, "The EMA anchor's decay grows as d = min(ema_anchor_max, rate·s) with the optimizer steps s."
    )
    ema_anchor_max: float = config_field(0.3, "The cap of the EMA anchor's decay (official 0.3).")

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.group_size >= 2, "group_size", ">= 2", "Advantages compare the samples of a prompt's group.")
        c(
            self.advantage_clip is not None,
            "advantage_clip",
            "> 0 (not None)",
            "AWM rescales advantages to clip(A, ±advantage_clip)/advantage_clip; the official value is 5.",
        )
        c(0 < self.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]")
        usable = num_usable_strata(self.num_steps, self.timestep_fraction, self.time_sampling)
        c(
            usable >= 1,
            "num_steps",
            f"large enough to leave a step index for {self.time_sampling}",
            f"{self.time_sampling} with timestep_fraction={self.timestep_fraction} uses indices below "
            f"{int(self.num_steps * self.timestep_fraction)}; use more steps.",
        )
        c(
            self.num_strata is None or 1 <= self.num_strata <= usable,
            "num_strata",
            f"in [1, {usable}] or None",
            f"{self.num_steps} steps leave {usable} step indices for {self.time_sampling}; a stratum needs at least one.",
        )
        c(self.ghuber_power > 0, "ghuber_power", "> 0", "AWM uses 0.25.")
        c(self.clip_range > 0, "clip_range", "> 0", "AWM uses 1.")
        c(self.ref_beta >= 0, "ref_beta", ">= 0", "0 disables the base anchor.")
        c(self.ema_anchor_beta >= 0, "ema_anchor_beta", ">= 0", "0 disables the EMA anchor.")
        c(self.ema_anchor_rate >= 0, "ema_anchor_rate", ">= 0")
        c(0 <= self.ema_anchor_max < 1, "ema_anchor_max", "in [0, 1)", "AWM uses 0.3.")

    def strata(self) -> int:
        """K: ``num_strata``, or 6 capped by what the steps allow."""
        if self.num_strata is not None:
            return self.num_strata
        return min(DEFAULT_STRATA, num_usable_strata(self.num_steps, self.timestep_fraction, self.time_sampling))
