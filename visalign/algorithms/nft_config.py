"""The options of :class:`~visalign.algorithms.nft.NFTTrainer` (DiffusionNFT, docs/math.md §8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visalign.sampling.options import sampling_field
from visalign.training.config import AdvantageOptions, RolloutConfig, config_field, override_default

__all__ = ["NFTConfig"]


@dataclass
class NFTConfig(AdvantageOptions, RolloutConfig):
    """DiffusionNFT options (docs/math.md §8) on top of :class:`~visalign.training.config.RolloutConfig`.

    The defaults are the official SD3.5-M ones where they carry over: ODE rollouts without CFG,
    global-std advantages clipped to ±5 with a 1e-4 floor, β = 1, decay_type 1, 99% of the rollout's
    noise levels per sample, the base-model penalty 1e-4 and lr 3e-4. Training is always cond-only;
    ``guidance_scale`` (with ``cfg_in_training``) only decides how the old policy samples.
    """

    sampler: Literal["ode", "sde", "cps", "ddim"] = sampling_field("sampler", "ode")
    num_steps: int = sampling_field("num_steps", 10)
    guidance_scale: float | None = sampling_field("guidance_scale", 1.0)
    advantage_std: Literal["group", "global"] = override_default(AdvantageOptions, "advantage_std", "global")
    advantage_clip: float | None = override_default(AdvantageOptions, "advantage_clip", 5.0)
    advantage_eps: float = override_default(AdvantageOptions, "advantage_eps", 1e-4)
    learning_rate: float = override_default(RolloutConfig, "learning_rate", 3e-4)
    beta: float = config_field(
        1.0,
        "NFT strength β: the implicit policies are v_old ± β·(v_θ − v_old); official 1.0 (0.1 for OCR and "
        "multi-reward).",
    )
    kl_beta: float = config_field(
        1e-4,
        "Weight λ of the penalty λ·mean((v_θ − v_base)²) to the base model (official 1e-4); 0 disables it "
        "and saves a forward.",
    )
    decay_type: Literal[0, 1, 2] = config_field(
        1,
        "Old-policy schedule after s optimizer steps: 0: d = 0; 1: d = min(0.001·s, 0.5); 2 (OCR): 0 until "
        "s = 75, then min(0.0075·(s − 75), 0.999).",
    )
    old_decay: float | None = config_field(
        None, "A constant old-policy decay d in [0, 1) instead of decay_type's schedule; None uses decay_type."
    )
    timestep_fraction: float = config_field(
        0.99,
        "Share of the rollout's noise levels each sample trains on, drawn per sample: int(num_steps·fraction) "
        "of them (official 0.99: 9 of 10).",
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.group_size >= 2, "group_size", ">= 2", "Advantages compare the samples of a prompt's group.")
        c(
            not getattr(self, "rollout_ahead", False),
            "rollout_ahead",
            "False",
            "NFT samples each rollout from the old policy, which the look-ahead sampler does not use.",
        )
        c(
            self.advantage_clip is not None,
            "advantage_clip",
            "> 0 (not None)",
            "NFT maps advantages to r = A/advantage_clip/2 + 1/2 and scales its loss by it; the official value is 5.",
        )
        c(self.beta > 0, "beta", "> 0", "The official value is 1.0 (0.1 for OCR); the loss divides by beta.")
        c(self.kl_beta >= 0, "kl_beta", ">= 0", "0 disables the penalty to the base model.")
        c(
            self.old_decay is None or 0 <= self.old_decay < 1,
            "old_decay",
            "in [0, 1) or None",
            "d = 0 makes the old policy the current one after each iteration; d near 1 freezes it.",
        )
        c(
            0 < self.timestep_fraction <= 1,
            "timestep_fraction",
            "in (0, 1]",
            f"It cannot ask for more noise levels than the rollout's {self.num_steps} steps.",
        )
        c(
            int(self.num_steps * self.timestep_fraction) >= 1,
            "timestep_fraction",
            f">= 1/num_steps = {1 / self.num_steps:.3g}",
            "Each sample needs at least one noise level to train on.",
        )

    def num_train_levels(self) -> int:
        """Noise levels each sample trains on: int(num_steps·timestep_fraction)."""
        return int(self.num_steps * self.timestep_fraction)
