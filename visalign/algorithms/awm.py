"""Advantage Weighted Matching (Xue et al., arXiv 2509.25050; docs/math.md §9).

One iteration:

1. the shared rollout stage samples G per prompt from the current policy, with any sampler (the ODE
   by default), and scores them; only the clean samples x0 and the rewards are kept;
2. group-relative advantages, clipped to ±advantage_clip and divided by it (∈ [−1, 1]);
3. ``updates_per_rollout`` optimizer steps, each on its share of the samples, in micro-batches; a
   micro-batch draws one stratified set of K rollout-step indices (``discrete_wo_init`` never
   trains at σ = 1), and every (sample, σ) a fresh ε, shared by all passes at that x_σ. The loss is
   :func:`visalign.losses.awm.awm_loss`: PPO-clipped advantage-weighted matching, whose ratio is
   exactly 1 on-policy (ℓ_old = sg(ℓ)), plus anchors to the base model and to an EMA of the policy.
   Later updates of the same rollout are off-policy; their ℓ_old comes from a snapshot of the
   weights that sampled the rollout (the official behaviour);
4. the EMA anchor θ_ema ← d·θ_ema + (1−d)·θ with d = min(ema_anchor_max, ema_anchor_rate·s).

A reward that is constant within every group gives nothing to learn: the iteration is skipped
with a warning, and the loop stops after ``max_bad_steps`` of them in a row.

Example::

    trainer = va.AWMTrainer(policy, reward, ["a red circle", "a blue square"],
                            va.AWMConfig(group_size=8, num_steps=14, max_steps=100))
    trainer.train()
    trainer.save_lora("lora/")
"""

from __future__ import annotations

import contextlib
import time

import torch

from visalign.algorithms.awm_config import AWMConfig
from visalign.algorithms.forward_process import ForwardProcessTrainer
from visalign.losses.awm import (
    awm_advantages,
    awm_log_weight,
    awm_loss,
    ema_anchor_decay,
    matching_error,
    stratified_indices,
)
from visalign.training.lagged import LaggedWeights

__all__ = ["AWMConfig", "AWMTrainer", "awm_loss", "stratified_indices"]

INDEX_STREAM = 20_000


class AWMTrainer(ForwardProcessTrainer):
    """AWM on the shared training loop. See the module docstring and :class:`AWMConfig`.

    Attributes:
        ema_anchor: the EMA of the trainable weights the policy is anchored to
            (:class:`~visalign.training.lagged.LaggedWeights`, checkpointed), or None when
            ``ema_anchor_beta`` is 0.
    """

    config_class = AWMConfig
    algorithm_name = "AWM"

    def __init__(self, policy, reward=None, prompts=None, config: AWMConfig | None = None, accelerator=None):
        super().__init__(policy, reward, prompts, config, accelerator)
        self.ema_anchor = None
        if self.config.ema_anchor_beta > 0:
            self.ema_anchor = LaggedWeights(self.trainable_parameters, offload=self.config.offload_copies)
            self.accelerator.register_for_checkpointing(self.ema_anchor)
        # The weights that sampled the current rollout, for the off-policy updates after the first.
        self.behaviour = None
        if self.config.updates_per_rollout > 1:
            self.behaviour = LaggedWeights(self.trainable_parameters, copy=False, offload=self.config.offload_copies)

    @property
    def needs_reference(self) -> bool:
        return self.config.ref_beta > 0

    def lagged_copies(self) -> list[str]:
        cfg = self.config
        return ["EMA anchor"] * (cfg.ema_anchor_beta > 0) + ["behaviour snapshot"] * (cfg.updates_per_rollout > 1)

    def batch_arithmetic(self) -> list[str]:
        cfg = self.config
        return [
            self.rollout_summary(),
            f"training: {cfg.strata()} noise levels per sample ({cfg.time_sampling}), cond-only, {cfg.weighting} "
            f"weighting; anchors: base {cfg.ref_beta:g}, EMA {cfg.ema_anchor_beta:g}; "
            f"{cfg.updates_per_rollout} optimizer step(s) per rollout",
        ]

    def train_step(self, step: int) -> dict:
        cfg = self.config
        rollout, advantages, metrics = self.collect_with_advantages(step)
        if rollout is None:
            return metrics
        t_train = time.perf_counter()
        traj = rollout.traj
        adv = awm_advantages(advantages, cfg.advantage_clip)
        data = {
            "x0": traj.final_latents.float(),
            "adv": adv,
            "cond": self.training_conditioning(traj),
            "sigmas": traj.schedule.sigmas.to(adv.device),
            "timesteps": traj.schedule.timesteps.to(adv.device),
            "num_steps": traj.num_steps,
        }
        if self.behaviour is not None:
            self.behaviour.refresh()
        order = torch.randperm(traj.batch_size, generator=torch.Generator().manual_seed(self.step_seed(step, 3)))
        history: dict[str, list[float]] = {}
        # tensor_split's empty parts are trailing, so dropping them keeps every part's index u.
        for u, update in enumerate(self.update_parts(order)):
            for k, v in self._update(step, u, update.to(adv.device), data).items():
                history.setdefault(k, []).append(v)
        metrics.update({k: sum(v) / len(v) for k, v in history.items()})
        metrics["advantage_rescaled_abs_mean"] = float(adv.abs().mean())
        if self.ema_anchor is not None:
            decay = ema_anchor_decay(self.iteration_optimizer_steps(step), cfg.ema_anchor_rate, cfg.ema_anchor_max)
            self.ema_anchor.update(decay)
            metrics["ema_anchor_decay"] = decay
        metrics["time_training"] = time.perf_counter() - t_train
        return metrics

    def _update(self, step: int, update: int, index: torch.Tensor, data: dict) -> dict:
        """One optimizer step over the samples at ``index``; a micro-batch shares one stratified index set."""
        cfg, acc = self.config, self.accelerator
        chunks, strata = self.chunks(index), cfg.strata()
        passes = []
        for c, rows in enumerate(chunks):
            gen = torch.Generator().manual_seed(self.step_seed(step, INDEX_STREAM + 1000 * update + c))
            picks = stratified_indices(data["num_steps"], strata, cfg.timestep_fraction, cfg.time_sampling, gen)
            passes += [(rows, j, int(i)) for j, i in enumerate(picks)]
        sums: dict[str, float] = {}
        for n, (rows, j, i) in enumerate(passes):
            sigma = data["sigmas"][i].expand(rows.numel())
            timesteps = data["timesteps"][i].expand(rows.numel())
            x0 = data["x0"][rows]
            noise = self.training_noise(step, rows, j, x0)
            x_t, target = self.policy.add_noise(x0, noise, sigma), self.policy.training_target(x0, noise, sigma)
            cond = data["cond"].select(rows)
            # The lagged and base passes come first: the graph of the trained pass never sees swapped weights.
            old_log_w = v_ema = v_ref = None
            if update > 0 and self.behaviour is not None:
                with self.behaviour.swapped():
                    v_old = self.predict(x_t, timesteps, cond)
                old_log_w = awm_log_weight(matching_error(v_old, target), sigma, cfg.weighting, cfg.ghuber_power)
            if self.ema_anchor is not None:
                with self.ema_anchor.swapped():
                    v_ema = self.predict(x_t, timesteps, cond)
            if cfg.ref_beta > 0:
                with self.reference():
                    v_ref = self.predict(x_t, timesteps, cond)
            sync = contextlib.nullcontext() if n == len(passes) - 1 else acc.no_sync(self.model)
            with sync:
                v = self.predict(x_t, timesteps, cond)
                loss, m = awm_loss(
                    v,
                    target,
                    sigma,
                    data["adv"][rows],
                    old_log_w,
                    cfg.clip_range,
                    cfg.weighting,
                    cfg.ghuber_power,
                    v_ref=v_ref,
                    ref_beta=cfg.ref_beta,
                    v_ema=v_ema,
                    ema_beta=cfg.ema_anchor_beta,
                )
                share = rows.numel() / (index.numel() * strata)
                acc.backward(loss * share)
            m["sigma_mean"] = float(sigma.mean())
            for key, value in m.items():
                sums[key] = sums.get(key, 0.0) + value * share
        sums.update(self.optimizer_step())
        return sums
