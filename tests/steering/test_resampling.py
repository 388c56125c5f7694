"""The pure FK math: ESS, log-weights, potentials, and the two resamplers (statistical checks)."""

import math

import pytest
import torch

from visalign.errors import ConfigError
from visalign.steering import resampling as R


def test_ess_closed_forms():
    n = 6
    uniform = torch.zeros(3, n)
    torch.testing.assert_close(R.effective_sample_size(uniform), torch.full((3,), float(n), dtype=torch.float64))
    # Two equal weights and the rest zero: ESS = 2. One particle with all the weight: ESS = 1.
    two = torch.tensor([[0.0, 0.0] + [-math.inf] * (n - 2)])
    assert float(R.effective_sample_size(two)) == pytest.approx(2.0)
    one = torch.tensor([[5.0] + [-math.inf] * (n - 1)])
    assert float(R.effective_sample_size(one)) == pytest.approx(1.0)
    # Against 1/Σw² in probability space, for arbitrary weights; log-space is shift invariant.
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(4, n, generator=g, dtype=torch.float64) * 3
    w = torch.softmax(log_w, dim=-1)
    torch.testing.assert_close(R.effective_sample_size(log_w), 1 / (w**2).sum(-1))
    torch.testing.assert_close(R.effective_sample_size(log_w + 1000.0), 1 / (w**2).sum(-1))


def test_log_weights_do_not_overflow():
    # λ·r of 1e4 would overflow exp(); in log space the weights stay exact (the reference clamps).
    log_w = torch.tensor([[1e4, 1e4 - math.log(3.0)]], dtype=torch.float64)
    w = R.normalize_log_weights(log_w).exp()
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]], dtype=torch.float64))


def test_potentials_and_final_correction():
    r1 = torch.tensor([[1.0, -2.0]])
    r2 = torch.tensor([[0.5, -1.0]])
    lam = 2.0
    expected = {  # (log G at step 1, log G at step 2)
        "max": ([2.0, -4.0], [2.0, -2.0]),
        "add": ([2.0, -4.0], [3.0, -6.0]),
        "diff": ([2.0, -4.0], [-1.0, 2.0]),
        "rt": ([2.0, -4.0], [1.0, -2.0]),
    }
    for kind, (g1, g2) in expected.items():
        state = R.initial_potential_state(kind, (1, 2))
        log_g1, state = R.potential(kind, lam, r1, state)
        log_g2, state = R.potential(kind, lam, r2, state)
        torch.testing.assert_close(log_g1.float(), torch.tensor([g1]), msg=kind)
        torch.testing.assert_close(log_g2.float(), torch.tensor([g2]), msg=kind)
        # The final potential makes the product along the path exp(λ·r(x0)), whatever came before.
        r_final = torch.tensor([[0.3, 0.7]])
        total = log_g1 + log_g2 + R.final_log_potential(lam, r_final, log_g1 + log_g2)
        torch.testing.assert_close(total.float(), lam * r_final)
    with pytest.raises(ConfigError, match="potential"):
        R.initial_potential_state("sum", (1, 2))


def _counts(index, n):
    return torch.nn.functional.one_hot(index, n).sum(-2).double()


@pytest.mark.parametrize("method", ["multinomial", "systematic"])
def test_resampling_keeps_count_and_follows_weights(method):
    n, systems = 5, 20000
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0], dtype=torch.float64)
    log_w = w.log().expand(systems, n)
    index = R.resample(log_w, method, torch.Generator().manual_seed(0))
    assert index.shape == (systems, n) and index.dtype == torch.long
    counts = _counts(index, n)
    assert bool((counts.sum(-1) == n).all())  # the particle count is kept
    assert float(counts[:, 4].sum()) == 0  # zero weight is never picked
    # Frequencies match the weights within 5 standard errors (multinomial variance bounds both).
    freq = counts.mean(0) / n
    stderr = torch.sqrt(w * (1 - w) / (n * systems))
    assert bool(((freq - w).abs() <= 5 * stderr + 1e-12).all()), (freq, w)


def test_systematic_is_unbiased_and_low_variance():
    n, systems = 7, 40000
    g = torch.Generator().manual_seed(1)
    w = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    counts = _counts(R.systematic_resample(w.log().expand(systems, n), torch.Generator().manual_seed(2)), n)
    # Every draw gives particle i floor(N·w_i) or ceil(N·w_i) copies...
    assert bool(((counts >= torch.floor(n * w) - 1e-9) & (counts <= torch.ceil(n * w) + 1e-9)).all())
    # ...and N·w_i on average: unbiased (the per-draw count varies by at most 1, so stderr ≤ 0.5/√M).
    assert bool(((counts.mean(0) - n * w).abs() < 5 * 0.5 / systems**0.5).all()), (counts.mean(0), n * w)
    # Lower variance than multinomial.
    multi = _counts(R.multinomial_resample(w.log().expand(systems, n), torch.Generator().manual_seed(3)), n)
    assert float(counts.var(0).sum()) < float(multi.var(0).sum())


def test_uniform_weights_give_identity_systematically():
    index = R.systematic_resample(torch.zeros(3, 4), torch.Generator().manual_seed(0))
    assert index.tolist() == [[0, 1, 2, 3]] * 3


def test_gather_particles_reindexes_within_systems():
    values = torch.arange(6.0).view(2, 3)
    index = torch.tensor([[2, 2, 0], [1, 0, 0]])
    assert R.gather_particles(values, index).tolist() == [[2.0, 2.0, 0.0], [4.0, 3.0, 3.0]]
    with pytest.raises(ConfigError, match="resampler"):
        R.resample(values, "stratified")
