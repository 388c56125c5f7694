"""Reward hacking made visible: the alert on hand-made histories, and the true metric in a real run."""

import json
import warnings

import pytest

import visalign as va
from visalign.errors import ConfigError
from visalign.testing import brightness, tiny_pipeline
from visalign.training.monitor import (
    RewardHackingWarning,
    builtin_true_metric,
    hacking_alert,
    history_from_log,
    resolve_true_metric,
    trend,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


# ---------------------------------------------------------------------------- the pure alert
def test_trend_is_the_fitted_change():
    assert trend([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert trend([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.6)  # slope 0.2 over 3 intervals
    assert trend([5.0]) == 0.0


def test_alert_fires_when_the_reward_rises_and_the_true_metric_falls():
    assert hacking_alert([0.50, 0.55, 0.60], [0.40, 0.35, 0.30], window=3)
    assert hacking_alert([0.1, 0.5, 0.52, 0.55, 0.60], [0.9, 0.2, 0.35, 0.33, 0.30], window=3)  # only the last 3
    assert hacking_alert([0.50, 0.49, 0.60], [0.40, 0.41, 0.30], window=3)  # a noisy middle point


@pytest.mark.parametrize(
    "rewards, trues",
    [
        ([0.50, 0.55, 0.60], [0.30, 0.35, 0.40]),  # both rise: alignment working
        ([0.60, 0.55, 0.50], [0.40, 0.35, 0.30]),  # both fall
        ([0.50, 0.55, 0.60], [0.40, 0.40, 0.40]),  # the true metric is flat
        ([0.60, 0.55, 0.50], [0.30, 0.35, 0.40]),  # the reward falls
        ([0.50, 0.60], [0.40, 0.30]),  # fewer evaluations than the window
        ([0.9, 0.1, 0.2, 0.3], [0.1, 0.9, 0.95, 0.99]),  # the earlier drop is outside the window
    ],
)
def test_alert_stays_quiet(rewards, trues):
    assert not hacking_alert(rewards, trues, window=3)


def test_alert_tolerance_and_bad_input():
    # changes of 0.02 on values near 0.5: 4-5% of the level
    assert not hacking_alert([0.50, 0.51, 0.52], [0.40, 0.39, 0.38], window=3, tolerance=0.06)
    assert hacking_alert([0.50, 0.51, 0.52], [0.40, 0.39, 0.38], window=3, tolerance=0.01)
    # by default float jitter on flat curves does not fire, at any scale
    assert not hacking_alert([0.4987, 0.4987 + 1e-7, 0.4987 + 2e-7], [-0.4987, -0.4987 - 1e-7, -0.4987 - 2e-7])
    assert not hacking_alert([22.1, 22.1 + 1e-5, 22.1 + 2e-5], [0.5, 0.5 - 1e-7, 0.5 - 2e-7])
    assert hacking_alert([22.1, 22.2, 22.3], [0.5, 0.45, 0.4])
    with pytest.raises(ConfigError, match="window"):
        hacking_alert([1.0, 2.0], [1.0, 2.0], window=1)
    with pytest.raises(ConfigError, match="rewards"):
        hacking_alert([1.0, 2.0], [1.0], window=2)


def test_history_from_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "loss": 0.1},
        {"step": 2, "true/m": 0.4, "true/reward": 0.5},
        {"step": 4, "true/m": 0.3, "true/reward": 0.6},
        {"step": 6, "true/m": 0.2, "true/reward": 0.7},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 7, "tru')  # a line cut by a crash
    assert history_from_log(str(path), "m", before_step=6) == [(2, 0.5, 0.4), (4, 0.6, 0.3)]
    assert history_from_log(str(tmp_path / "missing.jsonl"), "m", 6) == []


def test_builtin_toy_evaluator_is_all_correct():
    from visalign.toy import render_batch

    metric = resolve_true_metric(None, va.GRPOConfig(true_metric="toy_evaluator"))
    prompts = ["a red circle on the left", "a blue square on the right"]
    scores = metric(render_batch(prompts), [prompts[0], "a blue circle on the right"])
    assert scores.tolist() == [1.0, 0.0]  # all attributes right, or not
    with pytest.raises(ConfigError, match="true_metric"):
        va.GRPOConfig(true_metric="geneval")
    with pytest.raises(ConfigError, match="Unknown true metric"):
        builtin_true_metric("geneval")
    with pytest.raises(ConfigError, match="callable"):
        resolve_true_metric("toy_evaluator", va.GRPOConfig())


# ---------------------------------------------------------------------------- in the loop
def darkness(images, prompts):
    """The negative brightness: a "true metric" that falls exactly as the brightness reward rises."""
    return -brightness(images, prompts)


def _run(tmp_path, metric, **overrides):
    cfg = va.DRaFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        num_steps=4,
        truncation=2,
        prompts_per_step=4,
        height=32,
        width=32,
        guidance_scale=1.0,
        use_lora=False,
        learning_rate=1e-2,
        max_grad_norm=None,
        trackers=["jsonl"],
        true_metric_every=1,
        hacking_window=3,
        log_every=2,
        **overrides,
    )
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    trainer.set_true_metric(metric)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    return trainer, rows, [w for w in caught if issubclass(w.category, RewardHackingWarning)]


def test_rising_reward_with_falling_true_metric_warns(tmp_path):
    trainer, rows, alerts = _run(tmp_path, darkness)
    evaluated = [r for r in rows if "true/darkness" in r]
    assert [r["step"] for r in evaluated] == [1, 2, 3, 4]  # every step, each logged once
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # steps 2 and 4 come from the true-metric hook
    rewards = [r["true/reward"] for r in evaluated]
    assert rewards[-1] > rewards[0]  # DRaFT raised the brightness of the fixed ODE samples
    for r in evaluated:  # the same images scored by both
        assert r["true/darkness"] == pytest.approx(-r["true/reward"], abs=1e-6) and r["time_true_metric"] > 0
    assert [r["hacking_suspected"] for r in evaluated][:2] == [0.0, 0.0]  # not before three evaluations
    assert evaluated[-1]["hacking_suspected"] == 1.0
    assert alerts and "darkness" in str(alerts[-1].message) and "step 4" in str(alerts[-1].message)
    assert [h[0] for h in trainer.true_history] == [1, 2, 3, 4]


def test_agreeing_true_metric_stays_quiet(tmp_path):
    _, rows, alerts = _run(tmp_path, brightness, true_metric_prompts=["a red circle", "a green triangle"])
    evaluated = [r for r in rows if "true/brightness" in r]
    assert len(evaluated) == 4 and not alerts
    assert all(r["hacking_suspected"] == 0.0 for r in evaluated)


def test_true_metric_needs_a_metric_and_is_off_by_default(tmp_path):
    cfg = va.DRaFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        num_steps=2,
        prompts_per_step=1,
        height=32,
        width=32,
        guidance_scale=1.0,
        lora_rank=4,
        trackers=["jsonl"],
        true_metric_every=1,
    )
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    with pytest.raises(ConfigError, match="true_metric_every=1 needs a true metric"):
        trainer.train()
    quiet = va.DRaFTTrainer(
        tiny_pipeline("sd3"),
        brightness,
        PROMPTS,
        va.DRaFTConfig(
            output_dir=str(tmp_path / "q"),
            max_steps=1,
            num_steps=2,
            prompts_per_step=1,
            height=32,
            width=32,
            guidance_scale=1.0,
            lora_rank=4,
            trackers=["jsonl"],
        ),
    )
    quiet.set_true_metric(darkness)  # a metric without a schedule: never evaluated
    quiet.train()
    row = json.loads(open(tmp_path / "q" / "metrics.jsonl").readline())
    assert not any(k.startswith("true/") for k in row) and not quiet.true_history


def test_grpo_takes_the_metric_as_a_keyword(tmp_path):
    cfg = va.GRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        num_steps=3,
        group_size=2,
        prompts_per_step=1,
        height=32,
        width=32,
        guidance_scale=1.0,
        lora_rank=4,
        trackers=["jsonl"],
        true_metric_every=2,
        true_metric_num_prompts=2,
    )
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg, true_metric=darkness)
    metrics = trainer.train()
    assert metrics["true/darkness"] == pytest.approx(-metrics["true/reward"], abs=1e-6)
    assert "hacking_suspected" in metrics and len(trainer.true_history) == 1


def test_resumed_run_picks_up_its_alert_history(tmp_path):
    from tests.algorithms.helpers import train_with_crash

    def make(**kw):
        cfg = va.DRaFTConfig(
            output_dir=str(tmp_path / "run"),
            max_steps=4,
            num_steps=3,
            truncation=1,
            prompts_per_step=2,
            height=32,
            width=32,
            guidance_scale=1.0,
            lora_rank=4,
            trackers=["jsonl"],
            true_metric_every=1,
            checkpoint_every=2,
            **kw,
        )
        trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        trainer.set_true_metric(darkness)
        return trainer

    train_with_crash(make(), crash_at=3)  # checkpoint at step 2; step 3 was logged before the crash
    resumed = train_with_crash(make(resume="latest"))
    assert [h[0] for h in resumed.true_history] == [1, 2, 3, 4]
