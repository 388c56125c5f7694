"""Group-relative policy optimisation for diffusion and flow models (docs/math.md §2).

DanceGRPO (Xue et al., arXiv 2505.07818), Flow-GRPO (Liu et al., arXiv 2505.05470), and DDPO
(Black et al., arXiv 2305.13301) for DDIM policies. Options: the SDE windows of Flow-GRPO-Fast and
MixGRPO (``sde_window_*``, docs/math.md §10) and GRPO-Guard's normalised ratio (``ratio="guard"``, §11).

One iteration: the shared rollout stage (:meth:`~visalign.training.online.OnlineTrainer.collect`)
samples G trajectories per prompt with a stochastic sampler (exact log-probs) and scores them;
rewards become group-relative advantages; then ``updates_per_rollout`` optimizer steps on the
PPO-clipped objective over a subset of the SDE steps. The math is :mod:`visalign.losses.grpo`.

**Distributed.** Advantages come from the rewards gathered from all ranks, with the same function
a single process would use, so ``advantage_std="global"`` sees the whole batch.

Example::

    trainer = va.GRPOTrainer(policy, reward, ["a red circle", "a blue square"],
                             va.GRPOConfig(group_size=8, num_steps=10, max_steps=100))
    trainer.train()
    trainer.save_lora("lora/")
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch

from visalign.errors import ConfigError
from visalign.losses.grpo import (
    flow_grpo_kl,
    group_advantages,
    grpo_guard_loss,
    grpo_loss,
    guard_log_ratio,
    select_train_steps,
)
from visalign.sampling import log_prob
from visalign.sampling.options import sampling_field
from visalign.steps import gaussian_kl
from visalign.training.config import AdvantageOptions, RolloutConfig, config_field
from visalign.training.online import OnlineTrainer


# ---------------------------------------------------------------------------- config
@dataclass
class GRPOConfig(AdvantageOptions, RolloutConfig):
    """GRPO options (docs/math.md §2) on top of :class:`~visalign.training.config.RolloutConfig`."""

    num_steps: int = sampling_field("num_steps", 10)
    batch_size: int | None = config_field(
        None, "Alternative to prompts_per_step: samples per rank per iteration (a multiple of group_size)."
    )
    clip_range: float = config_field(
        1e-4,
        "PPO clip ε on the ratio (Flow-GRPO: 1e-4 with the SDE). Its CPS runs use 1e-5 on a log-prob "
        "without the 1/(2s²) scale; the same clip here is 1e-5/(2s²) per step (5.6e-5 at s = 0.3).",
    )
    kl_beta: float = config_field(
        0.0, "Weight β of the KL to the reference; Flow-GRPO's 0.004–0.04 are for kl_form='flow_grpo'. 0 disables."
    )
    kl_form: Literal["flow_grpo", "exact"] = config_field(
        "flow_grpo",
        "flow_grpo: ‖μθ−μref‖²/(2g²), the form of Flow-GRPO's code, which its β values are tuned "
        "for; exact: the Gaussian KL of the step, = flow_grpo/(−dt) (15× on SD3 with 10 steps). CPS and DDIM: both exact.",
    )
    timestep_fraction: float = config_field(
        0.6,
        "Share of the SDE steps each sample trains on, drawn per sample (DanceGRPO 0.6); an SDE window "
        "trains on all of its steps.",
    )
    ratio: Literal["plain", "guard"] = config_field(
        "plain",
        "plain: the PPO ratio π_θ/π_old; guard: GRPO-Guard's RatioNorm ρ̃ = exp(s·[log ρ + R(δ²)/(2s²)]), "
        "whose mean over the rollout noise is 1, with each step's policy loss divided by −dt (arXiv 2510.22319, "
        "docs/math.md §11; flow models, made for sampler sde). Its clip ranges (2e-6 to 4e-6) carry over unchanged.",
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(
            self.sampler != "ode",
            "sampler",
            "'sde', 'cps' or 'ddim'",
            "GRPO needs log-probs, which the ODE sampler does not have.",
        )
        c(self.group_size >= 2, "group_size", ">= 2", "GRPO compares samples within a group.")
        if self.batch_size is not None:
            multiple = max(1, self.batch_size // self.group_size) * self.group_size
            c(
                self.batch_size % self.group_size == 0,
                "batch_size",
                f"a multiple of group_size={self.group_size}",
                f"Use e.g. batch_size={multiple}.",
            )
            self.prompts_per_step = self.batch_size // self.group_size
        c(self.num_steps >= 2, "num_steps", ">= 2", "The last step is never trained.")
        c(0 < self.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]")
        c(self.clip_range > 0, "clip_range", "> 0")
        c(self.kl_beta >= 0, "kl_beta", ">= 0", "0 disables the KL term.")
        last = self.sde_window_last_start()
        c(
            last is None or last < self.num_steps - 1,
            "sde_window_size",
            f"a window that never sits on the last step alone (here one starts at step {last})",
            f"The last step is always the ODE, so that window has nothing to train: keep windows within "
            f"sde_window_range=[0, {self.num_steps - 1}].",
        )


# ---------------------------------------------------------------------------- trainer
class GRPOTrainer(OnlineTrainer):
    """GRPO on the shared training loop. See the module docstring and :class:`GRPOConfig`."""

    config_class = GRPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.ratio == "guard" and not self.policy.is_flow:
            raise ConfigError(
                f"ratio='guard' (GRPO-Guard) reweights by the flow step −dt; {self.policy.family} is a "
                "DDPM model: use ratio='plain'."
            )

    @property
    def needs_reference(self) -> bool:
        return self.config.kl_beta > 0

    def batch_arithmetic(self) -> list[str]:
        cfg = self.config
        trained = f"window {cfg.sde_window_size}" if cfg.sde_window_size else f"{cfg.timestep_fraction:.0%} of steps"
        ratio = "; GRPO-Guard ratio" if cfg.ratio == "guard" else ""
        return [
            self.rollout_summary(),
            f"updates: {cfg.updates_per_rollout} optimizer steps per rollout; {trained} trained{ratio}",
        ]

    def train_step(self, step: int) -> dict:
        cfg = self.config
        rollout = self.collect(step)
        if isinstance(rollout, dict):
            return rollout
        t_reward = time.perf_counter()
        advantages, zero_std, stats = self.compute_advantages(rollout)
        metrics = {**rollout.metrics, **stats}
        traj, batch = rollout.traj, rollout.batch_size
        train_steps = select_train_steps(
            traj.sde_mask.cpu(),
            batch,
            cfg.timestep_fraction,
            torch.Generator().manual_seed(self.step_seed(step, 2)),
            window=cfg.sde_window_at(step, cfg.seed),
        ).to(traj.latents.device)
        old_log_probs = traj.log_probs.gather(1, train_steps)
        active = (~zero_std).float()
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(self.step_seed(step, 3)))
        if self.accelerator.num_processes == 1:  # single process: zero-std groups are skipped outright
            order = order[active[order].bool().cpu()]
        t_train = time.perf_counter()
        history: dict[str, list[float]] = {}
        for update in self.update_parts(order):
            for k, v in self._update(
                traj, update.to(traj.latents.device), train_steps, old_log_probs, advantages, active
            ).items():
                history.setdefault(k, []).append(v)
        metrics.update({k: sum(v) / len(v) for k, v in history.items()})
        metrics["time_reward"] += t_train - t_reward
        metrics["time_training"] = time.perf_counter() - t_train
        return metrics

    def _update(self, traj, index, train_steps, old_log_probs, advantages, active) -> dict:
        """One optimizer step over the samples at ``index``, in micro-batches."""
        cfg, acc = self.config, self.accelerator
        chunks = index.split(cfg.micro_batch_size or index.numel())
        normaliser = float((active[index] * train_steps.shape[1]).sum().clamp(min=1.0))
        sums: dict[str, float] = {}
        for j, chunk in enumerate(chunks):
            sub = traj.select(chunk)
            sync = contextlib.nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                out = log_prob(self.policy, sub, train_steps[chunk], detach_uncond=cfg.detach_uncond)
                kl = self._kl(sub, train_steps[chunk], out) if cfg.kl_beta > 0 else None
                if cfg.ratio == "guard":
                    loss, m = self._guard_loss(
                        sub, train_steps[chunk], out, old_log_probs[chunk], advantages[chunk], kl, active[chunk]
                    )
                else:
                    loss, m = grpo_loss(
                        out.log_probs,
                        old_log_probs[chunk],
                        advantages[chunk],
                        cfg.clip_range,
                        kl=kl,
                        kl_beta=cfg.kl_beta,
                        weights=active[chunk],
                        reduction="sum",
                    )
                acc.backward(loss / normaliser)
            share = float(active[chunk].sum()) * train_steps.shape[1] / normaliser
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / normaliser
            for key, value in m.items():
                sums[key] = sums.get(key, 0.0) + value * share
        sums.update(self.optimizer_step())
        return sums

    def _guard_loss(self, traj, steps, out, old_log_probs, advantages, kl, weights):
        """GRPO-Guard's objective on the transitions ``steps`` of ``traj`` (docs/math.md §11).

        μ_old is the rollout's mean of each trained step (``traj.means``) and s the per-sample std.
        """
        rows = torch.arange(traj.batch_size, device=steps.device).unsqueeze(1)
        log_ratio = guard_log_ratio(
            out.log_probs, old_log_probs, out.means, traj.means[rows, steps], out.stds, traj.spec.reduce
        )
        sigmas = traj.schedule.sigmas.to(steps.device)
        return grpo_guard_loss(
            log_ratio,
            advantages,
            self.config.clip_range,
            sigmas[steps] - sigmas[steps + 1],
            kl=kl,
            kl_beta=self.config.kl_beta,
            weights=weights,
            reduction="sum",
        )

    def _kl(self, traj, steps, out):
        """KL of each trained transition to the reference policy's, in the configured form (docs/math.md §2)."""
        with self.reference():
            ref = log_prob(self.policy, traj, steps)
        b, k = out.log_probs.shape
        std = out.stds.reshape(b * k, *([1] * (out.means.ndim - 2)))
        kl = gaussian_kl(out.means.flatten(0, 1), ref.means.flatten(0, 1), std, self.config.log_prob_reduce).view(b, k)
        # Flow-GRPO's form differs from the exact KL only for the flow SDE (its std is g·√(−dt); a CPS
        # or DDIM step's std has no such factor, and Flow-GRPO divides those by the full std).
        if self.config.kl_form == "flow_grpo" and traj.spec.sampler == "sde" and traj.schedule.is_flow:
            sigmas = traj.schedule.sigmas.to(steps.device)
            kl = flow_grpo_kl(kl, sigmas[steps] - sigmas[steps + 1])
        return kl


__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "group_advantages",
    "grpo_guard_loss",
    "grpo_loss",
    "guard_log_ratio",
    "select_train_steps",
]
