"""Proximal reward-difference prediction, PRDP (Deng et al., CVPR 2024, arXiv 2402.08714; REFERENCE §4).

PRDP turns RL into supervised regression. The policy's *predicted reward* of a trajectory is its
summed per-step log-ratio to the reference,

    r̂_θ = Σ_i r̂_θ,i,   r̂_θ,i = log π_θ(x_{i+1}|x_i) − log π_ref(x_{i+1}|x_i),

and for two trajectories a, b of the same prompt the loss regresses the predicted difference on
the true one: l = ((r̂_θ(a) − r̂_θ(b)) − (r_a − r_b)/β)², averaged over all C(G,2) pairs of each
group. **Proximal clipping** keeps each step near the rollout policy: r̂^clip sums
clip(r̂_θ,i, r̂_old,i ± ε), l_clip is the same loss on it, and the loss is max(l, l_clip) (the paper
reports collapse without it).

One iteration: sample G trajectories per prompt with a stochastic sampler (the flow SDE/CPS of
REFERENCE §1, or DDIM η > 0 on SD/SDXL), score them, compute the reference's log-probs once, then
take ``gradient_steps`` (K) optimizer steps on the whole rollout. The log-probs are the exact
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

    cfg = va.PRDPConfig(group_size=4, beta=10.0, clip_range=1e-4, gradient_steps=2, num_steps=20)
    va.PRDPTrainer(policy, reward, ["a red circle", "a blue square"], cfg).train()
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch

from visalign.algorithms.grpo import GRPOTrainer, group_advantages, select_train_steps
from visalign.errors import ConfigError
from visalign.sampling import log_prob, sample
from visalign.training.config import TrainConfig, config_field
from visalign.training.trainer import Trainer


# ---------------------------------------------------------------------------- pure math
def pair_indices(num_samples: int, group_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a, b) of all C(G,2) pairs a < b within each contiguous group of ``group_size``."""
    if num_samples % group_size:
        raise ConfigError(f"{num_samples} samples do not split into groups of {group_size}.")
    within = torch.combinations(torch.arange(group_size, device=device), 2)
    offsets = torch.arange(0, num_samples, group_size, device=device).view(-1, 1)
    return (offsets + within[:, 0]).reshape(-1), (offsets + within[:, 1]).reshape(-1)


def prdp_loss(log_ratios: torch.Tensor, old_log_ratios: torch.Tensor, rewards: torch.Tensor, group_size: int,
              beta: float, clip_range: float):
    """The PRDP objective (REFERENCE §4).

    Args:
        log_ratios: (B, k) r̂_θ,i = log π_θ − log π_ref of each trained step (with gradient).
        old_log_ratios: (B, k) r̂_old,i, the same under the rollout policy.
        rewards: (B,) the trajectories' rewards; groups of ``group_size`` are contiguous.
        group_size: G (pairs are formed within a group).
        beta: β > 0; the regression target is (r_a − r_b)/β.
        clip_range: ε of the per-step proximal clip.

    Returns:
        ``(loss, metrics)``: the mean over pairs of max(l, l_clip), and detached floats ``loss``,
        ``loss_unclipped`` (mean l), ``clipfrac`` (share of per-step terms outside r̂_old ± ε),
        ``clipped_pair_frac`` (share of pairs where l_clip > l, i.e. the clipped branch is taken),
        ``pred_reward_mean`` (mean r̂_θ).
    """
    a, b = pair_indices(log_ratios.shape[0], group_size, log_ratios.device)
    old = old_log_ratios.to(log_ratios.dtype)
    clipped = torch.clamp(log_ratios, old - clip_range, old + clip_range)
    pred, pred_clip = log_ratios.sum(1), clipped.sum(1)
    target = (rewards[a] - rewards[b]).to(log_ratios.dtype) / beta
    loss_plain = ((pred[a] - pred[b]) - target) ** 2
    loss_clip = ((pred_clip[a] - pred_clip[b]) - target) ** 2
    loss = torch.maximum(loss_plain, loss_clip).mean()
    with torch.no_grad():
        metrics = {"loss": float(loss), "loss_unclipped": float(loss_plain.mean()),
                   "clipfrac": float(((log_ratios - old).abs() > clip_range).float().mean()),
                   "clipped_pair_frac": float((loss_clip > loss_plain).float().mean()),
                   "pred_reward_mean": float(pred.mean())}
    return loss, metrics


# ---------------------------------------------------------------------------- config
@dataclass
class PRDPConfig(TrainConfig):
    """PRDP options (REFERENCE §4), on top of :class:`~visalign.training.config.TrainConfig`."""

    num_steps: int = config_field(20, "Denoising steps per rollout (the paper: 50 DDIM steps on SD1.4).")
    guidance_scale: float | None = config_field(None, "CFG scale (the paper: 5); None uses the family default.")
    sampler: str = config_field("sde", "Stochastic sampler: 'sde' (DDIM η on SD/SDXL), 'cps' or 'ddim'.")
    noise: Literal["flow", "dance"] = config_field(
        "flow", "Flow SDE noise: 'flow' (Flow-GRPO) or 'dance' (DanceGRPO).")
    eta: float | None = config_field(None, "Noise level; None: the sampler's default (flow 0.7, ddim 1.0).")
    group_size: int = config_field(
        4, "Trajectories per prompt (B in the paper); pairs are all C(G,2) within a group.")
    prompts_per_step: int = config_field(2, "Prompts per rank per iteration (N in the paper).")
    same_noise_in_group: bool = config_field(False, "Share the initial noise within a group.")
    beta: float = config_field(10.0, "β: the regression target is (r_a − r_b)/β (the paper: 10).")
    reward_norm: Literal["none", "group"] = config_field(
        "none", "'group' standardises the rewards within each group before differencing, as GRPO's "
        "advantages (not in the paper; β then counts group stds, so one β fits any reward scale).")
    clip_range: float = config_field(1e-4, "ε of the per-step proximal clip of r̂_θ,i around r̂_old,i.")
    gradient_steps: int = config_field(1, "K: optimizer steps per rollout, each over the whole rollout.")
    timestep_fraction: float = config_field(
        1.0, "Share of the SDE steps trained per iteration (the same steps for every sample).")
    cfg_in_training: bool = config_field(
        True, "Sample and train with CFG; False runs both without the unconditional branch.")
    detach_uncond: bool = config_field(False, "No gradient through the unconditional branch.")
    micro_batch_size: int | None = config_field(
        None, "Samples per forward/backward; None: the whole rollout in one pass.")
    log_prob_reduce: Literal["mean", "sum"] = config_field(
        "mean", "Log-prob reduction over latent dims (β and ε depend on it).")
    image_column: str = config_field("image", "Prompt-source column holding I2V first-frame paths.")

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.sampler in ("sde", "cps", "ddim"), "sampler", "'sde', 'cps' or 'ddim'",
          "PRDP needs log-probs, which the ODE sampler does not have.")
        c(self.group_size >= 2, "group_size", ">= 2", "PRDP regresses reward differences within a group.")
        c(self.prompts_per_step >= 1, "prompts_per_step", ">= 1")
        c(self.num_steps >= 2, "num_steps", ">= 2", "The last step is never trained.")
        c(self.beta > 0, "beta", "> 0", "The paper uses beta=10.")
        c(self.clip_range > 0, "clip_range", "> 0")
        c(self.gradient_steps >= 1, "gradient_steps", ">= 1")
        c(0 < self.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]")
        c(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", ">= 1 or None")


# ---------------------------------------------------------------------------- trainer
class PRDPTrainer(Trainer):
    """PRDP on the shared training loop. See the module docstring and :class:`PRDPConfig`."""

    config_class = PRDPConfig

    def __init__(self, policy, reward=None, prompts=None, config: PRDPConfig | None = None, accelerator=None):
        super().__init__(policy, reward, prompts, config, accelerator)
        if self.reward is None:
            raise ConfigError("PRDPTrainer needs a reward: pass a visalign Reward or a callable (images, prompts) -> Tensor[B].")

    @property
    def needs_reference(self) -> bool:
        return True

    def prompts_per_step(self) -> int:
        return self.config.prompts_per_step

    def optimizer_steps_per_iteration(self) -> int:
        return self.config.gradient_steps

    def batch_arithmetic(self) -> list[str]:
        cfg, world = self.config, self.accelerator.num_processes
        per_rank = cfg.prompts_per_step * cfg.group_size
        pairs = cfg.prompts_per_step * cfg.group_size * (cfg.group_size - 1) // 2
        return [f"rollout: {cfg.prompts_per_step} prompts × {cfg.group_size} samples = {per_rank} per rank, "
                f"{per_rank * world} in all; {pairs} pairs per rank; {cfg.num_steps} steps, sampler {cfg.sampler}",
                f"updates: {cfg.gradient_steps} optimizer steps per rollout; β {cfg.beta:g}, ε {cfg.clip_range:g}"]

    # Same CFG-in-training rule as GRPO (the configs share cfg_in_training / guidance_scale).
    guidance_scale = GRPOTrainer.guidance_scale
    sample_kwargs = GRPOTrainer.sample_kwargs

    def rollout(self, step: int, records: list[dict]):
        cfg = self.config
        prompts = [r["prompt"] for r in records]
        images = self.load_condition_images(records, cfg.image_column)
        with torch.no_grad(), self.accelerator.autocast():
            return sample(self.policy, prompts, num_steps=cfg.num_steps, guidance_scale=self.guidance_scale(),
                          sampler=cfg.sampler, noise=cfg.noise, eta=cfg.eta,
                          generator=self.generators(step, len(prompts) * cfg.group_size), images=images,
                          height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, group_size=cfg.group_size,
                          same_noise_in_group=cfg.same_noise_in_group, reduce=cfg.log_prob_reduce)

    def _chunks(self, batch: int, device) -> list[torch.Tensor]:
        return list(torch.arange(batch, device=device).split(self.config.micro_batch_size or batch))

    def _log_probs(self, traj, steps, chunk) -> torch.Tensor:
        with self.accelerator.autocast():
            return log_prob(self.policy, traj.select(chunk), steps[chunk], detach_uncond=self.config.detach_uncond).log_probs

    def train_step(self, step: int) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        records = self.next_records()
        traj = self.rollout(step, records)
        t1 = time.perf_counter()
        group_records = [r for r in records for _ in range(cfg.group_size)]
        rewards, components, reason = self.score_or_skip(traj.images, traj.prompts, group_records)
        if rewards is None:
            return {"skipped": 1.0, "skip_reason": reason, "time_sampling": t1 - t0}
        gathered = self.accelerator.gather(rewards.detach())
        metrics = {"reward_mean": float(gathered.mean()), "reward_std": float(gathered.std(unbiased=False))}
        for key, values in components.items():
            if not (key == "reward" and len(components) == 1):
                metrics[f"reward/{key}_mean"] = float(self.accelerator.gather(values.detach()).mean())
        if cfg.reward_norm == "group":  # groups never straddle ranks, so each rank standardises its own
            rewards = group_advantages(rewards, cfg.group_size, "group", clip=None)[0]
        t2 = time.perf_counter()

        batch, device = traj.batch_size, traj.latents.device
        shared = select_train_steps(traj.sde_mask.cpu(), 1, cfg.timestep_fraction,
                                    torch.Generator().manual_seed(self.step_seed(step, 2)))
        steps = shared.expand(batch, -1).to(device)
        chunks = self._chunks(batch, device)
        with self.reference():
            ref = torch.cat([self._log_probs(traj, steps, c) for c in chunks])
        old_ratios = traj.log_probs.gather(1, steps) - ref
        history: dict[str, list[float]] = {}
        for _ in range(cfg.gradient_steps):
            for key, value in self._update(traj, steps, chunks, ref, old_ratios, rewards).items():
                history.setdefault(key, []).append(value)
        metrics.update({k: sum(v) / len(v) for k, v in history.items()})
        metrics["clipfrac_last"] = history["clipfrac"][-1]
        metrics.update({"time_sampling": t1 - t0, "time_reward": t2 - t1, "time_training": time.perf_counter() - t2})
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
