"""The math of Feynman-Kac particle steering, as pure functions of tensors (docs/math.md §6).

This file is the one home of FK steering's weights and resampling; :func:`visalign.fk_steer` and
:class:`visalign.steering.FKResampleCallback` call these functions and nothing else re-derives them.

Every function works on a batch of independent particle systems: the last dimension holds the N
particles of one system (one prompt) and the leading dimensions are systems. Weights live in log
space throughout (log-sum-exp), so a large ``lam · reward`` never overflows; the reference code
clamps ``exp()`` into [0, 1e10] instead.

Potentials (Singhal et al., "A General Framework for Inference-time Scaling and Steering of
Diffusion Models", arXiv 2501.06848). Each particle carries a running statistic ``s`` of its
rewards along its ancestry, and at a reward step with reward ``r`` the potential is:

========  =============================  =========================  ===============
name      log G                          new statistic ``s``        ``s`` at start
========  =============================  =========================  ===============
``max``   λ·max(r, s)                    max(r, s) (running max)    −∞
``add``   λ·(r + s)                      r + s (running sum)        0
``diff``  λ·(r − s)                      r (previous reward)        0
``rt``    λ·r                            r                          0
========  =============================  =========================  ===============

``max`` and ``add`` follow the paper's ``max_{s≥t} r`` and ``Σ_{s≥t} r``; starting ``max`` at −∞
(not 0) keeps negative rewards meaningful. At the final step the potential is
``exp(λ·r(x0)) / Π(earlier potentials of the particle's ancestry)``, so that whatever the
intermediate potentials, the product along every path is ``exp(λ·r(x0))`` and the particles
target ``p(x0)·exp(λ·r(x0))``.
"""

from __future__ import annotations

import math

import torch

from visalign.errors import ConfigError

__all__ = [
    "POTENTIALS",
    "RESAMPLERS",
    "normalize_log_weights",
    "effective_sample_size",
    "potential",
    "initial_potential_state",
    "final_log_potential",
    "multinomial_resample",
    "systematic_resample",
    "resample",
    "gather_particles",
]

POTENTIALS = ("max", "add", "diff", "rt")
RESAMPLERS = ("multinomial", "systematic")


def _check_potential(kind: str) -> None:
    if kind not in POTENTIALS:
        raise ConfigError(f"Unknown FK potential {kind!r}; choose one of {POTENTIALS}.")


def normalize_log_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Log-weights shifted so that the weights of each system (last dim) sum to 1."""
    log_weights = log_weights.double() if log_weights.dtype != torch.float64 else log_weights
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / Σ w² of the normalised weights, per system, computed in log space.

    Equal weights give N; one particle holding all the weight gives 1.

    Args:
        log_weights: (..., N) unnormalised log-weights.

    Returns:
        (...) float64 tensor.
    """
    log_w = normalize_log_weights(log_weights)
    return torch.exp(-torch.logsumexp(2.0 * log_w, dim=-1))


def initial_potential_state(kind: str, shape, device=None) -> torch.Tensor:
    """The running statistic ``s`` before the first reward step (see the module table)."""
    _check_potential(kind)
    fill = -math.inf if kind == "max" else 0.0
    return torch.full(tuple(shape), fill, dtype=torch.float64, device=device)


def potential(kind: str, lam: float, rewards: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One intermediate FK potential.

    Args:
        kind: ``"max"``, ``"add"``, ``"diff"`` or ``"rt"``.
        lam: the inverse temperature λ.
        rewards: (..., N) each particle's reward on its decoded x̂0 at this step.
        state: (..., N) the running statistic from :func:`initial_potential_state` or the
            previous call (re-indexed by the particle's ancestry).

    Returns:
        ``(log_G, new_state)``, both (..., N) float64.
    """
    _check_potential(kind)
    r = rewards.double()
    if kind == "max":
        new_state = torch.maximum(r, state)
        log_g = lam * new_state
    elif kind == "add":
        new_state = r + state
        log_g = lam * new_state
    elif kind == "diff":
        new_state = r
        log_g = lam * (r - state)
    else:
        new_state = r
        log_g = lam * r
    return log_g, new_state


def final_log_potential(lam: float, rewards: torch.Tensor, log_potential_product: torch.Tensor) -> torch.Tensor:
    """The final step's log-potential ``λ·r(x0) − Σ log G`` over the particle's earlier potentials.

    With it the product of potentials along every path is ``exp(λ·r(x0))``, so the weighted
    particles target ``p(x0)·exp(λ·r(x0))`` whatever the intermediate potentials were.
    """
    return lam * rewards.double() - log_potential_product.double()


def _uniforms(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


def multinomial_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N i.i.d. draws of ancestors with probability ∝ weight, per system (the reference scheme).

    Args:
        log_weights: (..., N) unnormalised log-weights.
        generator: a CPU generator for the draws.

    Returns:
        (..., N) long tensor of ancestor indices in [0, N).
    """
    probs = normalize_log_weights(log_weights).exp().cpu()
    flat = probs.reshape(-1, probs.shape[-1])
    n = flat.shape[-1]
    index = torch.multinomial(flat, n, replacement=True, generator=generator)
    return index.reshape(probs.shape).to(log_weights.device)


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Systematic resampling: one uniform u per system and positions (k + u)/N, k = 0 … N−1.

    Particle i is picked ``floor`` or ``ceil`` of N·w_i times and exactly N·w_i times in
    expectation (unbiased), with lower variance than multinomial resampling. The indices come out
    sorted.

    Args:
        log_weights: (..., N) unnormalised log-weights.
        generator: a CPU generator for the uniforms.

    Returns:
        (..., N) long tensor of ancestor indices in [0, N).
    """
    probs = normalize_log_weights(log_weights).exp().cpu()
    n = probs.shape[-1]
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[..., -1:]  # exact 1 at the end, whatever the rounding
    u = _uniforms((*probs.shape[:-1], 1), generator, "cpu")
    positions = (torch.arange(n, dtype=torch.float64) + u) / n
    index = torch.searchsorted(cdf.contiguous(), positions.contiguous(), right=True).clamp(max=n - 1)
    return index.to(log_weights.device)


def resample(
    log_weights: torch.Tensor, method: str = "systematic", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Ancestor indices by ``method`` (``"multinomial"`` or ``"systematic"``); see those functions."""
    if method == "multinomial":
        return multinomial_resample(log_weights, generator)
    if method == "systematic":
        return systematic_resample(log_weights, generator)
    raise ConfigError(f"Unknown resampler {method!r}; choose one of {RESAMPLERS}.")


def gather_particles(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Re-indexes per-particle values (P, N, ...) by ancestors (P, N) within each system."""
    expand = index.view(*index.shape, *([1] * (values.ndim - index.ndim))).expand_as(values)
    return torch.gather(values, 1, expand.to(values.device))
