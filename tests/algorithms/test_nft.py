"""DiffusionNFT (REFERENCE §8, docs/math.md §8): the pure math against closed forms, the lagged
weights, and the trainer end to end on tiny policies."""

import json
import os
import warnings

import pytest
import torch

import visalign as va
from tests.algorithms.helpers import tiny_config, train_with_crash
from visalign.errors import ConfigError, RewardError
from visalign.losses.nft import adaptive_weight, implicit_velocities, nft_loss, old_policy_decay, optimality_probability
from visalign.testing import brightness, tiny_pipeline
from visalign.training.lagged import LaggedWeights

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def make_config(tmp_path, family="sd3", **overrides):
    return tiny_config(va.NFTConfig, tmp_path, family, **overrides)


def trainable_state(trainer):
    return [p.detach().clone() for p in trainer.trainable_parameters]


def rows_of(tmp_path, run="run"):
    return [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]


# ---------------------------------------------------------------------------- pure math
def test_advantage_to_optimality_probability():
    r = optimality_probability(torch.tensor([5.0, -5.0, 0.0, 10.0, -10.0, 2.5]), clip_max=5.0)
    assert r.tolist() == [1.0, 0.0, 0.5, 1.0, 0.0, 0.75]  # linear, clipped; not a sigmoid


def test_implicit_velocities_hand_computed():
    v_pos, v_neg = implicit_velocities(torch.tensor([2.0]), torch.tensor([1.0]), beta=0.5)
    assert v_pos.item() == 1.5 and v_neg.item() == 0.5  # 0.5·2 + 0.5·1; 1.5·1 − 0.5·2


def test_adaptive_weight_is_a_detached_float64_mean_abs_with_floor():
    x0 = torch.zeros(2, 3)
    x_hat = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    w = adaptive_weight(x_hat, x0)
    assert w.dtype == torch.float64 and not w.requires_grad
    assert w.tolist() == [2.0, 1e-5]  # mean |·| (not of squares); the floor for an exact prediction


@pytest.mark.parametrize("r,beta", [(1.0, 1.0), (0.5, 1.0), (0.5, 0.3), (0.5, 3.0), (0.0, 1.0), (0.8, 0.5), (0.2, 2.0)])
def test_scalar_minimiser_matches_the_closed_form(r, beta):
    """θ* = v_old + (2r−1)(u − v_old)/β with w± = 1: r=1, β=1 → u; r=½ → v_old for any β; r=0, β=1 → 2v_old − u."""
    x0, eps, sigma, v_old = torch.tensor([[0.3]]), torch.tensor([[1.1]]), 0.6, torch.tensor([[0.2]])
    u = float(eps - x0)  # 0.8
    x_t = (1 - sigma) * x0 + sigma * eps
    theta = torch.zeros(1, 1, requires_grad=True)
    optim = torch.optim.SGD([theta], lr=0.5 / (5 * 2 * beta * sigma**2))
    for _ in range(300):
        optim.zero_grad()
        loss, _ = nft_loss(theta, v_old, x_t, x0, sigma, torch.tensor([r]), beta, 5.0, adaptive_weights=False)
        loss.backward()
        optim.step()
    expected = 0.2 + (2 * r - 1) * (u - 0.2) / beta
    assert theta.item() == pytest.approx(expected, abs=1e-6)
    named = {(1.0, 1.0): u, (0.0, 1.0): 2 * 0.2 - u}
    if r == 0.5:
        assert theta.item() == pytest.approx(0.2, abs=1e-6)  # a pure trust region at the old policy
    elif (r, beta) in named:
        assert theta.item() == pytest.approx(named[(r, beta)], abs=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_at_the_old_policy_the_gradient_is_a_signed_weighted_fm_gradient(beta):
    g = torch.Generator().manual_seed(0)
    x0, eps, v_old = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    r = torch.tensor([1.0, 0.5, 0.0])
    v = v_old.clone().requires_grad_(True)
    loss, m = nft_loss(v, v_old, x_t, x0, sigma, r, beta, 5.0)
    loss.backward()
    # The weighted FM loss L = mean_dims (x̂(v) − x0)²/w with w from x̂(v_old), per sample.
    w = adaptive_weight(x_t - s * v_old, x0)
    v_fm = v_old.clone().requires_grad_(True)
    per_sample = (x_t - s * v_fm - x0).pow(2).flatten(1).mean(1) / w
    value = float((5 * per_sample.detach() / beta).mean())
    assert loss.detach().item() == pytest.approx(value, rel=1e-6)  # 5·L/β for every r
    (per_sample * 5 * (2 * r - 1)).mean().backward()
    torch.testing.assert_close(v.grad, v_fm.grad.float(), rtol=1e-5, atol=1e-8)
    assert v.grad[1].abs().max() < 1e-7  # r = ½: no gradient (up to float rounding of v± at β ≠ 1)
    # A > 0 (r = 1) moves v toward u = ε − x0; A < 0 (r = 0) away from it.
    u = eps - x0
    step = v_old - 1e-2 * v.grad
    assert (step[0] - u[0]).norm() < (v_old[0] - u[0]).norm()
    assert (step[2] - u[2]).norm() > (v_old[2] - u[2]).norm()
    assert m["old_deviation"] == 0.0 and m["loss_pos"] == pytest.approx(m["loss_neg"])


def test_penalty_to_the_base_model():
    v = torch.ones(2, 3)
    kw = dict(x_t=torch.zeros(2, 3), x0=torch.zeros(2, 3), sigma=0.5, r=torch.tensor([1.0, 0.0]))
    plain, _ = nft_loss(v, v, **kw)
    with_kl, m = nft_loss(v, v, v_ref=torch.zeros(2, 3), kl_beta=0.1, **kw)
    assert m["kl"] == 1.0 and with_kl.item() == pytest.approx(plain.item() + 0.1)


def test_old_policy_decay_schedules():
    assert [old_policy_decay(s, 0) for s in (0, 100, 10_000)] == [0.0, 0.0, 0.0]
    assert old_policy_decay(100, 1) == pytest.approx(0.1)
    assert old_policy_decay(1, 1) == pytest.approx(0.001) and old_policy_decay(2000, 1) == 0.5
    assert [old_policy_decay(s, 2) for s in (0, 74, 75)] == [0.0, 0.0, 0.0]
    assert old_policy_decay(175, 2) == pytest.approx(0.75) and old_policy_decay(1000, 2) == 0.999
    with pytest.raises(ConfigError, match="decay_type"):
        old_policy_decay(1, 3)


# ---------------------------------------------------------------------------- lagged weights
def test_lagged_weights_update_swap_and_state():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    lagged = LaggedWeights([p])
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    lagged.update(0.5)
    assert lagged.tensors[0].tolist() == [2.0, 4.0]  # halfway
    with lagged.swapped():
        assert p.tolist() == [2.0, 4.0] and not torch.is_grad_enabled()
    assert p.tolist() == [3.0, 6.0] and lagged.tensors[0].tolist() == [2.0, 4.0]
    (p * p).sum().backward()  # the graph of a forward after the swap sees the live weights
    assert p.grad.tolist() == [6.0, 12.0]
    restored = LaggedWeights([p], copy=False)
    restored.load_state_dict(lagged.state_dict())
    assert torch.equal(restored.tensors[0], lagged.tensors[0])
    lagged.update(0.0)
    assert torch.equal(lagged.tensors[0], p.detach())  # d = 0 copies θ exactly
    with pytest.raises(ConfigError, match="decay"):
        lagged.update(1.5)


# ---------------------------------------------------------------------------- trainer
def test_two_iterations_lora_sd3(tmp_path):
    trainer = va.NFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path, learning_rate=1e-2))
    before = trainable_state(trainer)
    metrics = trainer.train()
    assert {
        "loss",
        "policy_loss",
        "kl",
        "r_mean",
        "old_decay",
        "reward_mean",
        "reward_std",
        "zero_std_ratio",
        "grad_norm",
        "loss_pos",
        "loss_neg",
        "time_sampling",
        "time_training",
    } <= set(metrics)
    assert metrics["old_decay"] == pytest.approx(0.002)  # decay_type 1 after s = 2 optimizer steps
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable_state(trainer)))
    assert len(trainer.old.tensors) == len(trainer.trainable_parameters)  # the adapter only, not the model
    assert sum(t.numel() for t in trainer.old.tensors) < sum(p.numel() for p in trainer.policy.denoiser.parameters())


def test_full_finetuning_sd3(tmp_path):
    cfg = make_config(tmp_path, use_lora=False, learning_rate=1e-3, sampler="sde")  # any sampler works
    trainer = va.NFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    metrics = trainer.train()
    assert trainer.reference_model is not None and metrics["kl"] > 0


def test_video_policy_wan_t2v(tmp_path):
    cfg = make_config(tmp_path, "wan-t2v", guidance_scale=3.0, learning_rate=1e-2)  # samples with CFG
    metrics = va.NFTTrainer(tiny_pipeline("wan-t2v"), brightness, PROMPTS, cfg).train()
    assert metrics["loss"] > 0 and "grad_norm" in metrics


def test_the_old_policy_lags(tmp_path):
    cfg = make_config(tmp_path, max_steps=1, old_decay=0.5, learning_rate=5e-2)
    trainer = va.NFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    start = trainable_state(trainer)
    trainer.train()
    for old, a, b in zip(trainer.old.tensors, start, trainable_state(trainer)):
        torch.testing.assert_close(old, 0.5 * a + 0.5 * b)
    assert trainer.old.distance() > 0
    copy = va.NFTTrainer(
        tiny_pipeline("sd3"),
        brightness,
        PROMPTS,
        make_config(tmp_path / "d0", max_steps=1, decay_type=0, learning_rate=5e-2),
    )
    copy.train()
    assert all(torch.equal(o, p) for o, p in zip(copy.old.tensors, trainable_state(copy)))  # d = 0 copies θ


def test_rollouts_come_from_the_old_policy(tmp_path):
    cfg = make_config(tmp_path, max_steps=2, old_decay=0.5, learning_rate=5e-2)
    trainer = va.NFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    sample, checked = trainer.rollout, []

    def spy(step, records, policy_context=None):
        traj = sample(step, records, policy_context)
        with torch.no_grad():
            old = sample(step, records, trainer.old.swapped()).final_latents
            current = sample(step, records).final_latents
        assert torch.equal(traj.final_latents, old)
        checked.append(not torch.equal(old, current))
        return traj

    trainer.rollout = spy
    trainer.train()
    assert checked == [False, True]  # θ_old = θ at the start; after one update they differ


def test_lagged_and_base_passes_match_the_policy_at_init_in_bf16(tmp_path):
    """Full fine-tuning under bf16 autocast: the lagged copy and the frozen base are exact copies at step 0."""
    cfg = make_config(tmp_path, max_steps=1, use_lora=False, mixed_precision="bf16", learning_rate=1e-3)
    m = va.NFTTrainer(tiny_pipeline("sd3").to(torch.bfloat16), brightness, PROMPTS, cfg).train()
    assert m["old_deviation"] == m["kl"] == 0.0


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
            old_decay=0.5,
        )
        return train_with_crash(va.NFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg), crash_at)

    full = run(tmp_path / "full")
    run(tmp_path / "crashed", crash_at=3)
    resumed = run(tmp_path / "crashed", resume="latest")
    assert resumed.state.step == 4
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(full), trainable_state(resumed)))
    assert all(torch.equal(a, b) for a, b in zip(full.old.tensors, resumed.old.tensors))


def test_nft_raises_brightness(tmp_path):
    """10 seeded iterations of full fine-tuning lift the mean reward by more than 2× its starting spread."""
    cfg = make_config(
        tmp_path,
        max_steps=10,
        num_steps=6,
        group_size=4,
        use_lora=False,
        learning_rate=1e-2,
        max_grad_norm=None,
        guidance_scale=1.0,
    )
    va.NFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg).train()
    rows = rows_of(tmp_path)
    start, spread = rows[0]["reward_mean"], rows[0]["reward_std"]
    end = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert end - start > 2 * spread, (start, end, spread)


def test_recipe_registry_and_exports():
    from visalign.recipes import trainer_class

    assert trainer_class("nft") is va.NFTTrainer and va.NFTTrainer.config_class is va.NFTConfig
    cfg = va.NFTConfig()
    assert (cfg.sampler, cfg.guidance_scale, cfg.advantage_std, cfg.advantage_clip, cfg.advantage_eps) == (
        "ode",
        1.0,
        "global",
        5.0,
        1e-4,
    )
    assert (cfg.beta, cfg.kl_beta, cfg.decay_type, cfg.num_train_levels()) == (1.0, 1e-4, 1, 9)


# ---------------------------------------------------------------------------- bad input
def test_config_errors(tmp_path):
    for beta in (0.0, -1.0):
        with pytest.raises(ConfigError, match="beta.*> 0"):
            make_config(tmp_path, beta=beta)
    for decay in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"old_decay.*\[0, 1\)"):
            make_config(tmp_path, old_decay=decay)
    with pytest.raises(ConfigError, match="decay_type.*must be one of"):
        make_config(tmp_path, decay_type=3)
    with pytest.raises(ConfigError, match="timestep_fraction"):
        make_config(tmp_path, timestep_fraction=1.5)  # more levels than the rollout has
    with pytest.raises(ConfigError, match="advantage_clip"):
        make_config(tmp_path, advantage_clip=None)
    with pytest.raises(ConfigError, match="group_size"):
        make_config(tmp_path, group_size=1)
    with pytest.raises(ConfigError, match="rollout_ahead"):
        make_config(tmp_path, rollout_ahead=True)  # the look-ahead sampler would not use the old policy
    with pytest.raises(ConfigError, match="rectified-flow"):
        va.NFTTrainer(tiny_pipeline("sd"), brightness, PROMPTS, make_config(tmp_path))


def test_constant_reward_warns_then_stops(tmp_path):
    constant = lambda images, prompts: torch.full((images.shape[0],), 0.5)  # noqa: E731
    cfg = make_config(tmp_path, max_steps=10, max_bad_steps=2)
    with (
        pytest.warns(UserWarning, match="constant within every group"),
        pytest.raises(
            RewardError,
            match="the reward is constant within every group; nothing to learn: check the reward or raise group_size",
        ),
    ):
        va.NFTTrainer(tiny_pipeline("sd3"), constant, PROMPTS, cfg).train()
    rows = rows_of(tmp_path)  # the iteration that stops the run is logged before it raises
    assert len(rows) == 2 and all(r["skipped"] == 1.0 and r["zero_std_ratio"] == 1.0 for r in rows)
    assert os.path.isdir(tmp_path / "run" / "checkpoints")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        va.NFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path / "ok", max_steps=1)).train()
    assert not any("constant within every group" in str(w.message) for w in caught)  # a spread never warns
