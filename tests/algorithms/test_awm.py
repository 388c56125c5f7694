"""Advantage Weighted Matching (REFERENCE §9, docs/math.md §9): the pure math against hand-computed
numbers, and the trainer end to end on tiny policies."""

import json

import pytest
import torch

import visalign as va
from tests.algorithms.helpers import tiny_config, train_with_crash
from visalign.errors import ConfigError, RewardError
from visalign.losses.awm import (
    anchor_loss,
    awm_advantages,
    awm_log_weight,
    awm_loss,
    awm_policy_loss,
    ema_anchor_decay,
    matching_error,
    stratified_indices,
)
from visalign.testing import brightness, tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def make_config(tmp_path, family="sd3", **overrides):
    return tiny_config(va.AWMConfig, tmp_path, family, **{"num_steps": 6, **overrides})


def trainable_state(trainer):
    return [p.detach().clone() for p in trainer.trainable_parameters]


def rows_of(tmp_path, run="run"):
    return [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]


def _noisy(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    x0, eps, v = (torch.randn(batch, 2, 4, 4, generator=g) for _ in range(3))
    return x0, eps, v


# ---------------------------------------------------------------------------- pure math
def test_advantage_rescale():
    assert awm_advantages(torch.tensor([10.0, -10.0, 2.5, 0.0]), 5.0).tolist() == [1.0, -1.0, 0.5, 0.0]
    for bad in (0.0, -1.0, None):
        with pytest.raises(ConfigError, match="clip_max"):
            awm_advantages(torch.zeros(2), bad)


def test_strata_with_14_steps():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_indices(14, 6, 0.9, "discrete_wo_init", g) for _ in range(400)])
    expected = [{1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]
    assert [set(draws[:, k].tolist()) for k in range(6)] == expected
    assert not {0, 12, 13} & set(draws.flatten().tolist())
    with_init = torch.stack([stratified_indices(14, 6, 0.9, "discrete", g) for _ in range(400)])
    assert [set(with_init[:, k].tolist()) for k in range(6)] == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]
    with pytest.raises(ConfigError, match="do not fit"):
        stratified_indices(14, 12, 0.9, "discrete_wo_init")  # only 11 indices in [1, 12)


def test_ghuber_and_uniform_weighting_hand_computed():
    m = torch.tensor([16.0], dtype=torch.float64)
    # −σ·((16 + 1e-10)^¼ − 1e-10^¼)/¼ = −0.5·(2 − 0.0031622777)·4
    assert awm_log_weight(m, 0.5, "ghuber", 0.25).item() == pytest.approx(-0.5 * (2 - 10**-2.5) * 4, rel=1e-9)
    assert awm_log_weight(m, 0.5, "uniform").item() == -16.0
    x0, eps, v = _noisy()
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    m = matching_error(v, eps - x0)
    assert m.dtype == torch.float64
    # p = 1 reduces ghuber to σ·m
    torch.testing.assert_close(awm_log_weight(m, sigma, "ghuber", 1.0), -sigma * m, rtol=1e-12, atol=1e-12)


def test_on_policy_ratio_is_one_and_the_loss_is_minus_mean_advantage():
    x0, eps, v = _noisy()
    adv = torch.tensor([1.0, -0.5, 0.25])
    loss, m = awm_loss(v.requires_grad_(), eps - x0, torch.tensor([0.9, 0.5, 0.1]), adv)
    assert m["ratio_mean"] == 1.0 and m["clipfrac"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12) and m["matching"] > 0


def test_gradient_is_advantage_weighted_matching():
    """p = 1: ∇ policy = mean(A·σ·∇m); A = 0 gives exactly no gradient."""
    x0, eps, v = _noisy()
    sigma, adv = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([1.0, -0.5, 0.0])
    v1 = v.clone().requires_grad_()
    awm_loss(v1, eps - x0, sigma, adv, weighting="ghuber", power=1.0)[0].backward()
    v2 = v.clone().requires_grad_()
    (adv * sigma * matching_error(v2, eps - x0).float()).mean().backward()
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-5, atol=1e-8)
    assert v1.grad[2].abs().max() == 0
    v0 = v.clone().requires_grad_()
    awm_loss(v0, eps - x0, sigma, torch.zeros(3))[0].backward()
    assert v0.grad.abs().max() == 0


def test_redrawn_noise_breaks_the_ratio():
    """Regression: the old and new passes must share ε; a redrawn ε gives ρ ≠ 1 at identical weights."""
    x0, eps, v = _noisy()
    other = torch.randn(eps.shape, generator=torch.Generator().manual_seed(9))
    sigma = torch.tensor([0.9, 0.5, 0.1])
    same = awm_log_weight(matching_error(v, eps - x0), sigma)
    redrawn = awm_log_weight(matching_error(v, other - x0), sigma)
    _, ratio_same = awm_policy_loss(same, same.clone(), torch.ones(3))
    _, ratio_redrawn = awm_policy_loss(same, redrawn, torch.ones(3))
    assert torch.equal(ratio_same, torch.ones(3, dtype=torch.float64))
    assert (ratio_redrawn - 1).abs().min() > 1e-3


def test_policy_clip_hand_computed():
    # ρ = e^ln3 = 3, A = 1, ε = 1: max(−3, −2) = −2; A = −1: max(3, 2) = 3
    log_w, old = torch.tensor([torch.log(torch.tensor(3.0))] * 2, dtype=torch.float64), torch.zeros(2)
    loss, ratio = awm_policy_loss(log_w, old, torch.tensor([1.0, -1.0]), clip_range=1.0)
    assert ratio.tolist() == pytest.approx([3.0, 3.0]) and loss.item() == pytest.approx((-2.0 + 3.0) / 2)


def test_anchors_hand_computed():
    v, anchor = torch.ones(2, 3), torch.tensor([[1.0, 1, 1], [0, 0, 0]])
    assert anchor_loss(v, anchor).item() == 0.5 and anchor_loss(v, None).item() == 0.0
    _, base = awm_loss(v, v, 0.5, torch.zeros(2))
    loss, m = awm_loss(v, v, 0.5, torch.zeros(2), v_ref=anchor, ref_beta=0.1, v_ema=torch.zeros(2, 3), ema_beta=2.0)
    assert m["ref_anchor"] == 0.5 and m["ema_anchor"] == 1.0 and loss.item() == pytest.approx(0.1 * 0.5 + 2.0)


def test_ema_anchor_decay():
    assert ema_anchor_decay(100) == pytest.approx(0.1) and ema_anchor_decay(1000) == 0.3 and ema_anchor_decay(0) == 0


# ---------------------------------------------------------------------------- trainer
def test_two_iterations_lora_sd3(tmp_path):
    trainer = va.AWMTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path, learning_rate=1e-2))
    before = trainable_state(trainer)
    metrics = trainer.train()
    assert {
        "loss",
        "policy_loss",
        "matching",
        "ratio_mean",
        "ref_anchor",
        "ema_anchor",
        "ema_anchor_decay",
        "reward_mean",
        "zero_std_ratio",
        "grad_norm",
        "time_training",
    } <= set(metrics)
    assert metrics["ratio_mean"] == 1.0 and metrics["matching"] > 0
    assert metrics["ema_anchor_decay"] == pytest.approx(0.002)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable_state(trainer)))


def test_full_finetuning_sd3_with_off_policy_updates(tmp_path):
    cfg = make_config(
        tmp_path,
        use_lora=False,
        learning_rate=1e-3,
        updates_per_rollout=2,
        group_size=2,
        prompts_per_step=2,
        sampler="sde",
    )
    trainer = va.AWMTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    metrics = trainer.train()
    assert trainer.reference_model is not None and trainer.behaviour is not None
    assert metrics["ratio_mean"] != 1.0 and metrics["clipfrac"] == 0.0  # the second update is off-policy


def test_video_policy_wan_t2v(tmp_path):
    cfg = make_config(tmp_path, "wan-t2v", guidance_scale=3.0, learning_rate=1e-2, weighting="uniform")
    metrics = va.AWMTrainer(tiny_pipeline("wan-t2v"), brightness, PROMPTS, cfg).train()
    assert metrics["matching"] > 0 and "grad_norm" in metrics


def test_the_ema_anchor_lags(tmp_path):
    cfg = make_config(tmp_path, max_steps=1, ema_anchor_rate=0.5, ema_anchor_max=0.9, learning_rate=5e-2)
    trainer = va.AWMTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    start = trainable_state(trainer)
    trainer.train()
    for ema, a, b in zip(trainer.ema_anchor.tensors, start, trainable_state(trainer)):
        torch.testing.assert_close(ema, 0.5 * a + 0.5 * b)  # d = min(0.9, 0.5·1)


def test_lagged_and_base_passes_match_the_policy_at_init_in_bf16(tmp_path):
    """Full fine-tuning under bf16 autocast: the lagged copy and the frozen base are exact copies at step 0."""
    cfg = make_config(tmp_path, max_steps=1, use_lora=False, mixed_precision="bf16", learning_rate=1e-3)
    m = va.AWMTrainer(tiny_pipeline("sd3").to(torch.bfloat16), brightness, PROMPTS, cfg).train()
    assert m["ref_anchor"] == m["ema_anchor"] == 0.0 and m["ratio_mean"] == 1.0


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
            ema_anchor_rate=0.2,
            ema_anchor_max=0.5,
        )
        return train_with_crash(va.AWMTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg), crash_at)

    full = run(tmp_path / "full")
    run(tmp_path / "crashed", crash_at=3)
    resumed = run(tmp_path / "crashed", resume="latest")
    assert resumed.state.step == 4
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(full), trainable_state(resumed)))
    assert all(torch.equal(a, b) for a, b in zip(full.ema_anchor.tensors, resumed.ema_anchor.tensors))


def test_awm_raises_brightness(tmp_path):
    """10 seeded iterations of full fine-tuning lift the mean reward by more than 2× its starting spread."""
    cfg = make_config(
        tmp_path, max_steps=10, num_steps=6, group_size=4, use_lora=False, learning_rate=1e-2, max_grad_norm=None
    )
    va.AWMTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg).train()
    rows = rows_of(tmp_path)
    start, spread = rows[0]["reward_mean"], rows[0]["reward_std"]
    end = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert end - start > 2 * spread, (start, end, spread)


def test_recipe_registry_and_defaults():
    from visalign.recipes import trainer_class

    assert trainer_class("awm") is va.AWMTrainer and va.AWMTrainer.config_class is va.AWMConfig
    cfg = va.AWMConfig()
    assert (cfg.num_steps, cfg.sampler, cfg.strata(), cfg.weighting, cfg.ghuber_power, cfg.clip_range) == (
        14,
        "ode",
        6,
        "ghuber",
        0.25,
        1.0,
    )
    assert va.AWMConfig(num_steps=4).strata() == 2  # 6 capped by what 4 steps allow


# ---------------------------------------------------------------------------- bad input
def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="advantage_clip"):
        make_config(tmp_path, advantage_clip=0.0)
    with pytest.raises(ConfigError, match="advantage_clip"):
        make_config(tmp_path, advantage_clip=None)
    with pytest.raises(ConfigError, match=r"num_strata.*in \[1, 3\]"):
        make_config(tmp_path, num_steps=5, num_strata=6)  # ⌊5·0.9⌋ = 4: indices 1, 2, 3
    with pytest.raises(ConfigError, match="timestep_fraction"):
        make_config(tmp_path, timestep_fraction=1.5)
    with pytest.raises(ConfigError, match="ema_anchor_max"):
        make_config(tmp_path, ema_anchor_max=1.0)
    with pytest.raises(ConfigError, match="ghuber_power"):
        make_config(tmp_path, ghuber_power=0.0)
    with pytest.raises(ConfigError, match="rectified-flow"):
        va.AWMTrainer(tiny_pipeline("sd"), brightness, PROMPTS, make_config(tmp_path))


def test_constant_reward_warns_then_stops(tmp_path):
    constant = lambda images, prompts: torch.zeros(images.shape[0])  # noqa: E731
    cfg = make_config(tmp_path, max_steps=10, max_bad_steps=3)
    with (
        pytest.warns(UserWarning, match="constant within every group"),
        pytest.raises(RewardError, match="the reward is constant within every group; nothing to learn"),
    ):
        va.AWMTrainer(tiny_pipeline("sd3"), constant, PROMPTS, cfg).train()
    assert [r["skipped"] for r in rows_of(tmp_path)] == [1.0, 1.0, 1.0]  # the stopping iteration is logged too
