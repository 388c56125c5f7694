"""Preference optimisation for diffusion and flow models: Diffusion-DPO and Flow-DPO (docs/math.md §3).

Diffusion-DPO is Wallace et al., arXiv 2311.12908; Flow-DPO and Flow-RWR are from VideoAlign
(Liu et al., arXiv 2501.13918).

A pair (chosen, rejected) of one prompt is noised with one shared ε to one shared level; the policy
and the reference regress on the family's target, and the loss rewards the policy for lowering its
error on the chosen sample more than on the rejected one, relative to the reference (the math,
the β schedules and the level draw: docs/math.md §3; the pure functions: :mod:`visalign.losses.dpo`).
Training regresses the conditional model (no CFG; FLUX keeps its guidance embedding).

- **offline** (``mode="offline"``): a CSV/JSONL of ``prompt, chosen, rejected`` image paths, encoded
  by the VAE and optionally cached (:mod:`visalign.training.pairs`).
- **online** (``mode="online"``): the shared rollout stage samples G per prompt and scores them; the
  best is paired against the worst. ``ref_refresh_every=K`` refreshes the reference from the
  current weights every K iterations (:class:`~visalign.training.reference.ReferenceSnapshot`),
  which turns DPO into online/iterative DPO; without it the reference is the base model.
- ``updates_per_rollout=K`` takes K optimizer steps on each batch of pairs, each at a fresh ε and level.
- ``loss="sft"`` regresses on the chosen samples only; ``loss="rwr"`` (Flow-RWR) on every sample,
  weighted by softmax(r/``rwr_beta``) within its group (offline, a pair is a group of two).

**Distributed.** A rank always runs the same number of forwards and backwards (groups without a
reward spread are dropped in a single process, kept at weight 0 under several).

Example::

    # pairs.jsonl: {"prompt": "a red circle", "chosen": "w/0.png", "rejected": "l/0.png"}
    trainer = va.DPOTrainer(policy, None, "pairs.jsonl", va.DPOConfig(beta=2000, prompts_per_step=8))
    trainer.train()

    cfg = va.DPOConfig(mode="online", group_size=4, ref_refresh_every=10)   # best vs worst of 4
    va.DPOTrainer(policy, reward, ["a red circle", "a blue square"], cfg).train()
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import torch

from visalign.algorithms.dpo_config import DPOConfig
from visalign.errors import ConfigError
from visalign.losses.dpo import best_worst_pairs, dpo_beta, dpo_loss, prediction_errors, rwr_weights
from visalign.training.online import OnlineTrainer
from visalign.training.pairs import PairLatents, check_pairs
from visalign.training.reference import ReferenceSnapshot


class DPOTrainer(OnlineTrainer):
    """Diffusion-/Flow-DPO (and SFT, Flow-RWR) on the shared loop. See the module docstring.

    Args:
        policy: a Policy or a diffusers pipeline.
        reward: the reward (online mode and offline RWR); None for offline DPO/SFT.
        prompts: offline: the pairs file (CSV/JSONL with ``prompt``, ``chosen``, ``rejected``) or a list
            of such dicts; online: prompts as for any trainer.
        config: a :class:`DPOConfig`.
    """

    config_class = DPOConfig

    def __init__(self, policy, reward=None, prompts=None, config: DPOConfig | None = None, accelerator=None, **kwargs):
        from visalign.pipelines import wrap
        from visalign.training.prompts import PromptSource

        cfg = config if config is not None else DPOConfig()
        if not isinstance(cfg, DPOConfig):
            super().__init__(policy, reward, prompts, cfg, accelerator)  # raises, naming the config expected
        if (cfg.mode == "online" or cfg.loss == "rwr") and reward is None:
            raise ConfigError(f"DPO with mode={cfg.mode!r} and loss={cfg.loss!r} scores samples: pass a reward.")
        if cfg.mode == "offline":  # checked before any model work, so a bad pairs file fails fast
            policy = wrap(policy)
            if policy.is_video or policy.needs_image:
                raise ConfigError(f"Offline DPO reads image pairs; {policy.family} generates video. Use mode='online'.")
            if prompts is None:
                raise ConfigError("Offline DPO needs a pairs file: CSV/JSONL with prompt, chosen and rejected columns.")
            prompts = PromptSource.from_any(prompts)
            check_pairs(prompts, cfg.chosen_column, cfg.rejected_column)
        super().__init__(policy, reward, prompts, cfg, accelerator, **kwargs)
        self.snapshot = None
        if cfg.ref_refresh_every:
            self.snapshot = ReferenceSnapshot(self.trainable_parameters, offload=cfg.offload_copies)
            self.accelerator.register_for_checkpointing(self.snapshot)
        self.pair_latents = None
        if cfg.mode == "offline":
            self.pair_latents = PairLatents(
                self.policy,
                self.prompt_source,
                self.policy.geometry(cfg.height, cfg.width, cfg.num_frames),
                self.accelerator.device,
                cfg.latent_cache_dir,
                (cfg.chosen_column, cfg.rejected_column),
                self.accelerator.autocast,
            )

    @property
    def needs_reference(self) -> bool:
        cfg = self.config
        uses_reference = cfg.loss == "dpo" or (cfg.mode == "online" and cfg.sample_from == "reference")
        return uses_reference and not cfg.ref_refresh_every

    def lagged_copies(self) -> list[str]:
        return ["reference snapshot"] if self.config.ref_refresh_every else []

    def batch_arithmetic(self) -> list[str]:
        cfg, world = self.config, self.accelerator.num_processes
        if cfg.mode == "online":
            data = (
                f"{self.rollout_summary()}, from the {cfg.sample_from} policy → ≤{cfg.prompts_per_step} pairs per rank"
            )
        else:
            data = f"offline: {cfg.prompts_per_step} pairs per rank, {cfg.prompts_per_step * world} in all"
        ref = (
            f"reference refreshed every {cfg.ref_refresh_every} iterations"
            if cfg.ref_refresh_every
            else "reference = base model"
        )
        return [
            data,
            f"loss {cfg.loss}, β {cfg.beta:g} ({cfg.beta_schedule}); {ref}; "
            f"{cfg.updates_per_rollout} optimizer step(s) per batch",
        ]

    def reference_context(self):
        """The reference policy: the refreshed snapshot when there is one, else the base model."""
        if self.snapshot is not None:
            return self.snapshot.swapped()
        return self.reference()

    def load_pair_latents(self, records: list[dict]):
        """VAE latents (and pixels when needed) of offline pairs: see :meth:`PairLatents.load`."""
        return self.pair_latents.load(records, need_pixels=self.config.loss == "rwr")

    # ------------------------------------------------------------------ online data
    def online_pairs(self, step: int):
        """The rollout stage, then best-vs-worst pairs: ``(batch, metrics)``; ``batch`` is None on a skip.

        ``batch`` holds ``x0_w``, ``x0_l`` (best and worst of each group with a reward spread),
        ``weights``, ``records``, ``images``, and for RWR ``x0_all``, ``records_all``, ``images_all``.
        """
        cfg = self.config
        rollout = self.collect(step, self.reference_context() if cfg.sample_from == "reference" else None)
        if isinstance(rollout, dict):
            return None, rollout
        metrics, total, traj = dict(rollout.metrics), rollout.rewards.total, rollout.traj
        best, worst, gap, active = best_worst_pairs(total, cfg.group_size)
        metrics["reward_gap"] = float(gap[active].mean()) if bool(active.any()) else 0.0
        metrics["pairs_used"] = float(active.sum())
        # One process drops inactive pairs; several keep them at weight 0, so that every rank runs the
        # same forwards and backwards (DDP reduces gradients in step). SFT needs no spread.
        keep = active if self.accelerator.num_processes == 1 and cfg.loss == "dpo" else torch.ones_like(active)
        images = None if traj.cond_images is None else traj.cond_images[:: cfg.group_size]
        latents = traj.final_latents.float()
        batch = {
            "x0_w": latents[best[keep]],
            "x0_l": latents[worst[keep]],
            "weights": (active if cfg.loss == "dpo" else torch.ones_like(active))[keep].float(),
            "records": [r for r, k in zip(rollout.records, keep.tolist()) if k],
            "images": None if images is None else images[keep],
        }
        if cfg.loss == "rwr":
            batch.update(
                x0_all=latents,
                weights=rwr_weights(total, cfg.group_size, cfg.rwr_beta),
                records_all=rollout.group_records,
                images_all=traj.cond_images,
            )
        return batch, metrics

    # ------------------------------------------------------------------ the step
    def noise_levels(self, step: int, count: int, draw: int = 0):
        """Per-pair noise levels from step-seeded generators: ``(level, timesteps)``.

        ``draw`` numbers the gradient steps on one batch, each with its own levels. ``level`` is σ
        (flow) or ᾱ_t (DDPM), as :meth:`~visalign.pipelines.Policy.training_noise_levels` maps the draw.
        """
        cfg, device = self.config, self.accelerator.device
        gens = self.generators(step, count, stream=3 + 1000 * draw)  # ε uses stream 2 + 1000·draw
        normal = torch.cat([torch.randn(1, generator=g, device=device) for g in gens])
        uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in gens])
        kind = self.policy.default_level_sampling if cfg.timestep_sampling == "auto" else cfg.timestep_sampling
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal) if kind == "logit_normal" else uniform
        return self.policy.training_noise_levels(u, self.policy.geometry(cfg.height, cfg.width, cfg.num_frames))

    def _conditioning(self, prompts: list[str], images):
        cfg = self.config
        # The conditional model is trained (as Diffusion-DPO); embedded guidance (FLUX) is its input.
        scale = cfg.guidance_scale if self.policy.embedded_guidance else 1.0
        geometry = self.policy.geometry(cfg.height, cfg.width, cfg.num_frames)
        with torch.no_grad():
            return self.policy.encode_prompt(prompts, None, scale, images=images, geometry=geometry)

    def _errors(self, x: torch.Tensor, timesteps: torch.Tensor, conditioning, target: torch.Tensor):
        with self.accelerator.autocast():
            pred = self.policy.predict(x, timesteps, conditioning)
        return prediction_errors(pred, target)

    def train_step(self, step: int) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        if self.snapshot is not None and step % cfg.ref_refresh_every == 0:
            self.snapshot.refresh()
        metrics: dict = {}
        if cfg.mode == "online":
            batch, metrics = self.online_pairs(step)
            if batch is None:
                return metrics
            x0_w, x0_l, records, images = batch["x0_w"], batch["x0_l"], batch["records"], batch["images"]
            pair_weights, pixels = batch["weights"], None
        else:
            records = self.next_records()
            x0_w, x0_l, pix_w, pix_l = self.load_pair_latents(records)
            images, pixels = None, (pix_w, pix_l)
            pair_weights = torch.ones(x0_w.shape[0], device=x0_w.device)
        t1 = time.perf_counter()
        if cfg.loss == "rwr":
            if cfg.mode == "online":
                x0, weights, recs, imgs = batch["x0_all"], batch["weights"], batch["records_all"], batch["images_all"]
            else:
                x0, recs, imgs, weights, rwr_metrics = self._offline_rwr(records, x0_w, x0_l, pixels)
                if x0 is None:
                    return rwr_metrics
                metrics.update(rwr_metrics)
            update = partial(self._regression_update, step, x0, weights, recs, imgs)
        elif x0_w.shape[0] == 0:  # one process, and no group had a reward spread: no update
            update = None
            metrics["loss"] = float("nan")
        elif cfg.loss == "sft":
            update = partial(self._regression_update, step, x0_w, pair_weights, records, images)
        else:
            update = partial(self._dpo_update, step, x0_w, x0_l, pair_weights, records, images)
        if update is not None:
            # Each gradient step sees the same pairs at fresh noise and levels; metrics are their mean.
            per_step = [update(draw=draw) for draw in range(cfg.updates_per_rollout)]
            metrics.update({k: sum(m[k] for m in per_step) / len(per_step) for k in per_step[0]})
        metrics.update({"time_data": t1 - t0, "time_training": time.perf_counter() - t1})
        return metrics

    def _offline_rwr(self, records, x0_w, x0_l, pixels):
        """Offline RWR: each pair is a group of two, weighted by the reward of its images."""
        pix_w, pix_l = pixels
        both = torch.stack([pix_w, pix_l], 1).flatten(0, 1)
        recs = [r for r in records for _ in range(2)]
        result, reason = self.score_or_skip(both, [r["prompt"] for r in recs], recs)
        if result is None:
            return None, None, None, None, {"skipped": 1.0, "skip_reason": reason}
        x0 = torch.stack([x0_w, x0_l], 1).flatten(0, 1)
        weights = rwr_weights(result.total, 2, self.config.rwr_beta)
        return x0, recs, None, weights, {"reward_mean": float(result.total.mean())}

    def _chunks(self, n: int):
        size = self.config.micro_batch_size or n
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    def _noise_draw(self, step: int, x0: torch.Tensor, draw: int):
        """ε and the levels of gradient step ``draw`` on a batch: ``(noise, level, timesteps)``."""
        from diffusers.utils.torch_utils import randn_tensor

        level, timesteps = self.noise_levels(step, x0.shape[0], draw)
        noise = randn_tensor(
            tuple(x0.shape),
            generator=self.generators(step, x0.shape[0], stream=2 + 1000 * draw),
            device=x0.device,
            dtype=torch.float32,
        )
        return noise, level, timesteps

    def _noised(self, x0, noise, level):
        """The noisy input and the regression target of each row (the family's forward process)."""
        return self.policy.add_noise(x0, noise, level), self.policy.training_target(x0, noise, level)

    def _dpo_update(self, step, x0_w, x0_l, weights, records, images, draw: int = 0) -> dict:
        cfg, acc = self.config, self.accelerator
        n = x0_w.shape[0]
        noise, level, timesteps = self._noise_draw(step, x0_w, draw)
        beta = dpo_beta(cfg.beta, cfg.beta_schedule, level, self.policy.prediction_type)
        prompts = [r["prompt"] for r in records]
        weight_total = float(weights.sum().clamp(min=1e-12))
        sums: dict[str, float] = {}
        chunks = self._chunks(n)
        for j, idx in enumerate(chunks):
            sel = torch.tensor(list(idx), device=x0_w.device)
            (x_w, tgt_w), (x_l, tgt_l) = (self._noised(x0[sel], noise[sel], level[sel]) for x0 in (x0_w, x0_l))
            cond = self._conditioning([prompts[i] for i in idx], None if images is None else images[sel])
            cond2 = type(cond).cat([cond, cond])
            x, t, target = torch.cat([x_w, x_l]), torch.cat([timesteps[sel]] * 2), torch.cat([tgt_w, tgt_l])
            with self.reference_context():  # first: the policy's graph must never see swapped weights
                ref_err = self._errors(x, t, cond2, target)
            sync = contextlib.nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model)
            with sync:
                err = self._errors(x, t, cond2, target)
                b = len(idx)
                loss, m = dpo_loss(
                    err[:b], err[b:], ref_err[:b], ref_err[b:], beta[sel], weights=weights[sel], reduction="sum"
                )
                acc.backward(loss / weight_total)
            share = float(weights[sel].sum()) / weight_total
            for key, value in m.items():
                sums[key] = sums.get(key, 0.0) + value * share
        sums.update(self.optimizer_step())
        return sums

    def _regression_update(self, step, x0, weights, records, images, draw: int = 0) -> dict:
        """SFT / RWR: minimise Σ_i w_i·e_θ,i (weights sum to 1 over the batch)."""
        acc = self.accelerator
        noise, level, timesteps = self._noise_draw(step, x0, draw)
        weights = weights / weights.sum()
        prompts = [r["prompt"] for r in records]
        total_loss, chunks = 0.0, self._chunks(x0.shape[0])
        for j, idx in enumerate(chunks):
            sel = torch.tensor(list(idx), device=x0.device)
            x, target = self._noised(x0[sel], noise[sel], level[sel])
            cond = self._conditioning([prompts[i] for i in idx], None if images is None else images[sel])
            sync = contextlib.nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model)
            with sync:
                err = self._errors(x, timesteps[sel], cond, target)
                loss = (weights[sel] * err).sum()
                acc.backward(loss)
            total_loss += float(loss.detach())
        out = {"loss": total_loss, "err_chosen": total_loss}
        out.update(self.optimizer_step())
        return out


__all__ = ["DPOConfig", "DPOTrainer", "dpo_beta", "dpo_loss", "prediction_errors", "rwr_weights"]
