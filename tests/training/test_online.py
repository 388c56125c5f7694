"""The shared rollout stage: sample → score → gather → statistics, for every online trainer."""

import torch

import visalign as va
from visalign.rewards import Combined, RewardResult
from visalign.testing import brightness, tiny_pipeline
from visalign.training import OnlineTrainer, Rollout, RolloutConfig


def _trainer(tmp_path, reward, **overrides):
    cfg = RolloutConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        num_steps=3,
        group_size=3,
        prompts_per_step=2,
        height=32,
        width=32,
        guidance_scale=1.0,
        **overrides,
    )
    return OnlineTrainer(tiny_pipeline("sd3"), reward, ["a red circle", "a blue square", "a green square"], cfg)


def test_collect_samples_scores_and_summarises(tmp_path):
    trainer = _trainer(tmp_path, brightness)
    rollout = trainer.collect(0)
    assert isinstance(rollout, Rollout) and rollout.batch_size == 6
    assert isinstance(rollout.rewards, RewardResult)
    # the rollout is the trajectory va.sample gives with the trainer's sampling keywords and generators
    traj = va.sample(
        trainer.policy,
        [r["prompt"] for r in rollout.records],
        **trainer.sampling_kwargs(0),
        generator=trainer.generators(0, 6),
        group_size=3,
    )
    torch.testing.assert_close(rollout.traj.latents, traj.latents, rtol=0, atol=0)
    torch.testing.assert_close(rollout.rewards.total, brightness(traj.images, traj.prompts))
    # one process: the gathered rewards are this rank's, and the statistics are theirs
    torch.testing.assert_close(rollout.gathered, rollout.rewards.total)
    assert rollout.metrics["reward_mean"] == float(rollout.gathered.mean())
    assert rollout.group_records[:3] == [rollout.records[0]] * 3
    assert rollout.rank_slice(0) == slice(0, 6)


def test_collect_logs_each_component(tmp_path):
    reward = Combined(
        {"bright": (brightness, 2.0), "dark": (lambda images, prompts: 1 - brightness(images, prompts), 1.0)}
    )
    rollout = _trainer(tmp_path, reward).collect(0)
    assert set(rollout.rewards.components) == {"bright", "dark"}
    torch.testing.assert_close(rollout.rewards.components["bright"], 2 * rollout.rewards.raw["bright"])
    for name in ("bright", "dark"):
        assert f"reward/{name}_mean" in rollout.metrics and f"reward/{name}_std" in rollout.metrics


def test_collect_skips_when_the_reward_fails(tmp_path):
    rollout = _trainer(tmp_path, lambda images, prompts: torch.full((images.shape[0],), float("nan"))).collect(0)
    assert (
        rollout["skipped"] == 1.0
        and "finite" in rollout["skip_reason"].lower()
        or "nan" in rollout["skip_reason"].lower()
    )


def test_cfg_in_training_off_samples_without_guidance(tmp_path):
    trainer = _trainer(tmp_path, brightness, cfg_in_training=False)
    assert trainer.sampling_kwargs(0)["guidance_scale"] == 1.0
    trainer = _trainer(tmp_path / "b", brightness)
    assert trainer.sampling_kwargs(0)["guidance_scale"] == 1.0 == trainer.config.guidance_scale
