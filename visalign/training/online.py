"""The rollout stage that every online trainer shares: sample → score → gather across ranks → statistics.

GRPO, PRDP and online DPO (and the forward-process trainers to come) each start an iteration the
same way: draw ``prompts_per_step`` records, sample ``group_size`` trajectories per prompt with the
config's sampling options, score them, gather the rewards from every rank, and log the reward
statistics. :meth:`OnlineTrainer.collect` does exactly that and returns a :class:`Rollout`; the
algorithm then turns it into a loss.

**Distributed.** Each rank samples whole groups (a group never spans ranks), from its own
step-seeded generators. ``Rollout.gathered`` holds every rank's rewards in rank order, so a
statistic computed from it (a global std, the logged mean) is the same on every rank and equal to
what one process would compute on the whole batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from visalign.losses.grpo import group_advantages
from visalign.sampling import Trajectory, sample
from visalign.training.async_scoring import RolloutPipeline
from visalign.training.config import RolloutConfig
from visalign.training.trainer import Trainer


@dataclass
class Rollout:
    """One iteration's samples and their rewards, as :meth:`OnlineTrainer.collect` returns them.

    Attributes:
        records: the P prompt-source records of this rank (one per prompt).
        group_records: the B = P·G records, each repeated for its group.
        traj: the sampled :class:`~visalign.sampling.Trajectory` (B samples, groups contiguous).
        rewards: this rank's :class:`~visalign.rewards.RewardResult` (B,).
        gathered: every rank's total rewards, concatenated in rank order.
        metrics: reward statistics (``reward_mean``, ``reward_std``, ``reward/<name>_mean`` and
            ``_std`` per component) and the stage's timings.
    """

    records: list[dict]
    group_records: list[dict]
    traj: Trajectory
    rewards: object
    gathered: torch.Tensor
    metrics: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.traj.batch_size

    def rank_slice(self, rank: int) -> slice:
        """The rows of ``gathered`` (or of any gathered per-sample tensor) that belong to ``rank``."""
        n = self.batch_size
        return slice(rank * n, (rank + 1) * n)


class OnlineTrainer(Trainer):
    """A :class:`Trainer` whose iterations start from fresh samples: the shared rollout stage.

    Subclasses implement :meth:`train_step`, starting with ``rollout = self.collect(step)``.
    """

    config_class = RolloutConfig

    def optimizer_steps_per_iteration(self) -> int:
        return self.config.updates_per_rollout

    def update_parts(self, order: torch.Tensor) -> list[torch.Tensor]:
        """``order`` (sample indices) cut into ``updates_per_rollout`` parts, one per optimizer step.

        Empty parts (fewer samples than updates) are dropped: an optimizer step needs samples.
        """
        return [part for part in order.tensor_split(self.config.updates_per_rollout) if part.numel()]

    def rollout_summary(self) -> str:
        """One line of batch arithmetic for :meth:`describe`: the rollout's size and sampler."""
        cfg, world = self.config, self.accelerator.num_processes
        per_rank = cfg.prompts_per_step * cfg.group_size
        return (
            f"rollout: {cfg.prompts_per_step} prompts × {cfg.group_size} samples = {per_rank} per rank, "
            f"{per_rank * world} in all; {cfg.num_steps} steps, sampler {cfg.sampler}/{cfg.noise}"
            + (f"; sampled {cfg.rollout_batch_size} at a time" if cfg.rollout_batch_size else "")
        )

    def rollout(self, step: int, records: list[dict], policy_context=None) -> Trajectory:
        """Samples ``group_size`` trajectories per record with the config's sampling options.

        With ``rollout_batch_size`` set, at most that many samples are denoised and decoded at once
        (:func:`~visalign.sampling.sample`'s ``max_batch_size``); the trajectory is the same.

        Args:
            step: the iteration (seeds the per-sample generators and places the SDE window).
            records: prompt-source records; conditioning images come from ``image_column``.
            policy_context: a context manager under which to sample (e.g. the reference policy);
                None samples from the current weights.
        """
        cfg = self.config
        prompts = [r["prompt"] for r in records]
        images = self.load_condition_images(records)
        generators = self.generators(step, len(prompts) * cfg.group_size)
        with torch.no_grad(), policy_context or contextlib.nullcontext(), self.accelerator.autocast():
            return sample(
                self.policy,
                prompts,
                **self.sampling_kwargs(step),
                generator=generators,
                images=images,
                group_size=cfg.group_size,
                # chunks of rows of the P·G batch (a group may span two): the prompts are encoded and
                # all initial noise drawn first, and each sample keeps its generator, so the rollout
                # does not depend on the chunking
                max_batch_size=cfg.rollout_batch_size,
            )

    def compute_advantages(self, rollout: Rollout):
        """Group-relative advantages of this rank's samples from every rank's rewards (docs/math.md §2).

        Needs a config with :class:`~visalign.training.config.AdvantageOptions`. With
        ``multi_reward="per_reward"`` each raw reward of a combination is normalised on its own and
        the advantages are weighted (MixGRPO); otherwise the total is.

        Returns:
            ``(advantages (B,), zero_std (B,) bool, stats)``; ``stats`` holds ``zero_std_ratio`` and
            ``advantage_abs_mean`` over the whole gathered batch.
        """
        cfg, acc = self.config, self.accelerator
        rewards = rollout.rewards
        if cfg.multi_reward == "per_reward" and rewards.raw:
            adv_all = torch.zeros_like(rollout.gathered)
            zero_all = torch.ones(
                rollout.gathered.numel() // cfg.group_size, dtype=torch.bool, device=rollout.gathered.device
            )
            for key, values in rewards.raw.items():
                a, z = group_advantages(
                    acc.gather(values.detach().float()), cfg.group_size, cfg.advantage_std, None, eps=cfg.advantage_eps
                )
                adv_all = adv_all + rewards.weights[key] * a
                zero_all &= z
            if cfg.advantage_clip is not None:
                adv_all = adv_all.clamp(-cfg.advantage_clip, cfg.advantage_clip)
        else:
            adv_all, zero_all = group_advantages(
                rollout.gathered, cfg.group_size, cfg.advantage_std, cfg.advantage_clip, eps=cfg.advantage_eps
            )
        mine = rollout.rank_slice(acc.process_index)
        stats = {"zero_std_ratio": float(zero_all.float().mean()), "advantage_abs_mean": float(adv_all.abs().mean())}
        return adv_all[mine], zero_all.repeat_interleave(cfg.group_size)[mine], stats

    def collect(self, step: int, policy_context=None) -> Rollout | dict:
        """The rollout stage: draw records, sample, score, gather across ranks, summarise.

        Returns:
            A :class:`Rollout`, or a metrics dict ``{"skipped": 1.0, "skip_reason": ...}`` when the
            reward failed on any rank (the caller returns it as the iteration's metrics).
        """
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        # rollout_ahead: step + 1 is sampled while step is scored in a thread (training/async_scoring.py)
        pipeline = RolloutPipeline.of(self) if cfg.rollout_ahead else None
        if pipeline is None:
            records = self.next_records()
            traj = self.rollout(step, records, policy_context)
        else:
            records, traj = pipeline.take(step, policy_context)
        sampled = time.perf_counter()
        group_records = [r for r in records for _ in range(cfg.group_size)]
        result, reason = (
            pipeline.result(step)
            if pipeline is not None
            else self.score_or_skip(traj.images, traj.prompts, group_records)
        )
        if result is None:
            return {"skipped": 1.0, "skip_reason": reason, "time_sampling": sampled - start}
        gathered = acc.gather(result.total.detach())
        metrics = {"reward_mean": float(gathered.mean()), "reward_std": float(gathered.std(unbiased=False))}
        for name, values in result.components.items():
            g = acc.gather(values.detach())
            metrics[f"reward/{name}_mean"], metrics[f"reward/{name}_std"] = (
                float(g.mean()),
                float(g.std(unbiased=False)),
            )
        metrics.update({"time_sampling": sampled - start, "time_reward": time.perf_counter() - sampled})
        return Rollout(records, group_records, traj, result, gathered, metrics)


__all__ = ["OnlineTrainer", "Rollout"]
