"""Proximal reward-difference prediction, PRDP (Deng et al., CVPR 2024, arXiv 2402.08714; docs/math.md §4).

PRDP turns RL into supervised regression. The policy's *predicted reward* of a trajectory is its
summed per-step log-ratio to the reference,

    r̂_θ = Σ_i r̂_θ,i,   r̂_θ,i = log π_θ(x_{i+1}|x_i) − log π_ref(x_{i+1}|x_i),

and for two trajectories a, b of the same prompt the loss regresses the predicted difference on
the true one: l = ((r̂_θ(a) − r̂_θ(b)) − (r_a − r_b)/β)², averaged over all C(G,2) pairs of each
group. **Proximal clipping** keeps each step near the rollout policy: r̂^clip sums
clip(r̂_θ,i, r̂_old,i ± ε), l_clip is the same loss on it, and the loss is max(l, l_clip) (the paper
reports collapse without it).

One iteration: sample G trajectories per prompt with a stochastic sampler (the flow SDE/CPS of
docs/math.md §1, or DDIM η > 0 on SD/SDXL), score them, compute the reference's log-probs once, then
take ``updates_per_rollout`` (K) optimizer steps on the whole rollout. The log-probs are the exact
SDE transition densities from :mod:`visalign.sampling` (rollout: π_old; recomputed: π_θ; adapters
off or a frozen copy: π_ref). The first gradient step is on-policy, so r̂_θ = r̂_old and nothing is
clipped.

``reward_norm="group"`` (not in the paper) standardises the rewards within each group first, as
GRPO's advantages A. Then, at the reference, the gradient is exactly GRPO's: since ΣA = 0 per
group, Σ_pairs (A_a − A_b)(∇r̂_a − ∇r̂_b) = G·Σ_a A_a ∇r̂_a. Without it, a group's weight grows with
its reward spread. On the toy world (BENCHMARKS.md) the standardised form moved the evaluator's
accuracy more than the plain one, but not reliably: score-function noise dominates both.

With ``micro_batch_size`` the pairwise loss (which couples the samples of a group) is
differentiated in two passes: a no-grad pass gives every r̂_θ,i, autograd gives ∂loss/∂r̂_θ,i on
those numbers, and a second pass per micro-batch backpropagates Σ (∂loss/∂r̂_θ,i)·r̂_θ,i — the
same gradient as one big pass, at one micro-batch's memory.

Example::

    cfg = va.PRDPConfig(group_size=4, beta=10.0, clip_range=1e-4, updates_per_rollout=2, num_steps=20)
    va.PRDPTrainer(policy, reward, ["a red circle", "a blue square"], cfg).train()
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch

from visalign.errors import ConfigError
from visalign.losses.grpo import group_advantages, select_train_steps
from visalign.losses.prdp import pair_indices, prdp_loss
from visalign.sampling import log_prob
from visalign.training.config import RolloutConfig, config_field
from visalign.training.online import OnlineTrainer


# ---------------------------------------------------------------------------- config
@dataclass
class PRDPConfig(RolloutConfig):
    """PRDP options (docs/math.md §4) on top of :class:`~visalign.training.config.RolloutConfig`.

    ``group_size`` is B in the paper (pairs are all C(G,2) within a group), ``prompts_per_step`` is
    N, ``updates_per_rollout`` is K (each step over the whole rollout).
    """

    renamed_fields = {"gradient_steps": "updates_per_rollout"}

    beta: float = config_field(10.0, "β: the regression target is (r_a − r_b)/β (the paper: 10).")
    reward_norm: Literal["none", "group"] = config_field(
        "none",
        "'group' standardises the rewards within each group before differencing, as GRPO's "
        "advantages (not in the paper; β then counts group stds, so one β fits any reward scale).",
    )
    clip_range: float = config_field(1e-4, "ε of the per-step proximal clip of r̂_θ,i around r̂_old,i.")
    timestep_fraction: float = config_field(
        1.0, "Share of the SDE steps trained per iteration (the same steps for every sample)."
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(
            self.sampler != "ode",
            "sampler",
            "'sde', 'cps' or 'ddim'",
            "PRDP needs log-probs, which the ODE sampler does not have.",
        )
        c(self.group_size >= 2, "group_size", ">= 2", "PRDP regresses reward differences within a group.")
        c(self.num_steps >= 2, "num_steps", ">= 2", "The last step is never trained.")
        c(self.beta > 0, "beta", "> 0", "The paper uses beta=10.")
        c(self.clip_range > 0, "clip_range", "> 0")
        c(0 < self.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]")


# ---------------------------------------------------------------------------- trainer
class PRDPTrainer(OnlineTrainer):
    """PRDP on the shared training loop. See the module docstring and :class:`PRDPConfig`."""

    config_class = PRDPConfig

    def __init__(self, policy, reward=None, prompts=None, config: PRDPConfig | None = None, accelerator=None, **kwargs):
        super().__init__(policy, reward, prompts, config, accelerator, **kwargs)
        if self.reward is None:
            raise ConfigError(
                "PRDPTrainer needs a reward: pass a visalign Reward or a callable (images, prompts) -> Tensor[B]."
            )

    @property
    def needs_reference(self) -> bool:
        return True

    def batch_arithmetic(self) -> list[str]:
        cfg = self.config
        pairs = cfg.prompts_per_step * cfg.group_size * (cfg.group_size - 1) // 2
        return [
            self.rollout_summary() + f"; {pairs} pairs per rank",
            f"updates: {cfg.updates_per_rollout} optimizer steps per rollout; β {cfg.beta:g}, ε {cfg.clip_range:g}",
        ]

    def _chunks(self, batch: int, device) -> list[torch.Tensor]:
        return list(torch.arange(batch, device=device).split(self.config.micro_batch_size or batch))

    def _log_probs(self, traj, steps, chunk) -> torch.Tensor:
        with self.accelerator.autocast():
            return log_prob(
                self.policy, traj.select(chunk), steps[chunk], detach_uncond=self.config.detach_uncond
            ).log_probs

    def train_step(self, step: int) -> dict:
        cfg = self.config
        rollout = self.collect(step)
        if isinstance(rollout, dict):
            return rollout
        metrics, rewards, traj = dict(rollout.metrics), rollout.rewards.total, rollout.traj
        if cfg.reward_norm == "group":  # groups never straddle ranks, so each rank standardises its own
            rewards = group_advantages(rewards, cfg.group_size, "group", clip=None)[0]
        t_train = time.perf_counter()

        batch, device = traj.batch_size, traj.latents.device
        shared = select_train_steps(
            traj.sde_mask.cpu(), 1, cfg.timestep_fraction, torch.Generator().manual_seed(self.step_seed(step, 2))
        )
        steps = shared.expand(batch, -1).to(device)
        chunks = self._chunks(batch, device)
        with self.reference():
            ref = torch.cat([self._log_probs(traj, steps, c) for c in chunks])
        old_ratios = traj.log_probs.gather(1, steps) - ref
        history: dict[str, list[float]] = {}
        for _ in range(cfg.updates_per_rollout):
            for key, value in self._update(traj, steps, chunks, ref, old_ratios, rewards).items():
                history.setdefault(key, []).append(value)
        metrics.update({k: sum(v) / len(v) for k, v in history.items()})
        metrics["clipfrac_last"] = history["clipfrac"][-1]
        metrics["time_training"] = time.perf_counter() - t_train
        return metrics

    def _update(self, traj, steps, chunks, ref, old_ratios, rewards) -> dict:
        """One optimizer step on the whole rollout (one pass, or two with micro-batches)."""
        cfg, acc = self.config, self.accelerator
        if len(chunks) == 1:
            ratios = self._log_probs(traj, steps, chunks[0]) - ref
            loss, metrics = prdp_loss(ratios, old_ratios, rewards, cfg.group_size, cfg.beta, cfg.clip_range)
            acc.backward(loss)
        else:
            with torch.no_grad():
                ratios = torch.cat([self._log_probs(traj, steps, c) for c in chunks]) - ref
            leaf = ratios.detach().requires_grad_(True)
            loss, metrics = prdp_loss(leaf, old_ratios, rewards, cfg.group_size, cfg.beta, cfg.clip_range)
            (grad,) = torch.autograd.grad(loss, leaf)
            for j, chunk in enumerate(chunks):
                sync = contextlib.nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model)
                with sync:
                    acc.backward((self._log_probs(traj, steps, chunk) * grad[chunk]).sum())
        metrics.update(self.optimizer_step())
        return metrics


__all__ = ["PRDPConfig", "PRDPTrainer", "pair_indices", "prdp_loss"]
