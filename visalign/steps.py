"""The step math of every visalign sampler, as pure functions of tensors (docs/math.md §0–§1).

This file is the one home of the denoising transitions. Samplers, trainers and steering call it;
nobody re-derives a step elsewhere. Each transition is a Gaussian ``x' ~ N(mean, std²)``; the
functions return ``(mean, std)`` and :func:`gaussian_log_prob` scores a drawn ``x'``.

Conventions (rectified flow): ``x_σ = (1−σ)·x0 + σ·ε``, the model predicts ``v ≈ ε − x0``, sampling
runs σ from 1 to 0 and ``dt = σ_next − σ < 0``.

Sources:
    - Flow SDE, ``dance`` noise: DanceGRPO, Xue et al., arXiv 2505.07818.
    - Flow SDE, ``flow`` noise, and the CPS step: Flow-GRPO, Liu et al., arXiv 2505.05470.
    - DDIM with a log-prob: DDPO, Black et al., arXiv 2305.13301 (DDIM: Song et al., arXiv 2010.02502).
"""

from __future__ import annotations

import math

import torch

from visalign.errors import SamplerError

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _as_batch(value, like: torch.Tensor) -> torch.Tensor:
    """Broadcasts a scalar or a per-sample (B,) value against a (B, ...) tensor, in fp32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 1 and like.ndim > 1:
        value = value.view(-1, *([1] * (like.ndim - 1)))
    return value


def flow_x0(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """The clean-sample prediction x̂0 = x − σ·v of a rectified-flow model."""
    return x - _as_batch(sigma, x) * v


def flow_x1(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """The noise prediction x̂1 = x + (1−σ)·v of a rectified-flow model."""
    return x + (1.0 - _as_batch(sigma, x)) * v


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE: x' = x + v·(σ_next − σ)."""
    dt = _as_batch(sigma_next, x) - _as_batch(sigma, x)
    return x + v * dt


def flow_diffusion_coefficient(noise: str, eta: float, sigma, sigma_max) -> torch.Tensor:
    """The SDE's diffusion coefficient g(σ) (docs/math.md §1).

    Args:
        noise: ``"dance"`` for a constant g = η (DanceGRPO), or ``"flow"`` for
            g = η·√(σ/(1−σ')) (Flow-GRPO), where σ' = σ except at σ = 1, where σ' = ``sigma_max``.
        eta: the noise level η (DanceGRPO 0.3 for FLUX/Wan; Flow-GRPO 0.7).
        sigma: the current σ, a float or a (B,) tensor.
        sigma_max: the schedule's second entry σ_1, used only in the ``flow`` denominator at σ = 1.
            Replacing only the denominator makes the first step's std exactly η.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if noise == "dance":
        return torch.full_like(sigma, float(eta))
    if noise == "flow":
        sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32, device=sigma.device)
        denominator_sigma = torch.where(sigma >= 1.0, sigma_max, sigma)
        return float(eta) * torch.sqrt(sigma / (1.0 - denominator_sigma))
    raise SamplerError(f"Unknown SDE noise schedule {noise!r}; use noise='flow' or noise='dance'.")


def flow_sde_mean_std(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, g):
    """Mean and std of one flow-SDE transition (docs/math.md §1).

    ``score = −(x + (1−σ)·v)/σ``, ``mean = x + [v − ½·g²·score]·dt``, ``std = g·√(−dt)``.
    With g = 0 this is exactly :func:`ode_step`.

    Args:
        x: the state at σ, (B, ...). Computed in fp32.
        v: the model's velocity prediction, same shape.
        sigma, sigma_next: floats or (B,) tensors, ``sigma_next < sigma``.
        g: the diffusion coefficient from :func:`flow_diffusion_coefficient` (float or (B,)).

    Returns:
        ``(mean, std)``: mean has x's shape; std is (B, 1, ...) broadcastable, or a 0-dim tensor.
    """
    x, v = x.float(), v.float()
    sigma_b, sigma_next_b, g_b = (_as_batch(s, x) for s in (sigma, sigma_next, g))
    dt = sigma_next_b - sigma_b
    score = -(x + (1.0 - sigma_b) * v) / sigma_b
    mean = x + (v - 0.5 * g_b**2 * score) * dt
    std = g_b * torch.sqrt(-dt)
    return mean, std


def cps_mean_std(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, eta: float):
    """Mean and std of Flow-GRPO's coefficient-preserving (CPS) step (docs/math.md §1).

    ``s = σ_next·sin(η·π/2)``, ``mean = x̂0·(1−σ_next) + x̂1·√(σ_next² − s²)``, ``std = s``.
    With η = 0 the mean is exactly the ODE step. At σ_next = 0 the std is 0 (no log-prob).
    """
    x, v = x.float(), v.float()
    sigma_next_b = _as_batch(sigma_next, x)
    std = sigma_next_b * math.sin(float(eta) * math.pi / 2.0)
    x0, x1 = flow_x0(x, v, sigma), flow_x1(x, v, sigma)
    mean = x0 * (1.0 - sigma_next_b) + x1 * torch.sqrt(torch.clamp(sigma_next_b**2 - std**2, min=0.0))
    return mean, std


def ddpm_x0_eps(x: torch.Tensor, model_output: torch.Tensor, alpha_cumprod, prediction_type: str):
    """Converts a DDPM-family model output to (x̂0, ε̂) (docs/math.md §0).

    Args:
        x: the noisy sample x_t.
        model_output: what the network predicts, as ``prediction_type`` says.
        alpha_cumprod: ᾱ_t, a float or (B,) tensor.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """
    x, model_output = x.float(), model_output.float()
    a = _as_batch(alpha_cumprod, x)
    sqrt_a, sqrt_1ma = torch.sqrt(a), torch.sqrt(1.0 - a)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * x
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - sqrt_a * x0) / sqrt_1ma
    else:
        raise SamplerError(
            f"Unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'."
        )
    return x0, eps


def ddim_mean_std(x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod, alpha_cumprod_prev, eta: float):
    """Mean and std of one DDIM step with noise (DDPO's log-prob step, docs/math.md §1).

    ``var = (1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)``, ``s = η·√var``,
    ``mean = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−s²)·ε̂``. With η = 0 this is deterministic DDIM.
    """
    a_t, a_prev = _as_batch(alpha_cumprod, x0), _as_batch(alpha_cumprod_prev, x0)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = float(eta) * torch.sqrt(variance)
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt(torch.clamp(1.0 - a_prev - std**2, min=0.0)) * eps
    return mean, std


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std, reduce: str = "mean") -> torch.Tensor:
    """Log-density of ``sample`` under N(mean, std²), reduced over all non-batch dims.

    Always the full density ``−(x−μ)²/(2s²) − log s − ½·log 2π``, computed in fp32 (docs/math.md §0).

    Args:
        sample, mean: (B, ...) tensors.
        std: a tensor broadcastable to ``mean`` with every entry > 0.
        reduce: ``"mean"`` (the peers' default, keeps clip ranges comparable across resolutions)
            or ``"sum"`` (the true joint log-density).

    Returns:
        A (B,) float32 tensor.
    """
    sample, mean = sample.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    log_density = -((sample - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return reduce_per_sample(log_density.expand_as(mean), reduce)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std, reduce: str = "mean") -> torch.Tensor:
    """KL(N(μ_p, s²) ‖ N(μ_q, s²)) = (μ_p − μ_q)²/(2s²) per element, reduced like the log-prob.

    ``std`` is the step's full std, including the √(−dt) factor (docs/math.md §2; Flow-GRPO omits it).
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_p.device)
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2.0 * std**2)
    return reduce_per_sample(kl.expand_as(mean_p), reduce)


def reduce_per_sample(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduces (B, ...) to (B,) by ``"mean"`` or ``"sum"`` over all non-batch dims."""
    if reduce == "mean":
        return values.flatten(1).mean(dim=1)
    if reduce == "sum":
        return values.flatten(1).sum(dim=1)
    raise SamplerError(f"Unknown log-prob reduction {reduce!r}; use 'mean' or 'sum'.")


# ---------------------------------------------------------------------------- forward process
# The noising direction x0 → x_t, used where training draws its own noise level: DPO's regression
# targets (docs/math.md §3) and DRaFT-LV's re-noising of the final sample (docs/math.md §5).
def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The rectified-flow forward process x_σ = (1−σ)·x0 + σ·ε; ``sigma`` a float or (B,)."""
    s = _as_batch(sigma, x0)
    return (1.0 - s) * x0.float() + s * noise.float()


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What a rectified-flow model regresses on at any σ: the velocity ε − x0."""
    return noise.float() - x0.float()


def ddpm_add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod) -> torch.Tensor:
    """The DDPM forward process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; ``alpha_cumprod`` a float or (B,)."""
    a = _as_batch(alpha_cumprod, x0)
    return torch.sqrt(a) * x0.float() + torch.sqrt(1.0 - a) * noise.float()


def ddpm_target(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod, prediction_type: str) -> torch.Tensor:
    """What a DDPM-family model regresses on: ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or x0 (the inverse of :func:`ddpm_x0_eps`)."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        a = _as_batch(alpha_cumprod, x0)
        return torch.sqrt(a) * noise.float() - torch.sqrt(1.0 - a) * x0.float()
    if prediction_type == "sample":
        return x0.float()
    raise SamplerError(f"Unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'.")
