"""The Advantage Weighted Matching objective as pure functions of tensors (docs/math.md §9).

AWM (Xue et al., arXiv 2509.25050) trains on the rollouts' clean samples like pre-training does:
flow matching on freshly noised copies of x0, with each sample's matching term weighted by its
advantage. It is written as a PPO-style objective whose "log-probability" is a weighted negative
matching loss ℓ = −w(σ, m); on-policy the ratio is exactly 1, and the gradient is
mean(A·∇(−ℓ)). Two anchors keep the policy near the base model and near an EMA of itself.
:class:`visalign.algorithms.awm.AWMTrainer` calls these functions; tests pin them by hand.
"""

from __future__ import annotations

import torch

from visalign.errors import ConfigError

__all__ = [
    "anchor_loss",
    "awm_advantages",
    "awm_log_weight",
    "awm_loss",
    "awm_policy_loss",
    "ema_anchor_decay",
    "matching_error",
    "num_usable_strata",
    "stratified_indices",
]

_TINY = 1e-10


def awm_advantages(advantages: torch.Tensor, clip_max: float = 5.0) -> torch.Tensor:
    """clip(A, ±clip_max)/clip_max ∈ [−1, 1], the official rescale (Flow-Factory drops the /clip_max)."""
    if clip_max is None or clip_max <= 0:
        raise ConfigError(
            f"AWM rescales advantages by clip_max, which must be > 0; got {clip_max!r}. The official value is 5."
        )
    return advantages.float().clamp(-clip_max, clip_max) / clip_max


def _strata_range(num_steps: int, fraction: float, mode: str) -> tuple[int, int]:
    if mode not in ("discrete_wo_init", "discrete"):
        raise ConfigError(f"time_sampling must be 'discrete_wo_init' or 'discrete', got {mode!r}.")
    return (1 if mode == "discrete_wo_init" else 0), int(num_steps * fraction)


def num_usable_strata(num_steps: int, fraction: float = 0.9, mode: str = "discrete_wo_init") -> int:
    """How many non-empty strata the rollout's indices allow: ⌊S·fraction⌋ − start (start 1 without σ=1)."""
    start, top = _strata_range(num_steps, fraction, mode)
    return max(0, top - start)


def stratified_indices(
    num_steps: int,
    num_strata: int,
    fraction: float = 0.9,
    mode: str = "discrete_wo_init",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One rollout-step index per stratum, shape (K,) (docs/math.md §9).

    The boundaries are b_k = ⌊start + k·(top − start)/K⌋ for k = 0..K with top = ⌊S·fraction⌋ and
    start = 1 (``discrete_wo_init``: never σ = 1, the pure-noise step) or 0 (``discrete``); stratum k
    draws uniformly from [b_k, b_{k+1}). With S = 14, fraction 0.9 and K = 6 the strata are {1},
    {2,3}, {4,5}, {6,7}, {8,9}, {10,11}. The boundaries are computed in integers (the official
    float ``linspace(...).long()`` is the same up to rounding).
    """
    start, top = _strata_range(num_steps, fraction, mode)
    if num_strata < 1 or num_strata > top - start:
        raise ConfigError(
            f"{num_strata} noise-level strata do not fit {num_steps} steps: {mode} with timestep_fraction={fraction} "
            f"leaves {max(0, top - start)} step indices. Use num_strata <= {max(0, top - start)} or more num_steps."
        )
    bounds = torch.tensor([start + (k * (top - start)) // num_strata for k in range(num_strata + 1)], dtype=torch.long)
    lower, upper = bounds[:-1], bounds[1:]
    u = torch.rand(num_strata, generator=generator, dtype=torch.float64)
    return lower + (u * (upper - lower).double()).long().clamp(max=(upper - lower - 1).clamp(min=0))


def matching_error(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """m = mean_dims (v − target)² per sample in float64, with target = ε − x0. Shape (B,)."""
    return (v.double() - target.double()).pow(2).flatten(1).mean(dim=1)


def awm_log_weight(m: torch.Tensor, sigma: torch.Tensor | float, weighting: str = "ghuber", power: float = 0.25):
    """ℓ, the "log-probability" of AWM: a weighted negative matching loss (float64, per sample).

    - ``ghuber``: ℓ = −σ·((m + 1e-10)^p − (1e-10)^p)/p (p = 0.25 officially; p = 1 gives −σ·m);
    - ``uniform``: ℓ = −m.
    """
    if weighting == "uniform":
        return -m.double()
    if weighting != "ghuber":
        raise ConfigError(f"weighting must be 'ghuber' or 'uniform', got {weighting!r}.")
    if power <= 0:
        raise ConfigError(f"ghuber_power must be > 0, got {power!r}; AWM uses 0.25.")
    s = torch.as_tensor(sigma, dtype=torch.float64, device=m.device)
    return -s * ((m.double() + _TINY) ** power - _TINY**power) / power


def awm_policy_loss(log_w: torch.Tensor, old_log_w: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1.0):
    """mean max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(ℓ − sg(ℓ_old)); every argument (N,).

    On-policy ``old_log_w`` is ``log_w.detach()``: ρ ≡ 1, the value is −mean(A) and the gradient
    is mean(A·∇(−ℓ)) = mean(A·w'(m)·∇m). Returns ``(loss, ratio)``.
    """
    ratio = torch.exp(log_w - old_log_w.detach())
    adv = advantages.to(ratio.dtype)
    terms = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    return terms.mean(), ratio


def anchor_loss(v: torch.Tensor, v_anchor: torch.Tensor | None) -> torch.Tensor:
    """mean_batch mean_dims (v − sg(v_anchor))², or 0 without an anchor."""
    if v_anchor is None:
        return v.new_zeros(())
    return (v.float() - v_anchor.float().detach()).pow(2).flatten(1).mean(dim=1).mean()


def awm_loss(
    v: torch.Tensor,
    target: torch.Tensor,
    sigma: torch.Tensor | float,
    advantages: torch.Tensor,
    old_log_w: torch.Tensor | None = None,
    clip_range: float = 1.0,
    weighting: str = "ghuber",
    power: float = 0.25,
    v_ref: torch.Tensor | None = None,
    ref_beta: float = 0.0,
    v_ema: torch.Tensor | None = None,
    ema_beta: float = 0.0,
):
    """The AWM loss of one noise level per sample (docs/math.md §9).

    ``policy + ref_beta·mean (v − v_ref)² + ema_beta·mean (v − v_ema)²``, the policy term of
    :func:`awm_policy_loss` on ℓ = :func:`awm_log_weight` of m = :func:`matching_error`.

    Args:
        v: (B, ...) the trained velocity at x_σ = (1−σ)·x0 + σ·ε (with gradient).
        target: (B, ...) ε − x0, with the same ε as every other pass at this x_σ.
        sigma: σ per sample (B,) or a float.
        advantages: (B,) rescaled advantages (:func:`awm_advantages`).
        old_log_w: (B,) ℓ of the behaviour policy at the same x_σ; None is on-policy (sg(ℓ), ρ ≡ 1).
        clip_range: the PPO clip ε (official 1, i.e. [0, 2]).
        weighting, power: see :func:`awm_log_weight`.
        v_ref, ref_beta: the base model's velocity and the weight of its anchor.
        v_ema, ema_beta: the EMA policy's velocity and the weight of its anchor.

    Returns:
        ``(loss, metrics)`` with detached floats ``loss``, ``policy_loss``, ``matching`` (mean m),
        ``ratio_mean``, ``clipfrac``, ``ref_anchor``, ``ema_anchor``.
    """
    m = matching_error(v, target)
    log_w = awm_log_weight(m, sigma, weighting, power)
    policy, ratio = awm_policy_loss(log_w, log_w.detach() if old_log_w is None else old_log_w, advantages, clip_range)
    ref, ema = anchor_loss(v, v_ref), anchor_loss(v, v_ema)
    loss = policy
    if v_ref is not None and ref_beta:
        loss = loss + ref_beta * ref
    if v_ema is not None and ema_beta:
        loss = loss + ema_beta * ema
    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "policy_loss": float(policy),
            "matching": float(m.mean()),
            "ratio_mean": float(ratio.mean()),
            "clipfrac": float(((ratio - 1).abs() > clip_range).float().mean()),
            "ref_anchor": float(ref),
            "ema_anchor": float(ema),
        }
    return loss, metrics


def ema_anchor_decay(step: int, rate: float = 0.001, cap: float = 0.3) -> float:
    """d = min(cap, rate·s) for the EMA anchor after ``step`` optimizer steps (official: 0.001, 0.3)."""
    return min(cap, rate * step)
