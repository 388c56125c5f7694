"""The step math of docs/math.md §1 against numbers worked out by hand.

Fixed input throughout: x = 1.0, v = 0.5, σ = 0.8, σ_next = 0.6 (so dt = −0.2).
"""

import math

import pytest
import torch

from visalign import steps as S
from visalign.errors import SamplerError

X, V, SIGMA, SIGMA_NEXT = torch.tensor([[1.0]]), torch.tensor([[0.5]]), 0.8, 0.6


def test_ode_step():
    # x' = x + v·dt = 1 + 0.5·(−0.2)
    assert S.ode_step(X, V, SIGMA, SIGMA_NEXT).item() == pytest.approx(0.9, abs=1e-7)


def test_x0_and_x1_predictions():
    assert S.flow_x0(X, V, SIGMA).item() == pytest.approx(0.6)  # 1 − 0.8·0.5
    assert S.flow_x1(X, V, SIGMA).item() == pytest.approx(1.1)  # 1 + 0.2·0.5


def test_flow_noise_sde_step():
    # g = 0.7·√(0.8/0.2) = 1.4; score = −(1 + 0.2·0.5)/0.8 = −1.375
    # mean = 1 + (0.5 − ½·1.96·(−1.375))·(−0.2) = 0.6305; std = 1.4·√0.2
    g = S.flow_diffusion_coefficient("flow", 0.7, SIGMA, sigma_max=0.9)
    assert g.item() == pytest.approx(1.4, rel=1e-6)
    mean, std = S.flow_sde_mean_std(X, V, SIGMA, SIGMA_NEXT, g)
    assert mean.item() == pytest.approx(0.6305, abs=1e-6)
    assert std.item() == pytest.approx(0.626099033699941, rel=1e-6)


def test_flow_noise_written_out_form_agrees():
    # docs/math.md §1: mean = x·(1 + g²·dt/(2σ)) + v·(1 + g²·(1−σ)/(2σ))·dt
    g, dt = 1.4, -0.2
    expected = 1.0 * (1 + g**2 * dt / (2 * SIGMA)) + 0.5 * (1 + g**2 * (1 - SIGMA) / (2 * SIGMA)) * dt
    mean, _ = S.flow_sde_mean_std(X, V, SIGMA, SIGMA_NEXT, g)
    assert mean.item() == pytest.approx(expected, abs=1e-6)


def test_flow_noise_first_step_std_is_exactly_eta():
    # At σ = 1 only the denominator uses σ_1: g = a·√(1/(1−σ_1)), std = g·√(1−σ_1) = a.
    g = S.flow_diffusion_coefficient("flow", 0.7, 1.0, sigma_max=0.9)
    _, std = S.flow_sde_mean_std(X, V, 1.0, 0.9, g)
    assert std.item() == pytest.approx(0.7, rel=1e-6)


def test_dance_noise_sde_step():
    # g = η = 0.3; mean = 1 + (0.5 − ½·0.09·(−1.375))·(−0.2) = 0.887625; std = 0.3·√0.2
    g = S.flow_diffusion_coefficient("dance", 0.3, SIGMA, sigma_max=0.9)
    mean, std = S.flow_sde_mean_std(X, V, SIGMA, SIGMA_NEXT, g)
    assert mean.item() == pytest.approx(0.887625, abs=1e-6)
    assert std.item() == pytest.approx(0.13416407864998736, rel=1e-6)


def test_cps_step():
    # s = 0.6·sin(0.4π); mean = 0.6·0.4 + 1.1·√(0.36 − s²)
    mean, std = S.cps_mean_std(X, V, SIGMA, SIGMA_NEXT, 0.8)
    assert std.item() == pytest.approx(0.570633909777092, rel=1e-6)
    assert mean.item() == pytest.approx(0.44395121628746553, abs=1e-6)


def test_ddim_step():
    # ᾱ_t = 0.5, ᾱ_prev = 0.8, ε̂ = 0.2, x = 1, η = 1:
    # x̂0 = (1 − √0.5·0.2)/√0.5; var = (0.2/0.5)·(1 − 0.5/0.8) = 0.15; mean = √0.8·x̂0 + √0.05·0.2
    x0, eps = S.ddpm_x0_eps(X, torch.tensor([[0.2]]), 0.5, "epsilon")
    assert x0.item() == pytest.approx(1.214213562373095, rel=1e-6)
    mean, std = S.ddim_mean_std(x0, eps, 0.5, 0.8, 1.0)
    assert std.item() == pytest.approx(math.sqrt(0.15), rel=1e-6)
    assert mean.item() == pytest.approx(1.1307469854173642, abs=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_parameterisations_agree(prediction_type):
    # Build the three outputs of one (x0, ε) pair and check each converts back to it.
    a = 0.3
    x0, eps = torch.tensor([[0.4]]), torch.tensor([[-1.2]])
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    output = {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}[prediction_type]
    got_x0, got_eps = S.ddpm_x0_eps(x, output, a, prediction_type)
    assert got_x0.item() == pytest.approx(0.4, abs=1e-6)
    assert got_eps.item() == pytest.approx(-1.2, abs=1e-6)


def test_zero_noise_reproduces_the_ode():
    x, v = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    ode = S.ode_step(x, v, SIGMA, SIGMA_NEXT)
    for noise in ("flow", "dance"):
        g = S.flow_diffusion_coefficient(noise, 0.0, SIGMA, 0.9)
        mean, std = S.flow_sde_mean_std(x, v, SIGMA, SIGMA_NEXT, g)
        torch.testing.assert_close(mean, ode, rtol=0, atol=1e-6)
        assert float(std.max()) == 0.0
    mean, std = S.cps_mean_std(x, v, SIGMA, SIGMA_NEXT, 0.0)
    torch.testing.assert_close(mean, ode, rtol=0, atol=1e-6)
    assert float(std.max()) == 0.0


def test_gaussian_log_prob_full_density():
    # −(1 − 0.5)²/(2·4) − log 2 − ½·log 2π
    lp = S.gaussian_log_prob(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor(2.0))
    assert lp.item() == pytest.approx(-1.643335713764618, abs=1e-6)


def test_log_prob_reductions_and_normal_agreement():
    sample, mean, std = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor(0.3)
    reference = torch.distributions.Normal(mean, std).log_prob(sample).flatten(1)
    torch.testing.assert_close(S.gaussian_log_prob(sample, mean, std, "mean"), reference.mean(1))
    torch.testing.assert_close(S.gaussian_log_prob(sample, mean, std, "sum"), reference.sum(1))
    with pytest.raises(SamplerError, match="reduction"):
        S.gaussian_log_prob(sample, mean, std, "max")


def test_gaussian_kl_uses_the_full_std():
    # (0.3 − 0.1)² / (2·0.5²) = 0.08
    kl = S.gaussian_kl(torch.tensor([[0.3]]), torch.tensor([[0.1]]), torch.tensor(0.5))
    assert kl.item() == pytest.approx(0.08, rel=1e-6)


def test_per_sample_sigmas_broadcast():
    # A (B,) σ gives each sample its own step, equal to the scalar step of that σ.
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    sig, sig_next = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    g = S.flow_diffusion_coefficient("flow", 0.7, sig, 0.9)
    mean, std = S.flow_sde_mean_std(x, v, sig, sig_next, g)
    for b in range(2):
        gb = S.flow_diffusion_coefficient("flow", 0.7, float(sig[b]), 0.9)
        mb, sb = S.flow_sde_mean_std(x[b : b + 1], v[b : b + 1], float(sig[b]), float(sig_next[b]), gb)
        torch.testing.assert_close(mean[b : b + 1], mb)
        torch.testing.assert_close(std[b].flatten()[0], sb.flatten()[0])


def test_unknown_noise_schedule():
    with pytest.raises(SamplerError, match="noise"):
        S.flow_diffusion_coefficient("brownian", 0.7, 0.5, 0.9)
