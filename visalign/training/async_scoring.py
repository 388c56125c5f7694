"""Asynchronous scoring for online trainers: score rollout k in a background thread while rollout k+1 is sampled.

A slow reward (a VLM judge, OCR on the CPU, a :class:`~visalign.rewards.RemoteReward` on another
machine) leaves the policy idle while it scores. With ``rollout_ahead=True`` the rollout stage of
:class:`~visalign.training.online.OnlineTrainer` becomes a two-deep pipeline::

    collect(k):  [rollout k: sampled during collect(k-1), its scoring already started]
                 sample rollout k+1 with the current weights ──┐   meanwhile the worker thread scores k,
                 submit its scoring                            │   then k+1 (while iteration k trains)
                 wait for the rewards of k ◀───────────────────┘
    train(k) on rollout k

The training update of iteration k needs the rewards of k, so overlap needs the next rollout to be
sampled *before* that update: rollout k+1 comes from the weights before update k (one update
stale, as in asynchronous RL). The algorithms already correct for this where they can: GRPO's
ratio is taken against the log-probs recorded at sampling (``traj.log_probs``), so the PPO clip
bounds the off-policy step. The default (``rollout_ahead=False``) is the synchronous stage,
bit-identical to a trainer without this module.

**What holds.**

- Determinism: rewards are computed by one worker thread, in step order, with the step-seeded
  generator of the step they score (not of the step the main loop is on), and every rank agrees on
  skips in the main thread. A pipelined run repeated with the same config gives the same result.
- Exact resume: a checkpoint holds weights and prompt-sampler state *after* update k, not the weights
  that sampled a prefetched rollout. So the pipeline drains before every iteration after which the
  loop saves a checkpoint, saves samples or evaluates the true metric: the next iteration samples
  synchronously, from the weights just saved, as a resumed run does. A run killed and resumed
  from its latest checkpoint therefore continues bit-exactly (one synchronous iteration per
  ``checkpoint_every`` is the price). Drain points come from the config alone, so every rank
  drains at the same iterations.
- Skips: a ``RewardError`` in the worker (a reward server down, NaN scores) skips that step on
  every rank, as in the synchronous stage; the next prefetched rollout is unaffected.
- Scope: only rollouts sampled from the current policy can be sampled ahead; a trainer that samples
  under a policy context (DiffusionNFT's old policy, online DPO from the reference) gets a
  ``ConfigError``. The reward must not be used from another thread at the same time (the loop's own
  uses are drained; a user callback that scores runs while the next rollout may be scored).

The option belongs to :class:`AsyncRolloutOptions`, which every online trainer's config inherits::

    va.GRPOTrainer(policy, reward, prompts, va.GRPOConfig(rollout_ahead=True, ...)).train()
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import torch

from visalign.config import ConfigBase, config_field
from visalign.errors import ConfigError, RewardError

__all__ = ["AsyncRolloutOptions", "RolloutPipeline", "drains_after"]

# After iteration ``step`` the loop may save or score on the main thread; these fields say when.
_DRAIN_FIELDS = ("checkpoint_every", "sample_every", "true_metric_every")


@dataclass
class AsyncRolloutOptions(ConfigBase):
    """Pipelined rollouts: the next rollout is sampled while the current one is scored (see the module docstring)."""

    rollout_ahead: bool = config_field(
        False,
        "Sample the next iteration's rollout (from weights one update stale) while a background thread scores "
        "this one, hiding a slow or remote reward behind sampling and training. Off: synchronous, as before.",
    )


def drains_after(config, step: int) -> bool:
    """Whether the pipeline must be empty after iteration ``step``: a checkpoint, samples or the true metric
    follow it, or it is the last. Then nothing is sampled ahead for ``step + 1``.
    """
    done = step + 1
    if done >= config.max_steps:
        return True
    return any((getattr(config, name, 0) or 0) and done % getattr(config, name) == 0 for name in _DRAIN_FIELDS)


class RolloutPipeline:
    """The two-deep rollout pipeline of one :class:`~visalign.training.online.OnlineTrainer` (one per trainer).

    :meth:`take` returns rollout ``step`` (prefetched, or sampled now) with its scoring started, and
    samples and submits rollout ``step + 1`` unless the pipeline drains after ``step``; :meth:`result`
    then waits for the rewards of ``step`` and agrees on skips across ranks, as
    :meth:`~visalign.training.trainer.Trainer.score_or_skip` does.

    Attributes:
        sampled_ahead (`list[int]`): the steps whose rollout was sampled during the previous iteration.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ahead: tuple[int, list[dict], object] | None = None
        self.sampled_ahead: list[int] = []

    @classmethod
    def of(cls, trainer) -> RolloutPipeline:
        """The trainer's pipeline, created on first use."""
        pipeline = trainer.__dict__.get("_rollout_pipeline")
        if pipeline is None:
            pipeline = trainer._rollout_pipeline = cls(trainer)
        return pipeline

    # -- the stage -------------------------------------------------------------------------------
    def take(self, step: int, policy_context=None):
        """Rollout ``step`` as ``(records, traj)``, its scoring submitted; samples ``step + 1`` unless draining."""
        trainer = self.trainer
        if policy_context is not None:
            raise ConfigError(
                f"rollout_ahead samples the next rollout from the current policy, but {type(trainer).__name__} samples "
                "under another policy (a reference or old-policy context); set rollout_ahead=False for it."
            )
        if self._ahead is not None and self._ahead[0] == step:
            _, records, traj = self._ahead
            self.sampled_ahead.append(step)
        else:
            self.discard()  # nothing usable ahead (first step, after a drain, or a step that was skipped over)
            records = trainer.next_records()
            traj = trainer.rollout(step, records)
            self._submit(step, records, traj)
        self._ahead = None
        if not drains_after(trainer.config, step):
            ahead_records = trainer.next_records()
            ahead = trainer.rollout(step + 1, ahead_records)  # the current weights: one update stale when trained on
            self._submit(step + 1, ahead_records, ahead)
            self._ahead = (step + 1, ahead_records, ahead)
        return records, traj

    def result(self, step: int):
        """``(result, reason)`` for rollout ``step``: waits for its rewards; None and a reason when any rank failed."""
        result, reason = None, ""
        try:
            result = self._pending.pop(step).result()
        except RewardError as exc:
            reason = str(exc)
        return self.trainer.agree_on_skip(result, reason)

    def discard(self) -> None:
        """Drops the rollout sampled ahead and waits for any scoring still running."""
        for future in self._pending.values():
            try:
                future.result()
            except Exception:  # an abandoned rollout's failure concerns nobody
                pass
        self._pending.clear()
        self._ahead = None

    def close(self) -> None:
        """Discards pending work and stops the worker thread."""
        self.discard()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- the worker ------------------------------------------------------------------------------
    def _submit(self, step: int, records: list[dict], traj) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="visalign-reward")
        group = [r for r in records for _ in range(self.trainer.config.group_size)]
        self._pending[step] = self._executor.submit(self._score, step, traj.images, list(traj.prompts), group)

    def _score(self, step: int, images: torch.Tensor, prompts: list[str], records: list[dict]):
        """:meth:`Trainer.score` for an explicit ``step`` (the main loop may be a step ahead by now)."""
        with torch.no_grad():  # grad mode is per thread
            return self.trainer.score(images, prompts, records, step=step)
