"""What the training loop evaluates on a schedule, on fixed prompts and seeds: saved samples with
their rewards (:meth:`Evaluations.save_samples`) and the true metric beside the reward, with the
reward-hacking alert (:meth:`Evaluations.evaluate_true_metric`, :mod:`visalign.training.monitor`).

:class:`~visalign.training.trainer.Trainer` inherits these; they use its policy, reward, config,
logger and EMA weights.
"""

from __future__ import annotations

import time

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.pipelines.datatypes import Geometry

__all__ = ["Evaluations"]


class Evaluations:
    """Scheduled evaluations of a :class:`~visalign.training.trainer.Trainer` (mixed into it)."""

    def eval_geometry(self) -> Geometry:
        """The size evaluations and saved samples are generated at: ``eval_height``, ``eval_width`` and
        ``eval_num_frames``, each falling back to the training size (``height``, ...) when None.

        Raises:
            ConfigError: the size is not one the policy's family can generate (height and width must
                be multiples of ``policy.spatial_multiple``; videos have the family's frame rule).
        """
        cfg, policy = self.config, self.policy
        m = policy.spatial_multiple
        for key in ("eval_height", "eval_width"):
            value = getattr(cfg, key)
            if value is not None and (value <= 0 or value % m):
                raise ConfigError(
                    f"{key}={value} is not a positive multiple of {m}, which {policy.family} needs (VAE "
                    f"downsampling × patch size). Use {key}={max(m, round(value / m) * m)}, or None for the "
                    "training size."
                )
        size = [getattr(cfg, key) for key in ("height", "width", "num_frames")]
        size = [t if e is None else e for t, e in zip(size, (cfg.eval_height, cfg.eval_width, cfg.eval_num_frames))]
        try:
            return policy.geometry(*size)
        except InvalidInputError as exc:
            given = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("eval_height", "eval_width", "eval_num_frames"))
            raise ConfigError(f"The evaluation size ({given}; None is the training size) is invalid: {exc}") from None

    def check_eval_size(self) -> None:
        """Raises a ConfigError now when an ``eval_*`` size is set that the family cannot generate."""
        cfg = self.config
        if any(getattr(cfg, k, None) is not None for k in ("eval_height", "eval_width", "eval_num_frames")):
            self.eval_geometry()

    def eval_batch_size(self) -> int | None:
        """The most evaluation samples generated at once (None: all).

        Evaluation sampling is the rollout's kind of call (no gradient, denoise and decode), so
        ``rollout_batch_size`` bounds it; ``micro_batch_size`` bounds forwards that keep activations
        for backward, a much smaller budget per sample, and is the fallback only so that runs that
        set nothing else keep sampling their evaluations in the chunks they did before. (An eval
        size larger than the training size costs more per sample: lower rollout_batch_size then.)
        """
        return self.config.rollout_batch_size or self.config.micro_batch_size

    def save_samples(self, step: int) -> None:
        """Samples ``config.sample_prompts`` with fixed seeds (ODE) at :meth:`eval_geometry` and saves them
        with their rewards.
        """
        from visalign.sampling import sample

        prompts = self.config.sample_prompts or (self.prompt_source.prompts[:4] if self.prompt_source else None)
        if not prompts or not self.is_main_process or self.reward is None:
            return
        geometry = self.eval_geometry()
        records = [{"prompt": p} for p in prompts]
        images = None
        if self.policy.needs_image:
            records = [self.prompt_source[i] for i in range(min(4, len(self.prompt_source)))]
            prompts = [r["prompt"] for r in records]
            images = self.load_condition_images(records, geometry)
        cfg = self.config
        with torch.no_grad(), self.ema_weights():
            traj = sample(
                self.policy,
                prompts,
                num_steps=cfg.num_steps,
                sampler="ode",
                images=images,
                generator=[torch.Generator(self.accelerator.device).manual_seed(i) for i in range(len(prompts))],
                guidance_scale=self.guidance_scale(),
                height=geometry.height,
                width=geometry.width,
                num_frames=geometry.num_frames,
                max_batch_size=self.eval_batch_size(),
            )
            rewards = self.score(traj.images, traj.prompts, records).total
        self.logger.save_samples(traj.images, traj.prompts, rewards, step)

    def set_true_metric(self, metric) -> None:
        """Sets the true metric ``metric(images, prompts) -> Tensor[B]`` that :meth:`evaluate_true_metric` watches."""
        from visalign.training.monitor import resolve_true_metric

        self.true_metric = resolve_true_metric(metric, self.config)

    def evaluate_true_metric(self, step: int) -> dict:
        """Every ``config.true_metric_every`` steps (and at the last): the true metric beside the reward.

        Samples fixed prompts (``true_metric_prompts``, or ``true_metric_num_prompts`` evenly spaced
        training prompts) with the ODE from fixed seeds at :meth:`eval_geometry`, at most
        :meth:`eval_batch_size` at a time, with the EMA weights when there are any, and
        scores the same images with the true metric and the reward. Logs ``true/<name>``,
        ``true/reward``, ``time_true_metric`` and ``hacking_suspected``; warns with a
        :class:`~visalign.training.monitor.RewardHackingWarning` when the reward rose while the true
        metric fell over the last ``hacking_window`` evaluations (visalign.training.monitor).

        Returns:
            The logged metrics ({} off schedule); the loop merges them into the step's metrics.
        """
        import warnings

        from visalign.rewards import call_reward
        from visalign.rewards.base import reward_name
        from visalign.sampling import sample
        from visalign.training.monitor import (
            RewardHackingWarning,
            check_true_metric,
            hacking_alert,
            hacking_message,
            history_from_log,
        )

        cfg, metric = self.config, self.true_metric
        check_true_metric(metric, cfg, self.prompt_source is not None)
        if not cfg.true_metric_every or (step % cfg.true_metric_every and step != cfg.max_steps):
            return {}
        start = time.perf_counter()
        if cfg.true_metric_prompts and not self.policy.needs_image:
            records = [{"prompt": p} for p in cfg.true_metric_prompts]
        else:
            n = len(self.prompt_source)
            k = min(cfg.true_metric_num_prompts, n)
            records = [self.prompt_source[i * n // k] for i in range(k)]
        prompts = [r["prompt"] for r in records]
        geometry = self.eval_geometry()
        chunk = self.eval_batch_size() or len(prompts)  # scored chunk by chunk too: the images are the big part
        true_values, rewards = [], []
        with torch.no_grad(), self.ema_weights(), self.accelerator.autocast():
            for i in range(0, len(prompts), chunk):
                part = records[i : i + chunk]
                traj = sample(
                    self.policy,
                    prompts[i : i + chunk],
                    num_steps=cfg.num_steps,
                    sampler="ode",
                    images=self.load_condition_images(part, geometry),
                    guidance_scale=self.guidance_scale(),
                    generator=[
                        torch.Generator(self.accelerator.device).manual_seed(1000 + i + j) for j in range(len(part))
                    ],
                    height=geometry.height,
                    width=geometry.width,
                    num_frames=geometry.num_frames,
                )
                true_values.append(call_reward(metric, traj.images, traj.prompts).total.float().cpu())
                if self.reward is not None:
                    rewards.append(self.score(traj.images, traj.prompts, part).total.float().cpu())
        name = reward_name(metric) if reward_name(metric) != "<lambda>" else "metric"
        true = float(torch.cat(true_values).mean())
        row = {f"true/{name}": true, "time_true_metric": time.perf_counter() - start}
        if rewards:
            reward = row["true/reward"] = float(torch.cat(rewards).mean())
            if not self.true_history and step > cfg.true_metric_every:  # resumed: the history is in the log
                self.true_history = history_from_log(self.logger.path, name, step)
            self.true_history.append((step, reward, true))
            reward_hist, true_hist = [h[1] for h in self.true_history], [h[2] for h in self.true_history]
            fired = hacking_alert(reward_hist, true_hist, cfg.hacking_window)
            row["hacking_suspected"] = float(fired)
            if fired and self.is_main_process:
                warnings.warn(
                    hacking_message(name, reward_hist, true_hist, cfg.hacking_window, step),
                    RewardHackingWarning,
                    stacklevel=2,
                )
        if not ((step - 1) % cfg.log_every == 0 or step == cfg.max_steps):  # the loop does not log this step
            self.logger.log(row, step=step)
        return row
