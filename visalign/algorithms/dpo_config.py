"""The options of :class:`~visalign.algorithms.dpo.DPOTrainer` (Diffusion-DPO, Flow-DPO, SFT, Flow-RWR)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visalign.sampling.options import sampling_field
from visalign.training.config import RolloutConfig, config_field, override_default

__all__ = ["DPOConfig"]


@dataclass
class DPOConfig(RolloutConfig):
    """Diffusion-/Flow-DPO options (docs/math.md §3) on top of :class:`~visalign.training.config.RolloutConfig`.

    ``prompts_per_step`` counts pairs (offline) or prompts, each giving one best-vs-worst pair (online);
    ``updates_per_rollout`` counts optimizer steps on each batch of pairs, each at a fresh noise and
    level draw (online, sampling dominates the cost, so reusing a rollout is cheap).
    """

    renamed_fields = {
        "pairs_per_step": "prompts_per_step",
        "online_sampler": "sampler",
        "gradient_steps": "updates_per_rollout",
    }

    sampler: Literal["ode", "sde", "cps", "ddim"] = sampling_field("sampler", "ode")
    prompts_per_step: int = override_default(RolloutConfig, "prompts_per_step", 4)
    mode: Literal["offline", "online"] = config_field(
        "offline", "offline: a pairs file; online: sample G per prompt and pair best vs worst."
    )
    loss: Literal["dpo", "sft", "rwr"] = config_field(
        "dpo", "dpo; sft (regress on chosen only); rwr (Flow-RWR: every sample weighted by softmax(r/rwr_beta))."
    )
    beta: float = config_field(
        5000.0, "DPO β (Diffusion-DPO SD1.5: 5000 with mean errors; Flow-GRPO's SD3 script: 100; FLUX LoRA ~2000)."
    )
    beta_schedule: Literal["constant", "eps"] = config_field(
        "constant", "Constant β (Flow-DPO), or the ε-equivalent β_t = β·(1−σ)² (flow) / β·ᾱ (v-prediction)."
    )
    rwr_beta: float = config_field(1.0, "Temperature of the Flow-RWR weights exp(r/β).")
    timestep_sampling: Literal["auto", "logit_normal", "uniform"] = config_field(
        "auto", "Noise level draw: auto = the family's (logit-normal through the shift for flow, uniform t for DDPM)."
    )
    logit_mean: float = config_field(0.0, "Mean of the logit-normal σ draw.")
    logit_std: float = config_field(1.0, "Std of the logit-normal σ draw.")
    chosen_column: str = config_field("chosen", "Pairs-file column with the chosen image path.")
    rejected_column: str = config_field("rejected", "Pairs-file column with the rejected image path.")
    latent_cache_dir: str | None = config_field(
        None, "Cache VAE latents of offline images in this folder (safetensors, keyed by file, size and VAE)."
    )
    sample_from: Literal["current", "reference"] = config_field(
        "current", "Online: sample from the current policy or the reference."
    )
    ref_refresh_every: int = config_field(
        0, "Copy the current weights into the reference every K iterations (0: reference = base model)."
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.beta > 0, "beta", "> 0", "Diffusion-DPO uses 5000; Flow-DPO on SD3 100–2000.")
        c(self.rwr_beta > 0, "rwr_beta", "> 0")
        c(self.logit_std > 0, "logit_std", "> 0")
        c(
            self.group_size >= 2 or self.mode == "offline",
            "group_size",
            ">= 2 in online mode",
            "Online DPO pairs the best and the worst of a group.",
        )
        c(self.ref_refresh_every >= 0, "ref_refresh_every", ">= 0", "0 keeps the base model as the reference.")
        c(
            self.loss == "dpo" or self.sample_from == "reference" or self.ref_refresh_every == 0,
            "ref_refresh_every",
            "0 unless loss='dpo' or sample_from='reference'",
            "sft and rwr regress without a reference.",
        )
