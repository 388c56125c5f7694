"""DiffusionNFT: online RL on the forward process (Zheng et al., arXiv 2509.16117; docs/math.md §8).

One iteration:

1. the shared rollout stage samples G per prompt from the **old** policy θ_old (a lagged copy of the
   trainable weights, :class:`~visalign.training.lagged.LaggedWeights`), with any sampler (the ODE by
   default, optionally with CFG), and scores them; only the clean samples x0 and the rewards are kept;
2. rewards become group-relative advantages and optimality probabilities r = A/10 + ½ (clip 5);
3. ``updates_per_rollout`` optimizer steps, each on its share of the samples: every sample trains on
   its own random ``timestep_fraction`` of the rollout's σ table, with a fresh ε per (sample, σ); at
   each x_σ the old policy (no grad), the base model (for the penalty) and the trained policy are
   evaluated without CFG, and the loss is :func:`visalign.losses.nft.nft_loss`;
4. θ_old ← d·θ_old + (1−d)·θ with d from ``decay_type`` (or ``old_decay``).

Training never needs log-probabilities or the sampler's trajectory, so rollouts may come from any
sampler; the sample cost is the old policy's. A reward that is constant within every group gives
nothing to learn: the iteration is skipped with a warning, and the loop stops after
``max_bad_steps`` of them in a row.

Example::

    trainer = va.NFTTrainer(policy, reward, ["a red circle", "a blue square"],
                            va.NFTConfig(group_size=8, num_steps=10, max_steps=100))
    trainer.train()
    trainer.save_lora("lora/")
"""

from __future__ import annotations

import contextlib
import time

import torch

from visalign.algorithms.forward_process import ForwardProcessTrainer
from visalign.algorithms.nft_config import NFTConfig
from visalign.losses.nft import nft_loss, old_policy_decay, optimality_probability
from visalign.training.lagged import LaggedWeights

__all__ = ["NFTConfig", "NFTTrainer", "nft_loss", "old_policy_decay", "optimality_probability"]


class NFTTrainer(ForwardProcessTrainer):
    """DiffusionNFT on the shared training loop. See the module docstring and :class:`NFTConfig`.

    Attributes:
        old: the old policy θ_old, a :class:`~visalign.training.lagged.LaggedWeights` of the
            trainable weights (the LoRA adapter, or the denoiser for full fine-tuning), checkpointed.
    """

    config_class = NFTConfig
    algorithm_name = "DiffusionNFT"

    def __init__(self, policy, reward=None, prompts=None, config: NFTConfig | None = None, accelerator=None):
        super().__init__(policy, reward, prompts, config, accelerator)
        self.old = LaggedWeights(self.trainable_parameters, offload=self.config.offload_copies)
        self.accelerator.register_for_checkpointing(self.old)

    @property
    def needs_reference(self) -> bool:
        return self.config.kl_beta > 0

    def lagged_copies(self) -> list[str]:
        return ["old policy"]

    def batch_arithmetic(self) -> list[str]:
        cfg = self.config
        decay = f"d = {cfg.old_decay:g}" if cfg.old_decay is not None else f"decay_type {cfg.decay_type}"
        return [
            self.rollout_summary() + " (from the old policy)",
            f"training: {cfg.num_train_levels()} of {cfg.num_steps} noise levels per sample, cond-only; "
            f"β {cfg.beta:g}, penalty {cfg.kl_beta:g}; {cfg.updates_per_rollout} optimizer step(s) per rollout; "
            f"old policy {decay}",
        ]

    def old_decay(self, optimizer_steps: int) -> float:
        """The old-policy decay after ``optimizer_steps`` steps: ``old_decay`` or ``decay_type``'s schedule."""
        cfg = self.config
        return cfg.old_decay if cfg.old_decay is not None else old_policy_decay(optimizer_steps, cfg.decay_type)

    def train_step(self, step: int) -> dict:
        cfg = self.config
        rollout, advantages, metrics = self.collect_with_advantages(step, policy_context=self.old.swapped())
        if rollout is None:
            return metrics
        t_train = time.perf_counter()
        traj = rollout.traj
        batch, levels = traj.batch_size, cfg.num_train_levels()
        gen = torch.Generator().manual_seed(self.step_seed(step, 2))
        slots = torch.stack([torch.randperm(traj.num_steps, generator=gen)[:levels] for _ in range(batch)])
        r = optimality_probability(advantages, cfg.advantage_clip)
        data = {
            "x0": traj.final_latents.float(),
            "r": r,
            "cond": self.training_conditioning(traj),
            "sigmas": traj.schedule.sigmas.to(r.device),
            "timesteps": traj.schedule.timesteps.to(r.device),
            "slots": slots.to(r.device),
        }
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(self.step_seed(step, 3)))
        history: dict[str, list[float]] = {}
        for update in self.update_parts(order):
            for k, v in self._update(step, update.to(r.device), data).items():
                history.setdefault(k, []).append(v)
        metrics.update({k: sum(v) / len(v) for k, v in history.items()})
        decay = self.old_decay(self.iteration_optimizer_steps(step))
        self.old.update(decay)
        metrics.update({"old_decay": decay, "r_mean": float(r.mean()), "time_training": time.perf_counter() - t_train})
        return metrics

    def _update(self, step: int, index: torch.Tensor, data: dict) -> dict:
        """One optimizer step over the samples at ``index``: every (micro-batch, noise level) pass backs up."""
        cfg, acc = self.config, self.accelerator
        chunks, levels = self.chunks(index), data["slots"].shape[1]
        passes = [(rows, j) for rows in chunks for j in range(levels)]
        sums: dict[str, float] = {}
        for n, (rows, j) in enumerate(passes):
            slot = data["slots"][rows, j]
            sigma, timesteps = data["sigmas"][slot], data["timesteps"][slot]
            x0 = data["x0"][rows]
            x_t = self.policy.add_noise(x0, self.training_noise(step, rows, j, x0), sigma)
            cond = data["cond"].select(rows)
            # The lagged and base passes come first: the graph of the trained pass never sees swapped weights.
            with self.old.swapped():
                v_old = self.predict(x_t, timesteps, cond)
            v_ref = None
            if cfg.kl_beta > 0:
                with self.reference():
                    v_ref = self.predict(x_t, timesteps, cond)
            sync = contextlib.nullcontext() if n == len(passes) - 1 else acc.no_sync(self.model)
            with sync:
                v = self.predict(x_t, timesteps, cond)
                loss, m = nft_loss(
                    v,
                    v_old,
                    x_t,
                    x0,
                    sigma,
                    data["r"][rows],
                    cfg.beta,
                    cfg.advantage_clip,
                    v_ref=v_ref,
                    kl_beta=cfg.kl_beta,
                )
                share = rows.numel() / (index.numel() * levels)
                acc.backward(loss * share)
            for key, value in m.items():
                if key != "r_mean":
                    sums[key] = sums.get(key, 0.0) + value * share
        sums.update(self.optimizer_step())
        return sums
