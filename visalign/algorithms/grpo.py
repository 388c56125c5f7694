"""Group-relative policy optimisation for diffusion and flow models (REFERENCE §2).

DanceGRPO (Xue et al., arXiv 2505.07818), Flow-GRPO (Liu et al., arXiv 2505.05470), and DDPO
(Black et al., arXiv 2305.13301) for DDIM policies.

One iteration: sample G trajectories per prompt with a stochastic sampler (exact log-probs),
score them, turn rewards into group-relative advantages, then take ``updates_per_rollout``
optimizer steps on the PPO-clipped objective over a subset of the SDE steps.

The math is the two pure functions :func:`group_advantages` and :func:`grpo_loss`; the trainer is
plumbing on :class:`~visalign.training.trainer.Trainer`.

**Distributed.** Each rank samples whole groups (a group never spans ranks). Advantages are
computed from the rewards gathered from all ranks, with the same function a single process would
use, so ``std="global"`` sees the whole batch and the logged statistics are global.

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
from visalign.sampling import log_prob, sample
from visalign.sampling.steps import gaussian_kl
from visalign.training.config import TrainConfig, config_field
from visalign.training.trainer import Trainer


# ---------------------------------------------------------------------------- pure math
def group_advantages(rewards: torch.Tensor, group_size: int, std: str = "group", clip: float | None = 5.0,
                     eps: float = 1e-8, zero_std_tol: float = 1e-6):
    """Group-relative advantages A = (r − mean_group)/(std + eps), clipped to ±clip.

    Args:
        rewards: (N,) rewards, groups contiguous (sample g·G … g·G+G−1 share a prompt).
        group_size: G.
        std: ``"group"`` (each group's std) or ``"global"`` (the std over all N, Flow-GRPO's default).
        clip: the advantage clip A_max (None disables).
        eps: added to the std.
        zero_std_tol: a group whose reward std is at most this carries no signal.

    Returns:
        ``(advantages (N,), zero_std (N // G,) bool)``. Zero-std groups get advantage 0.
        Stds are population stds (divide by G), as the peers compute them.
    """
    rewards = rewards.float()
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}.")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, unbiased=False, keepdim=True)
    zero_std = group_std.squeeze(1) <= zero_std_tol
    scale = group_std if std == "group" else rewards.std(unbiased=False)
    if std not in ("group", "global"):
        raise ConfigError(f"advantage std must be 'group' or 'global', got {std!r}.")
    advantages = (grouped - mean) / (scale + eps)
    advantages = torch.where(zero_std.unsqueeze(1), torch.zeros_like(advantages), advantages)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages.reshape(-1), zero_std


def grpo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              kl: torch.Tensor | None = None, kl_beta: float = 0.0, weights: torch.Tensor | None = None,
              reduction: str = "mean"):
    """The PPO-clipped GRPO objective over trained steps (REFERENCE §2).

    ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) + β·KL`` per (sample, step), with ρ = exp(log π − log π_old).

    Args:
        log_probs: (B, k) log π_θ of the trained transitions (with gradient).
        old_log_probs: (B, k) log π_old from the rollout.
        advantages: (B,) one advantage per sample.
        clip_range: ε.
        kl: optional (B, k) KL to the reference per transition; ``kl_beta`` scales it.
        weights: optional (B,) sample weights (0 drops a sample, e.g. a zero-std group).
        reduction: ``"mean"`` over weighted terms, or ``"sum"`` (the caller normalises).

    Returns:
        ``(loss, metrics)``: a scalar and a dict of detached floats — ``policy_loss``, ``kl``,
        ``clipfrac`` (share of terms with |ρ−1| > ε), ``approx_kl`` (½·mean((log π − log π_old)²)),
        ``ratio_mean``.
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1).to(ratio.dtype)
    terms = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    if kl is not None and kl_beta:
        terms = terms + kl_beta * kl
    w = torch.ones_like(advantages) if weights is None else weights.float()
    w = w.unsqueeze(1).expand_as(terms)
    total = (terms * w).sum()
    count = w.sum().clamp(min=1.0)
    loss = total / count if reduction == "mean" else total
    with torch.no_grad():
        mask = w > 0
        pick = (lambda t: t[mask]) if bool(mask.any()) else (lambda t: t.flatten()[:0])
        metrics = {
            "policy_loss": float((((-adv * ratio).maximum(-adv * ratio.clamp(1 - clip_range, 1 + clip_range))) * w)
                                 .sum() / count),
            "clipfrac": float(((ratio - 1).abs() > clip_range).float()[mask].mean()) if bool(mask.any()) else 0.0,
            "approx_kl": float(0.5 * pick(log_ratio).pow(2).mean()) if bool(mask.any()) else 0.0,
            "ratio_mean": float(pick(ratio).mean()) if bool(mask.any()) else 1.0,
            "kl": float((kl * w).sum() / count) if kl is not None else 0.0,
        }
    return loss, metrics


def select_train_steps(sde_mask: torch.Tensor, batch: int, fraction: float, generator: torch.Generator | None,
                       window: tuple[int, int] | None = None) -> torch.Tensor:
    """Which transitions each sample trains on, as a (B, k) long tensor (REFERENCE §2).

    Never the last step. With an SDE window: every stochastic step of the window. Otherwise a
    random ``fraction`` of the stochastic steps, drawn per sample (DanceGRPO trains on 60%).
    """
    num_steps = sde_mask.shape[0]
    candidates = [i for i in range(num_steps - 1) if bool(sde_mask[i])]
    if not candidates:
        raise ConfigError(
            "No trainable steps: every stochastic step is the last one. Use more sampling steps or a wider SDE window."
        )
    if window is not None:
        return torch.tensor(candidates, dtype=torch.long).unsqueeze(0).expand(batch, -1).clone()
    k = max(1, round(fraction * len(candidates)))
    choice = torch.stack([torch.randperm(len(candidates), generator=generator)[:k] for _ in range(batch)])
    return torch.tensor(candidates, dtype=torch.long)[choice].sort(dim=1).values


# ---------------------------------------------------------------------------- config
@dataclass
class GRPOConfig(TrainConfig):
    """GRPO options (REFERENCE §2), on top of the shared :class:`~visalign.training.config.TrainConfig`."""

    num_steps: int = config_field(10, "Denoising steps per rollout.")
    guidance_scale: float | None = config_field(None, "CFG scale (FLUX: embedded guidance); None uses the family default.")
    sampler: str = config_field("sde", "Stochastic sampler: 'sde' (DDIM η on SD/SDXL) or 'cps'. The ODE has no log-probs.")
    noise: Literal["flow", "dance"] = config_field("flow", "Flow SDE noise: 'flow' (Flow-GRPO) or 'dance' (DanceGRPO).")
    eta: float | None = config_field(None, "Noise level; None: flow 0.7, dance 0.3, cps 0.8, ddim 1.0.")
    group_size: int = config_field(4, "Samples per prompt (G); at least 2.")
    prompts_per_step: int = config_field(2, "Prompts per rank per iteration; the rank's batch is prompts_per_step × G.")
    batch_size: int | None = config_field(None, "Alternative to prompts_per_step: samples per rank per iteration (a multiple of G).")
    same_noise_in_group: bool = config_field(False, "Share the initial noise within a group (DanceGRPO).")
    advantage_std: Literal["group", "global"] = config_field("group", "Normalise by each group's std or the whole batch's (Flow-GRPO).")
    advantage_clip: float | None = config_field(5.0, "Clip advantages to ±this (None disables).")
    clip_range: float = config_field(1e-4, "PPO clip ε on the ratio (1e-5 for CPS/no-CFG in Flow-GRPO).")
    kl_beta: float = config_field(0.0, "Weight β of the KL to the reference (0.004–0.04 in Flow-GRPO); 0 disables.")
    timestep_fraction: float = config_field(0.6, "Share of the SDE steps each sample trains on, drawn per sample (DanceGRPO 0.6).")
    sde_window_size: int | None = config_field(None, "Run the SDE only in a window of this many steps (ODE elsewhere) and train on it.")
    sde_window_mode: Literal["fixed", "sliding", "random"] = config_field("fixed", "Window placement: fixed start, sliding, or random per iteration.")
    sde_window_start: int = config_field(0, "First step of a fixed window (and of the sliding window's first position).")
    sde_window_shift_every: int = config_field(1, "Iterations between sliding-window moves.")
    cfg_in_training: bool = config_field(True, "Sample and train with CFG; False runs both without the unconditional branch.")
    detach_uncond: bool = config_field(False, "No gradient through the unconditional branch (Flow-GRPO); False keeps it (DanceGRPO).")
    updates_per_rollout: int = config_field(1, "Optimizer steps per rollout; the rollout is split into this many minibatches.")
    micro_batch_size: int | None = config_field(None, "Samples per forward/backward in training (None: a whole minibatch).")
    multi_reward: Literal["weighted", "per_reward"] = config_field("weighted", "Combine rewards before normalising, or normalise each then weight (MixGRPO).")
    image_column: str = config_field("image", "Prompt-source column holding I2V first-frame paths.")
    log_prob_reduce: Literal["mean", "sum"] = config_field("mean", "Log-prob reduction over latent dims.")

    def validate(self) -> None:
        super().validate()
        if self.sampler == "ode":
            raise ConfigError("GRPO needs log-probs, which the ODE sampler does not have: use sampler='sde' or 'cps'.")
        if self.sampler not in ("sde", "cps", "ddim"):
            raise ConfigError(f"sampler must be 'sde', 'cps' or 'ddim'; got {self.sampler!r}.")
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size}: GRPO compares samples within a group, so it needs at least 2.")
        if self.batch_size is not None:
            if self.batch_size % self.group_size:
                raise ConfigError(
                    f"batch_size={self.batch_size} is not divisible by group_size={self.group_size}; "
                    f"use a multiple such as {max(1, self.batch_size // self.group_size) * self.group_size}."
                )
            self.prompts_per_step = self.batch_size // self.group_size
        if self.prompts_per_step < 1 or self.num_steps < 2:
            raise ConfigError("prompts_per_step must be >= 1 and num_steps >= 2 (the last step is never trained).")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"timestep_fraction must be in (0, 1]; got {self.timestep_fraction}.")
        if self.sde_window_size is not None and not 1 <= self.sde_window_size <= self.num_steps:
            raise ConfigError(f"sde_window_size must be in [1, num_steps={self.num_steps}].")
        if self.updates_per_rollout < 1 or self.clip_range <= 0 or self.kl_beta < 0:
            raise ConfigError("updates_per_rollout >= 1, clip_range > 0 and kl_beta >= 0 are required.")


# ---------------------------------------------------------------------------- trainer
class GRPOTrainer(Trainer):
    """GRPO on the shared training loop. See the module docstring and :class:`GRPOConfig`."""

    config_class = GRPOConfig

    @property
    def needs_reference(self) -> bool:
        return self.config.kl_beta > 0

    def prompts_per_step(self) -> int:
        return self.config.prompts_per_step

    def optimizer_steps_per_iteration(self) -> int:
        return self.config.updates_per_rollout

    def batch_arithmetic(self) -> list[str]:
        cfg, world = self.config, self.accelerator.num_processes
        per_rank = cfg.prompts_per_step * cfg.group_size
        return [f"rollout: {cfg.prompts_per_step} prompts × {cfg.group_size} samples = {per_rank} per rank, "
                f"{per_rank * world} in all; {cfg.num_steps} steps, sampler {cfg.sampler}/{cfg.noise}",
                f"updates: {cfg.updates_per_rollout} optimizer steps per rollout; "
                f"{'window ' + str(cfg.sde_window_size) if cfg.sde_window_size else f'{cfg.timestep_fraction:.0%} of steps'} trained"]

    def sde_window(self, step: int) -> tuple[int, int] | None:
        cfg = self.config
        if cfg.sde_window_size is None:
            return None
        positions = cfg.num_steps - cfg.sde_window_size + 1
        if cfg.sde_window_mode == "fixed":
            start = min(cfg.sde_window_start, positions - 1)
        elif cfg.sde_window_mode == "sliding":
            start = (cfg.sde_window_start + step // cfg.sde_window_shift_every) % positions
        else:  # random, identical on every rank so the batch is consistent
            g = torch.Generator().manual_seed(self.config.seed * 7919 + step)
            start = int(torch.randint(positions, (1,), generator=g))
        return (start, start + cfg.sde_window_size)

    def guidance_scale(self) -> float | None:
        cfg = self.config
        if cfg.cfg_in_training or self.policy.embedded_guidance:
            return cfg.guidance_scale
        return 1.0

    def sample_kwargs(self) -> dict:
        return {"guidance_scale": self.guidance_scale()}

    def rollout(self, step: int, records: list[dict]):
        cfg = self.config
        prompts = [r["prompt"] for r in records]
        images = self.load_condition_images(records, cfg.image_column)
        gens = self.generators(step, len(prompts) * cfg.group_size)
        with torch.no_grad(), self.accelerator.autocast():
            return sample(self.policy, prompts, num_steps=cfg.num_steps, guidance_scale=self.guidance_scale(),
                          sampler=cfg.sampler, noise=cfg.noise, eta=cfg.eta, generator=gens, images=images,
                          height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, group_size=cfg.group_size,
                          same_noise_in_group=cfg.same_noise_in_group, sde_window=self.sde_window(step),
                          reduce=cfg.log_prob_reduce)

    def compute_advantages(self, total: torch.Tensor, components: dict, raw: dict | None):
        """Gathers rewards from all ranks; returns (this rank's advantages, zero-std per sample, stats)."""
        cfg, acc = self.config, self.accelerator
        n = total.shape[0]
        gathered_total = acc.gather(total.detach())
        if cfg.multi_reward == "per_reward" and raw:
            weights = self.reward.weights
            adv_all = torch.zeros_like(gathered_total)
            zero_all = torch.ones(gathered_total.numel() // cfg.group_size, dtype=torch.bool, device=total.device)
            for key, values in raw.items():
                a, z = group_advantages(acc.gather(values.detach()), cfg.group_size, cfg.advantage_std, None)
                adv_all = adv_all + weights[key] * a
                zero_all &= z
            if cfg.advantage_clip is not None:
                adv_all = adv_all.clamp(-cfg.advantage_clip, cfg.advantage_clip)
        else:
            adv_all, zero_all = group_advantages(gathered_total, cfg.group_size, cfg.advantage_std, cfg.advantage_clip)
        rank = acc.process_index
        advantages = adv_all[rank * n:(rank + 1) * n]
        zero_std = zero_all.repeat_interleave(cfg.group_size)[rank * n:(rank + 1) * n]
        stats = {"reward_mean": float(gathered_total.mean()), "reward_std": float(gathered_total.std(unbiased=False)),
                 "zero_std_ratio": float(zero_all.float().mean()),
                 "advantage_abs_mean": float(adv_all.abs().mean())}
        for key, values in components.items():
            if key == "reward" and len(components) == 1:
                continue
            g = acc.gather(values.detach())
            stats[f"reward/{key}_mean"], stats[f"reward/{key}_std"] = float(g.mean()), float(g.std(unbiased=False))
        return advantages, zero_std, stats

    def _score_rollout(self, traj, records):
        """Rewards of a rollout (total, components, raw parts of a Combined), or None and the reason to skip."""
        from visalign.rewards import Combined

        group_records = [r for r in records for _ in range(self.config.group_size)]
        total, components, reason = self.score_or_skip(traj.images, traj.prompts, group_records)
        raw = None
        if total is not None and isinstance(self.reward, Combined):
            raw = {k: v.float() for k, v in self.reward.last_output.raw.items()}
        return total, components, raw, reason

    def train_step(self, step: int) -> dict:
        cfg, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        records = self.next_records()
        traj = self.rollout(step, records)
        t1 = time.perf_counter()
        total, components, raw, reason = self._score_rollout(traj, records)
        if total is None:
            return {"skipped": 1.0, "skip_reason": reason, "time_sampling": t1 - t0}
        advantages, zero_std, metrics = self.compute_advantages(total, components, raw)
        t2 = time.perf_counter()

        batch = traj.batch_size
        train_steps = select_train_steps(traj.sde_mask.cpu(), batch, cfg.timestep_fraction,
                                         torch.Generator().manual_seed(self.step_seed(step, 2)),
                                         window=self.sde_window(step)).to(traj.latents.device)
        old_log_probs = traj.log_probs.gather(1, train_steps)
        active = (~zero_std).float()
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(self.step_seed(step, 3)))
        if acc.num_processes == 1:  # single process: zero-std groups are skipped outright
            order = order[active[order].bool().cpu()]
        step_metrics: dict[str, list[float]] = {}
        for update in order.tensor_split(cfg.updates_per_rollout) if order.numel() else []:
            update_metrics = self._update(traj, update.to(traj.latents.device), train_steps, old_log_probs,
                                          advantages, active)
            for k, v in update_metrics.items():
                step_metrics.setdefault(k, []).append(v)
        t3 = time.perf_counter()
        metrics.update({k: sum(v) / len(v) for k, v in step_metrics.items()})
        metrics.update({"time_sampling": t1 - t0, "time_reward": t2 - t1, "time_training": t3 - t2})
        return metrics

    def _update(self, traj, index, train_steps, old_log_probs, advantages, active) -> dict:
        """One optimizer step over the samples at ``index``, in micro-batches."""
        cfg, acc = self.config, self.accelerator
        micro = cfg.micro_batch_size or index.numel()
        chunks = index.split(micro)
        normaliser = float((active[index] * train_steps.shape[1]).sum().clamp(min=1.0))
        sums: dict[str, float] = {}
        for j, chunk in enumerate(chunks):
            sub = traj.select(chunk)
            sync = contextlib.nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                out = log_prob(self.policy, sub, train_steps[chunk], detach_uncond=cfg.detach_uncond)
                kl = None
                if cfg.kl_beta > 0:
                    with self.reference():
                        ref = log_prob(self.policy, sub, train_steps[chunk])
                    b, k = out.log_probs.shape
                    std = out.stds.reshape(b * k, *([1] * (out.means.ndim - 2)))
                    kl = gaussian_kl(out.means.flatten(0, 1), ref.means.flatten(0, 1), std,
                                     cfg.log_prob_reduce).view(b, k)
                loss, m = grpo_loss(out.log_probs, old_log_probs[chunk], advantages[chunk], cfg.clip_range,
                                    kl=kl, kl_beta=cfg.kl_beta, weights=active[chunk], reduction="sum")
                acc.backward(loss / normaliser)
            share = float(active[chunk].sum()) * train_steps.shape[1] / normaliser
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / normaliser
            for key, value in m.items():
                sums[key] = sums.get(key, 0.0) + value * share
        sums.update(self.optimizer_step())
        return sums
