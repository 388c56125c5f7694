"""Pipelined rollouts (rollout_ahead): rollout k+1 is sampled while rollout k is scored in a worker thread."""

import contextlib
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import visalign as va
from tests.algorithms.helpers import train_with_crash
from visalign.errors import ConfigError, RewardError
from visalign.testing import brightness, tiny_pipeline
from visalign.training.async_scoring import RolloutPipeline, drains_after

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def config(output_dir, **overrides):
    base = dict(
        output_dir=str(output_dir),
        max_steps=3,
        num_steps=3,
        group_size=2,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        learning_rate=1e-2,
        trackers=["jsonl"],
        rollout_ahead=True,
    )
    return va.GRPOConfig(**{**base, **overrides})


def trainer_for(output_dir, reward=brightness, **overrides):
    return va.GRPOTrainer(tiny_pipeline("sd3"), reward, PROMPTS, config(output_dir, **overrides))


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.denoiser.named_parameters() if p.requires_grad}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class TimedReward:
    """Brightness that sleeps, recording the thread and time span of every call."""

    def __init__(self, seconds=0.0):
        self.seconds, self.calls = seconds, []

    def __call__(self, images, prompts):
        start = time.perf_counter()
        time.sleep(self.seconds)
        self.calls.append((threading.current_thread().name, start, time.perf_counter()))
        return brightness(images, prompts)


def test_drain_points_come_from_the_config():
    cfg = SimpleNamespace(max_steps=6, checkpoint_every=2, sample_every=0, true_metric_every=3)
    # after step s the loop is at s + 1: checkpoints at 2, 4, 6, true metric at 3, 6, and 6 is the end
    assert [s for s in range(6) if drains_after(cfg, s)] == [1, 2, 3, 5]
    assert [s for s in range(3) if drains_after(SimpleNamespace(max_steps=3), s)] == [2]


def test_default_is_the_synchronous_stage(tmp_path):
    plain = va.GRPOTrainer(
        tiny_pipeline("sd3"),
        brightness,
        PROMPTS,
        va.GRPOConfig(**{k: v for k, v in vars(config(tmp_path / "a")).items() if k != "rollout_ahead"}),
    )
    plain.train()
    off = trainer_for(tmp_path / "b", rollout_ahead=False)
    off.train()
    assert "_rollout_pipeline" not in off.__dict__
    assert_same_weights(trainable(plain), trainable(off))


def test_next_rollout_is_sampled_from_the_current_weights(tmp_path):
    ahead = trainer_for(tmp_path / "ahead")
    rollout = ahead.collect(0)
    pipeline = RolloutPipeline.of(ahead)
    step, records, traj = pipeline._ahead
    assert step == 1
    # a synchronous trainer with the same (untouched) weights draws the same records and samples
    sync = trainer_for(tmp_path / "sync", rollout_ahead=False)
    first = sync.collect(0)
    torch.testing.assert_close(rollout.traj.latents, first.traj.latents, rtol=0, atol=0)
    assert torch.equal(rollout.rewards.total, first.rewards.total)
    next_records = sync.next_records()
    assert next_records == records
    torch.testing.assert_close(traj.latents, sync.rollout(1, next_records).latents, rtol=0, atol=0)
    pipeline.close()


def test_scoring_overlaps_sampling_in_a_worker_thread(tmp_path):
    reward = TimedReward(seconds=0.3)
    trainer = trainer_for(tmp_path, reward)
    sample_starts = {}
    rollout = trainer.rollout

    def timed_rollout(step, records, policy_context=None):
        sample_starts[step] = time.perf_counter()
        return rollout(step, records, policy_context)

    trainer.rollout = timed_rollout
    seen = []
    trainer.add_callback(lambda t, step, metrics: seen.append(metrics))
    trainer.train()
    assert RolloutPipeline.of(trainer).sampled_ahead == [1, 2]
    assert [name.startswith("visalign-reward") for name, _, _ in reward.calls] == [True] * 3
    # rollout k+1 was being sampled while the reward of k was still running
    for k in (0, 1):
        _, _, reward_end = reward.calls[k]
        assert sample_starts[k + 1] < reward_end
    assert all("reward_mean" in m and not m.get("skipped") for m in seen)


def test_a_failing_reward_skips_only_its_step(tmp_path):
    calls = []

    def flaky(images, prompts):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RewardError("the reward server is restarting")
        return brightness(images, prompts)

    trainer = trainer_for(tmp_path, flaky, max_steps=4)
    seen = []
    trainer.add_callback(lambda t, step, metrics: seen.append(metrics))
    trainer.train()
    assert [bool(m.get("skipped")) for m in seen] == [False, True, False, False]
    assert "restarting" in seen[1]["skip_reason"]


def test_pipelined_run_resumes_bit_exactly(tmp_path):
    full = trainer_for(tmp_path / "full", max_steps=5, checkpoint_every=2)
    full.train()
    # checkpoints after steps 1 and 3 drain the pipeline; step 4 is the last
    assert RolloutPipeline.of(full).sampled_ahead == [1, 3]
    crashed = train_with_crash(trainer_for(tmp_path / "run", max_steps=5, checkpoint_every=2), crash_at=3)
    assert crashed.state.step == 3
    resumed = trainer_for(tmp_path / "run", max_steps=5, checkpoint_every=2, resume="latest")
    resumed.train()
    assert resumed.state.step == 5
    assert_same_weights(trainable(full), trainable(resumed))


def test_sampling_under_a_policy_context_is_refused(tmp_path):
    trainer = trainer_for(tmp_path)
    with pytest.raises(ConfigError, match="rollout_ahead=False"):
        trainer.collect(0, policy_context=contextlib.nullcontext())
