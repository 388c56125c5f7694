"""GRPO (docs/math.md §2): the pure math against hand-computed numbers, and the trainer end to end."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import visalign as va
from tests.algorithms.helpers import assert_lora_export_reproduces, tiny_config, train_with_crash
from visalign.algorithms.grpo import group_advantages, grpo_loss, select_train_steps
from visalign.errors import ConfigError, RewardError
from visalign.testing import brightness, tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def make_config(tmp_path, family="sd3", **overrides):
    return tiny_config(va.GRPOConfig, tmp_path, family, **{"guidance_scale": 1.0, "clip_range": 0.2, **overrides})


def trainable_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.denoiser.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- pure math
def test_group_advantages_per_group_std():
    adv, zero = group_advantages(torch.tensor([1.0, 2, 3, 3, 0, 0, 0, 0]), 4, "group", clip=5.0, eps=1e-8)
    # group 1: mean 2.25, population std √0.6875; group 2 has zero std → advantage 0
    expected = [-1.507556704707, -0.30151134094140003, 0.9045340228242, 0.9045340228242, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    # the default floor 1e-4 (Flow-GRPO's): the deviations over √0.6875 + 1e-4 = 0.8292562
    floored, _ = group_advantages(torch.tensor([1.0, 2, 3, 3, 0, 0, 0, 0]), 4, "group", clip=5.0)
    assert floored[:4].tolist() == pytest.approx(
        [-1.25 / 0.8292562, -0.25 / 0.8292562, 0.75 / 0.8292562, 0.75 / 0.8292562], abs=1e-5
    )
    assert zero.tolist() == [False, True]


def test_group_advantages_global_std_and_clip():
    adv, _ = group_advantages(torch.tensor([1.0, 2, 3, 3, 0, 0, 0, 0]), 4, "global", clip=5.0, eps=1e-8)
    # the std over all eight rewards is 1.2686114456365274
    assert adv[:4].tolist() == pytest.approx(
        [-0.985329270397303, -0.1970658540794606, 0.5911975622383818, 0.5911975622383818], abs=1e-5
    )
    clipped, _ = group_advantages(torch.tensor([0.0, 0, 0, 100]), 4, "group", clip=1.0)
    assert clipped.tolist() == pytest.approx([-0.57735, -0.57735, -0.57735, 1.0], abs=1e-4)


def test_grpo_loss_hand_computed():
    # ρ = (e^0.1, 1), A = (1, −1), ε = 0.05:
    # sample 0: max(−1.10517, −1.05) = −1.05; sample 1: max(1, 1) = 1; mean −0.025
    log_probs, old = torch.tensor([[0.1], [0.0]]), torch.zeros(2, 1)
    loss, m = grpo_loss(log_probs, old, torch.tensor([1.0, -1.0]), clip_range=0.05)
    assert loss.item() == pytest.approx(-0.025, abs=1e-6)
    assert m["clipfrac"] == pytest.approx(0.5)
    assert m["approx_kl"] == pytest.approx(0.0025, abs=1e-7)  # ½·mean(0.1², 0)
    # with KL (0.2, 0.4) and β = 0.1 the mean KL 0.3 adds 0.03
    loss_kl, m_kl = grpo_loss(
        log_probs, old, torch.tensor([1.0, -1.0]), 0.05, kl=torch.tensor([[0.2], [0.4]]), kl_beta=0.1
    )
    assert loss_kl.item() == pytest.approx(0.005, abs=1e-6) and m_kl["kl"] == pytest.approx(0.3)
    # a weight of 0 drops a sample
    loss_w, _ = grpo_loss(log_probs, old, torch.tensor([1.0, -1.0]), 0.05, weights=torch.tensor([1.0, 0.0]))
    assert loss_w.item() == pytest.approx(-1.05, abs=1e-6)


def test_grpo_loss_gradient_raises_good_samples():
    lp = torch.zeros(2, 1, requires_grad=True)
    loss, _ = grpo_loss(lp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), clip_range=0.2)
    loss.backward()
    assert lp.grad[0, 0] < 0 < lp.grad[1, 0]  # descending the loss raises log π of the good sample


def test_select_train_steps():
    mask = torch.tensor([True, True, True, True, True])
    steps = select_train_steps(mask, batch=3, fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (3, 2) and int(steps.max()) <= 3  # never the last step
    assert all(len(set(row.tolist())) == 2 for row in steps)
    window = select_train_steps(torch.tensor([False, True, True, True, False]), 2, 0.5, None, window=(1, 4))
    assert window.tolist() == [[1, 2, 3], [1, 2, 3]]


# ---------------------------------------------------------------------------- trainer
def test_first_update_is_on_policy(tmp_path):
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path, max_steps=1))
    metrics = trainer.train()
    assert metrics["ratio_mean"] == 1.0 and metrics["clipfrac"] == 0.0 and metrics["approx_kl"] == 0.0
    assert {
        "reward_mean",
        "reward_std",
        "zero_std_ratio",
        "grad_norm",
        "time_sampling",
        "time_reward",
        "time_training",
    } <= set(metrics)


def test_later_updates_are_off_policy_and_clipped(tmp_path):
    cfg = make_config(
        tmp_path,
        max_steps=1,
        updates_per_rollout=2,
        group_size=2,
        prompts_per_step=2,
        learning_rate=5e-2,
        clip_range=1e-4,
    )
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["clipfrac"] > 0  # averaged over the two updates; the first had none


def test_more_updates_than_samples_takes_one_step_per_sample(tmp_path):
    """updates_per_rollout=4 on a rollout of 2 samples: 2 optimizer steps of one sample each, no empty step."""
    cfg = make_config(tmp_path, max_steps=1, updates_per_rollout=4, group_size=2, prompts_per_step=1)
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    trainer.train()
    assert trainer.state.optimizer_steps == 2


@pytest.mark.parametrize("family,lr", [("sd", 3e-3), ("sd3", 1e-2), ("flux", 1e-2), ("wan-t2v", 1e-2)])
def test_grpo_raises_brightness(tmp_path, family, lr):
    """30 seeded iterations of full fine-tuning lift the mean reward by more than 2× its starting spread."""
    cfg = make_config(
        tmp_path, family, max_steps=30, num_steps=6, group_size=4, use_lora=False, learning_rate=lr, max_grad_norm=None
    )
    trainer = va.GRPOTrainer(tiny_pipeline(family), brightness, PROMPTS, cfg)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    start, spread = rows[0]["reward_mean"], rows[0]["reward_std"]
    end = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert end - start > 2 * spread, (family, start, end, spread)


def _distance_to_reference(trainer):
    traj = trainer.rollout(999, [{"prompt": p} for p in PROMPTS[:2]])
    steps = torch.nonzero(traj.sde_mask[:-1]).flatten()
    with torch.no_grad():
        ours = va.log_prob(trainer.policy, traj, steps)
        with trainer.reference():
            ref = va.log_prob(trainer.policy, traj, steps)
    return float((ours.means - ref.means).pow(2).mean())


def test_kl_keeps_the_policy_near_the_reference(tmp_path):
    distances = {}
    for beta in (0.0, 50.0):
        cfg = make_config(
            tmp_path / str(beta), max_steps=8, group_size=4, learning_rate=2e-2, kl_beta=beta, lora_rank=8
        )
        trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        metrics = trainer.train()
        distances[beta] = _distance_to_reference(trainer)
        if beta:
            assert metrics["kl"] > 0
    assert distances[50.0] < distances[0.0], distances


def test_image_to_video_runs_end_to_end(tmp_path):
    rng = np.random.RandomState(0)
    rows = []
    for i in range(2):
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / f"frame{i}.png")
        rows.append({"prompt": PROMPTS[i], "image": f"frame{i}.png"})
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = make_config(tmp_path, "wan-i2v", max_steps=2, sample_every=2, sample_prompts=None)
    trainer = va.GRPOTrainer(tiny_pipeline("wan-i2v"), brightness, str(tmp_path / "prompts.jsonl"), cfg)
    metrics = trainer.train()
    assert metrics["ratio_mean"] == 1.0
    assert os.path.exists(tmp_path / "run" / "samples" / "step-000002.json")


def test_per_reward_advantages_with_combined(tmp_path):
    reward = va.rewards.Combined({"bright": (brightness, 1.0), "red": (lambda im, p: im[:, 0].flatten(1).mean(1), 0.5)})
    cfg = make_config(tmp_path, max_steps=1, multi_reward="per_reward")
    metrics = va.GRPOTrainer(tiny_pipeline("sd3"), reward, PROMPTS, cfg).train()
    assert {"reward/bright_mean", "reward/red_std"} <= set(metrics)


def test_exact_resume_after_a_crash(tmp_path):
    def run(output_dir, crash_at=None, resume=None):
        cfg = make_config(
            tmp_path,
            max_steps=4,
            checkpoint_every=2,
            keep_last=1,
            output_dir=str(output_dir),
            resume=resume,
            learning_rate=1e-2,
            ema_decay=0.9,
        )
        trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        return train_with_crash(trainer, crash_at)

    full = run(tmp_path / "full")
    run(tmp_path / "crashed", crash_at=3)
    checkpoints = os.listdir(tmp_path / "crashed" / "checkpoints")
    assert checkpoints == ["step-2"]  # step 3 was lost with the crash; no partial checkpoint remains
    resumed = run(tmp_path / "crashed", resume="latest")
    assert resumed.state.step == 4
    a, b = trainable_state(full), trainable_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.cat([p.flatten() for p in full.ema.shadow_params])
    ema_b = torch.cat([p.flatten() for p in resumed.ema.shadow_params])
    assert torch.equal(ema_a, ema_b)


def test_lora_export_reproduces_the_trained_policy(tmp_path):
    cfg = make_config(tmp_path, max_steps=3, learning_rate=5e-2)
    trainer = va.GRPOTrainer(tiny_pipeline("flux"), brightness, PROMPTS, cfg)
    trainer.train()
    assert_lora_export_reproduces(trainer, "flux", PROMPTS[:2], tmp_path / "lora")


def test_save_pretrained_fuses_lora(tmp_path):
    trainer = va.GRPOTrainer(
        tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path, max_steps=2, learning_rate=5e-2)
    )
    trainer.train()
    trainer.save_pretrained(str(tmp_path / "full"))
    kwargs = dict(num_steps=4, sampler="ode", height=32, width=32, guidance_scale=1.0)
    ours = va.sample(trainer.policy, PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kwargs)
    loaded = va.load(str(tmp_path / "full"), local_files_only=True)
    assert not getattr(loaded.denoiser, "peft_config", None)
    theirs = va.sample(loaded, PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(theirs.images, ours.images, rtol=0, atol=1e-5)


def test_outputs_trackers_and_samples(tmp_path):
    cfg = make_config(
        tmp_path, max_steps=2, trackers=["jsonl", "tensorboard"], sample_every=1, sample_prompts=["a red circle"]
    )
    va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg).train()
    run = tmp_path / "run"
    assert (run / "config.yaml").exists()
    assert va.GRPOConfig.from_yaml(str(run / "config.yaml")).group_size == 2
    assert len(open(run / "metrics.jsonl").readlines()) == 2
    assert any("tfevents" in f for _, _, files in os.walk(run / "logs") for f in files)
    sample = json.load(open(run / "samples" / "step-000001.json"))
    assert sample["samples"][0]["prompt"] == "a red circle" and "reward" in sample["samples"][0]
    assert (run / "samples" / "step-000001.png").exists()


# ---------------------------------------------------------------------------- bad input
def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="group_size.*>= 2"):
        make_config(tmp_path, group_size=1)
    with pytest.raises(ConfigError, match="a multiple of group_size"):
        make_config(tmp_path, group_size=4, batch_size=6)
    with pytest.raises(ConfigError, match="ODE sampler"):
        make_config(tmp_path, sampler="ode")
    with pytest.raises(ConfigError, match="Did you mean 'group_size'"):
        va.GRPOConfig().with_overrides(["grup_size=4"])


def test_bad_rewards_are_skipped_then_stop(tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        if calls["n"] == 2:
            return torch.full((images.shape[0],), float("nan"))
        return brightness(images, prompts)

    cfg = make_config(tmp_path, max_steps=3)
    va.GRPOTrainer(tiny_pipeline("sd3"), flaky, PROMPTS, cfg).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r.get("skipped", 0) for r in rows] == [0, 1.0, 0] and "non-finite" in rows[1]["skip_reason"]

    wrong_shape = lambda images, prompts: torch.zeros(images.shape[0] + 1)  # noqa: E731
    cfg = make_config(tmp_path / "b", max_steps=10, max_bad_steps=3)
    with pytest.raises(RewardError, match="3 iterations in a row were skipped: .*shape") as info:
        va.GRPOTrainer(tiny_pipeline("sd3"), wrong_shape, PROMPTS, cfg).train()
    assert "step-3" in str(info.value) and os.path.isdir(tmp_path / "b" / "run" / "checkpoints" / "step-3")
