"""GRPO-Guard (REFERENCE §11, §13 "GRPO-Guard"): RatioNorm and gradient reweighting, pure and in the trainer."""

import math
import os

import pytest
import torch

import visalign as va
from visalign import steps as S
from visalign.errors import ConfigError
from visalign.losses.grpo import grpo_guard_loss, grpo_loss, guard_log_ratio
from visalign.recipes import parse_recipe
from visalign.testing import brightness, tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def ratios(delta, z, s, reduce="mean"):
    """Plain and normalised log-ratios of x' = μ_old + s·z under N(μ_old + δ, s²) vs N(μ_old, s²).

    ``delta`` and ``z`` are (N, D): N transitions (one trained step each) of D dimensions.
    """
    n = z.shape[0]
    old_mean = torch.zeros_like(z)
    x_next = old_mean + s * z
    std = torch.full((n, 1), float(s))
    new = S.gaussian_log_prob(x_next, old_mean + delta, std, reduce).view(n, 1)
    old = S.gaussian_log_prob(x_next, old_mean, std, reduce).view(n, 1)
    guard = guard_log_ratio(
        new, old, (old_mean + delta).unsqueeze(1), old_mean.unsqueeze(1), torch.full((n, 1), float(s)), reduce
    )
    return (new - old).squeeze(1), guard.squeeze(1)


# ---------------------------------------------------------------------------- RatioNorm
def test_no_mean_shift_gives_ratio_one():
    z = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    plain, guard = ratios(torch.zeros_like(z), z, 0.3)
    assert torch.equal(guard, torch.zeros(8)) and torch.equal(torch.exp(guard), torch.ones(8))
    assert torch.equal(plain, torch.zeros(8))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_normalised_log_ratio_is_the_noise_times_the_shift(reduce):
    g = torch.Generator().manual_seed(1)
    z, delta = torch.randn(16, 32, generator=g), 0.05 * torch.randn(16, 32, generator=g)
    _, guard = ratios(delta, z, 0.2, reduce)
    expected = (z * delta).mean(1) if reduce == "mean" else (z * delta).sum(1)
    torch.testing.assert_close(guard, expected, rtol=1e-4, atol=1e-6)


def test_monte_carlo_guard_is_centred_and_plain_is_left_shifted():
    """Over the rollout noise z: E[log ρ̃] = 0, while E[log ρ] = −mean(δ²)/(2s²) (the left shift)."""
    s, n, d = 0.3, 40000, 16
    g = torch.Generator().manual_seed(2)
    delta = (0.05 * torch.randn(1, d, generator=g)).expand(n, d)
    z = torch.randn(n, d, generator=g)
    plain, guard = ratios(delta, z, s)
    shift = float(delta[0].pow(2).mean() / (2 * s * s))
    se_guard = float(guard.std()) / math.sqrt(n)
    assert abs(float(guard.mean())) < 4 * se_guard
    assert float(plain.mean()) == pytest.approx(-shift, abs=4 * float(plain.std()) / math.sqrt(n))
    assert float(plain.mean()) < -2 * shift / 3 < 0  # the plain ratio's mean sits clearly below 1


def test_guard_does_not_depend_on_the_step_std():
    g = torch.Generator().manual_seed(3)
    z, delta = torch.randn(6, 24, generator=g), 0.02 * torch.randn(6, 24, generator=g)
    plains, guards = zip(*(ratios(delta, z, s) for s in (0.05, 0.3, 1.0)))
    for guard in guards[1:]:
        torch.testing.assert_close(guard, guards[0], rtol=1e-4, atol=1e-6)
    assert (plains[0] - plains[1]).abs().max() > 1e-2  # the plain log-ratio scales with 1/s


def test_sum_reduction_needs_the_summed_correction():
    """With summed log-probs the correction is sum(δ²)/(2s²); the mean-form one would not centre ρ̃."""
    g = torch.Generator().manual_seed(4)
    z, delta = torch.randn(4000, 8, generator=g), torch.full((4000, 8), 0.1)
    _, guard_sum = ratios(delta, z, 0.2, "sum")
    assert abs(float(guard_sum.mean())) < 4 * float(guard_sum.std()) / math.sqrt(4000)
    plain_sum, _ = ratios(delta, z, 0.2, "sum")
    wrong = 0.2 * (plain_sum + delta.pow(2).mean(1) / (2 * 0.04))
    assert float(wrong.mean()) < -10 * float(wrong.std()) / math.sqrt(4000)


# ---------------------------------------------------------------------------- gradient reweighting
def test_reweighted_loss_times_minus_dt_is_the_plain_ppo_loss_on_the_normalised_ratio():
    log_ratio = torch.tensor([[2e-4], [-3e-5], [5e-6]], requires_grad=True)
    adv, eps, minus_dt = torch.tensor([1.0, -0.5, 2.0]), 1e-4, torch.tensor(0.125)
    loss, m = grpo_guard_loss(log_ratio, adv, eps, minus_dt)
    plain, pm = grpo_loss(log_ratio, torch.zeros_like(log_ratio), adv, eps)
    torch.testing.assert_close(loss * minus_dt, plain)
    assert m["clipfrac"] == pm["clipfrac"] == pytest.approx(1 / 3)
    assert m["policy_loss"] * 0.125 == pytest.approx(pm["policy_loss"])
    # per step: each term is divided by its own −dt; the KL term is not reweighted
    log_ratio2 = torch.tensor([[1e-5, -2e-5, 3e-5]])
    dts = torch.tensor([[0.05, 0.1, 0.2]])
    kl = torch.tensor([[0.1, 0.2, 0.3]])
    loss2, _ = grpo_guard_loss(log_ratio2, torch.tensor([1.0]), eps, dts, kl=kl, kl_beta=0.5, reduction="sum")
    terms = [
        float(grpo_loss(log_ratio2[:, i : i + 1], torch.zeros(1, 1), torch.tensor([1.0]), eps, reduction="sum")[0])
        for i in range(3)
    ]
    expected = sum(t / float(d) for t, d in zip(terms, dts[0])) + 0.5 * float(kl.sum())
    assert float(loss2) == pytest.approx(expected, rel=1e-6)


def test_reweighting_scales_the_gradient_by_one_over_minus_dt():
    log_ratio = torch.tensor([[1e-6, 1e-6]], requires_grad=True)
    loss, _ = grpo_guard_loss(log_ratio, torch.tensor([1.0]), 1e-4, torch.tensor([[0.5, 0.05]]), reduction="sum")
    loss.backward()
    assert log_ratio.grad[0, 1] / log_ratio.grad[0, 0] == pytest.approx(10.0, rel=1e-5)


# ---------------------------------------------------------------------------- trainer
def make_config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        num_steps=4,
        group_size=2,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        clip_range=0.2,
        trackers=["jsonl"],
        ratio="guard",
        timestep_fraction=1.0,
    )
    base.update(overrides)
    return va.GRPOConfig(**base)


def test_grpo_guard_trains_on_tiny_sd3(tmp_path):
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path, learning_rate=1e-2))
    before = {n: p.detach().clone() for n, p in trainer.policy.denoiser.named_parameters() if p.requires_grad}
    seen = []
    trainer.add_callback(lambda t, step, m: seen.append(dict(m)))
    metrics = trainer.train()
    assert len(seen) == 2 and all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in seen)
    # the first update is on-policy: μ_θ = μ_old up to the batched recomputation, so ρ̃ = 1
    assert seen[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and seen[0]["clipfrac"] == 0.0
    after = dict(trainer.policy.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert "GRPO-Guard" in trainer.describe()
    assert metrics["time_training"] > 0


def test_guard_matches_the_formula_on_a_real_rollout(tmp_path):
    """The trainer's pieces on a real trajectory: stored means and stds give log ρ̃ = mean(z·δ)."""
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path))
    traj = trainer.rollout(0, [{"prompt": PROMPTS[0]}])
    steps = torch.tensor([[0, 1, 2]] * 2)
    with torch.no_grad():
        out = va.log_prob(trainer.policy, traj, steps)
        rows = torch.arange(2).unsqueeze(1)
        shifted = out.means + 1e-3  # a policy whose means moved by δ = 1e-3 everywhere
        new_lp = S.gaussian_log_prob(
            traj.latents[rows, steps + 1].flatten(0, 1), shifted.flatten(0, 1), out.stds.flatten().view(-1, 1, 1, 1)
        ).view(2, 3)
        guard = guard_log_ratio(new_lp, traj.log_probs.gather(1, steps), shifted, traj.means[rows, steps], out.stds)
        z = (traj.latents[rows, steps + 1] - traj.means[rows, steps]) / out.stds.view(2, 3, 1, 1, 1)
        torch.testing.assert_close(guard, (z * 1e-3).flatten(2).mean(-1), rtol=1e-3, atol=2e-6)


def test_guard_needs_a_flow_model(tmp_path):
    with pytest.raises(ConfigError, match="ratio='guard'"):
        va.GRPOTrainer(tiny_pipeline("sd"), brightness, PROMPTS, make_config(tmp_path, sampler="ddim"))
    with pytest.raises(ConfigError, match="ratio"):
        make_config(tmp_path, ratio="normalised")


def test_guard_recipe():
    _, _, cfg = parse_recipe(os.path.join(ROOT, "configs", "sd35m_grpo_guard.yaml"))
    assert (cfg.ratio, cfg.sampler, cfg.noise, cfg.eta, cfg.num_steps) == ("guard", "sde", "flow", 0.7, 10)
    assert (cfg.guidance_scale, cfg.cfg_in_training, cfg.timestep_fraction, cfg.advantage_std) == (
        4.5,
        True,
        1.0,
        "group",
    )
    assert (cfg.kl_beta, cfg.learning_rate, cfg.clip_range) == (0.0, 1e-4, 4e-6)
