"""Reward hacking made visible: a true metric logged beside the reward, and an alert when they part ways.

A learned reward is a proxy. Where a truer measurement exists (the toy world's exact evaluator, a
held-out preference model, a GenEval-style checker), the training loop evaluates it on a schedule
(``true_metric_every``) on fixed prompts sampled with the ODE from fixed seeds, and logs it beside
the reward of the same images: ``true/<name>`` and ``true/reward``. When, over the last
``hacking_window`` evaluations, the reward rose while the true metric fell, :func:`hacking_alert`
fires: the loop logs ``hacking_suspected`` = 1 and warns with a :class:`RewardHackingWarning`.

Give any trainer the metric as a callable ``fn(images, prompts) -> Tensor[B]`` with
``trainer.set_true_metric(fn)`` (or ``true_metric=fn`` where the trainer's constructor takes it, as
:class:`~visalign.training.trainer.Trainer`'s and GRPO's do), or name a built-in one in the config
(``true_metric: toy_evaluator`` in a recipe)::

    trainer = va.DRaFTTrainer(policy, reward, prompts, va.DRaFTConfig(true_metric_every=10))
    trainer.set_true_metric(my_metric)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

from visalign.errors import ConfigError

__all__ = [
    "TRUE_METRICS",
    "RewardHackingWarning",
    "builtin_true_metric",
    "hacking_alert",
    "hacking_message",
    "check_true_metric",
    "history_from_log",
    "resolve_true_metric",
    "trend",
]

# The built-in true metrics a config can name (``LoopOptions.true_metric``).
TRUE_METRICS = ("toy_evaluator",)


class RewardHackingWarning(UserWarning):
    """The reward rose while the true metric fell: the policy may be exploiting the reward."""


def trend(values: Sequence[float]) -> float:
    """The least-squares line's change over ``values`` (slope × (n − 1)); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    cov = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    var = sum((i - mean_x) ** 2 for i in range(n))
    return cov / var * (n - 1)


def hacking_alert(
    reward_history: Sequence[float], true_history: Sequence[float], window: int = 3, tolerance: float = 1e-3
) -> bool:
    """Whether the reward rose while the true metric fell over the last ``window`` evaluations.

    Rising and falling are read from least-squares lines through the last ``window`` values
    (:func:`trend`), which a single noisy evaluation sways less than the first-to-last difference.

    Args:
        reward_history: the reward at each evaluation, oldest first.
        true_history: the true metric at the same evaluations.
        window: how many of the latest evaluations to compare (>= 2).
        tolerance: the least change over the window that counts as a rise or a fall, relative to
            the window's mean absolute value, so that float jitter on a flat curve does not fire.

    Returns:
        True when the reward's fitted change over the window is above ``tolerance`` (relative) and the
        true metric's is below −``tolerance`` (relative); False with fewer than ``window`` evaluations.
    """
    if window < 2:
        raise ConfigError(f"hacking_alert needs a window of at least 2 evaluations, got {window}.")
    if len(reward_history) != len(true_history):
        raise ConfigError(
            f"hacking_alert got {len(reward_history)} rewards but {len(true_history)} true-metric "
            "values; pass one of each per evaluation."
        )
    if len(reward_history) < window:
        return False
    rewards, trues = list(reward_history[-window:]), list(true_history[-window:])

    def scale(values):
        return tolerance * max(sum(abs(v) for v in values) / len(values), 1e-12)

    return trend(rewards) > scale(rewards) and trend(trues) < -scale(trues)


def hacking_message(
    name: str, reward_history: Sequence[float], true_history: Sequence[float], window: int, step: int
) -> str:
    """The warning's text: what rose, what fell, over which evaluations."""
    rewards, trues = reward_history[-window:], true_history[-window:]
    return (
        f"Possible reward hacking at step {step}: over the last {window} evaluations the reward rose "
        f"({rewards[0]:.4g} → {rewards[-1]:.4g}) while the true metric '{name}' fell ({trues[0]:.4g} → "
        f"{trues[-1]:.4g}). Inspect the samples; consider a KL term, a lower learning rate or an earlier "
        "checkpoint."
    )


def builtin_true_metric(name: str) -> Callable:
    """A built-in true metric by name: ``toy_evaluator`` is the toy world's exact evaluator, scoring 1
    for a sample with every attribute of its caption right and 0 otherwise (its mean is ``all_correct``).
    """
    if name == "toy_evaluator":
        from visalign.toy import ToyEvaluatorReward

        return ToyEvaluatorReward(all_or_nothing=True, name="toy_evaluator")
    raise ConfigError(f"Unknown true metric {name!r}; use one of {TRUE_METRICS} or pass true_metric=fn to the trainer.")


def resolve_true_metric(metric: Callable | None, config) -> Callable | None:
    """The trainer's true metric: the given callable, else the config's built-in one (``true_metric``), else None."""
    if metric is not None and not callable(metric):
        raise ConfigError(
            f"true_metric must be a callable (images, prompts) -> Tensor[B]; got {type(metric).__name__}."
        )
    if metric is None and getattr(config, "true_metric", None):
        metric = builtin_true_metric(config.true_metric)
    return metric


def check_true_metric(metric: Callable | None, config, has_prompts: bool) -> None:
    """Raises a ConfigError when ``true_metric_every`` is set without a metric or without prompts."""
    if not getattr(config, "true_metric_every", 0):
        return
    if metric is None:
        raise ConfigError(
            f"true_metric_every={config.true_metric_every} needs a true metric: call "
            f"trainer.set_true_metric(fn), pass true_metric=fn, or set true_metric to one of "
            f"{TRUE_METRICS}."
        )
    if not has_prompts and not config.true_metric_prompts:
        raise ConfigError(
            "true_metric_every needs prompts to evaluate on: set true_metric_prompts or give the trainer prompts."
        )


def history_from_log(path: str | None, name: str, before_step: int) -> list[tuple[int, float, float]]:
    """The ``(step, reward, true)`` evaluations logged in ``metrics.jsonl`` before ``before_step``.

    A resumed run picks up its alert history here (rows past the checkpoint, from the interrupted
    run, are ignored). Missing file: an empty history.
    """
    if not path or not os.path.exists(path):
        return []
    rows: dict[int, tuple[int, float, float]] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            step = row.get("step")
            if isinstance(step, int) and step < before_step and f"true/{name}" in row and "true/reward" in row:
                rows[step] = (step, float(row["true/reward"]), float(row[f"true/{name}"]))
    return [rows[s] for s in sorted(rows)]
