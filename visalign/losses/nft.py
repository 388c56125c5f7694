"""The DiffusionNFT objective as pure functions of tensors (docs/math.md §8).

DiffusionNFT (Zheng et al., arXiv 2509.16117) is reinforcement learning on the *forward* process:
rollouts supply clean samples x0 and rewards, and the policy is trained by flow matching on freshly
noised copies of them. Each sample's advantage becomes an optimality probability r ∈ [0, 1]; the
trained velocity v_θ and the lagged old policy's v_old define two implicit policies,

    v⁺ = β·v_θ + (1−β)·sg(v_old)        (the improved policy, fitted to the good samples)
    v⁻ = (1+β)·sg(v_old) − β·v_θ        (its mirror image about v_old, fitted to the bad ones)

and the loss is ``clip_max·[r·L⁺ + (1−r)·L⁻]/β`` with x0-space errors divided by detached adaptive
weights. :class:`visalign.algorithms.nft.NFTTrainer` calls these functions; the tests pin them
against the closed forms of docs/math.md §8 (the scalar minimiser, the gradient at v_θ = v_old).
"""

from __future__ import annotations

import torch

from visalign.errors import ConfigError

__all__ = [
    "OLD_DECAY_SCHEDULES",
    "adaptive_weight",
    "implicit_velocities",
    "nft_loss",
    "old_policy_decay",
    "optimality_probability",
]

# decay_type → (flat steps, rate per optimizer step, cap): d(s) = 0 for s < flat, else min(rate·(s − flat), cap).
OLD_DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
WEIGHT_FLOOR = 1e-5


def optimality_probability(advantages: torch.Tensor, clip_max: float = 5.0) -> torch.Tensor:
    """r = clip(A/clip_max/2 + ½, 0, 1): the linear map of docs/math.md §8 (not a sigmoid).

    A = clip_max gives 1, A = −clip_max gives 0, A = 0 gives ½; larger |A| saturates.
    """
    if clip_max <= 0:
        raise ConfigError(f"optimality_probability needs clip_max > 0, got {clip_max!r}; DiffusionNFT uses 5.")
    return (advantages.float() / clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def implicit_velocities(v: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit positive and negative velocities ``(v⁺, v⁻)``; ``v_old`` is detached here."""
    if beta <= 0:
        raise ConfigError(f"The NFT strength beta must be > 0, got {beta!r}; DiffusionNFT uses 1.0 (0.1 for OCR).")
    v_old = v_old.detach()
    return beta * v + (1.0 - beta) * v_old, (1.0 + beta) * v_old - beta * v


@torch.no_grad()
def adaptive_weight(x0_hat: torch.Tensor, x0: torch.Tensor, floor: float = WEIGHT_FLOOR) -> torch.Tensor:
    """w = max(mean_dims |x̂0 − x0|, floor) per sample, in float64 and without gradient, shape (B,)."""
    return (x0_hat.detach().double() - x0.double()).abs().flatten(1).mean(dim=1).clamp(min=floor)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).mean(dim=1)


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor | float,
    r: torch.Tensor,
    beta: float = 1.0,
    clip_max: float = 5.0,
    v_ref: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    adaptive_weights: bool = True,
):
    """The DiffusionNFT loss of one noise level per sample (docs/math.md §8).

    With x̂± = x_t − σ·v±, w± = max(mean_dims |x̂± − x0|, 1e-5) (detached, float64) and
    L± = mean_dims (x̂± − x0)²/w±::

        loss = mean_batch clip_max·[r·L⁺ + (1−r)·L⁻]/β  +  kl_beta·mean_batch mean_dims (v − v_ref)²

    At v = v_old the value is clip_max·L/β for every r and the gradient is clip_max·(2r−1)·∇L, with
    L the weighted flow-matching loss: r = ½ (A = 0) is a pure trust region around the old policy.

    Args:
        v: (B, ...) the trained velocity v_θ(x_t) (with gradient).
        v_old: (B, ...) the old policy's velocity at the same x_t (detached here).
        x_t: (B, ...) the noised input (1−σ)·x0 + σ·ε.
        x0: (B, ...) the clean rollout samples.
        sigma: σ per sample (B,) or a float.
        r: (B,) optimality probabilities (:func:`optimality_probability`).
        beta: β > 0, how far the implicit policies move from v_old.
        clip_max: the advantage clip A_max, which also scales the loss (5 in the official code).
        v_ref: optional (B, ...) base-model velocity for the penalty; ``kl_beta`` weighs it.
        adaptive_weights: False sets w± = 1 (for analysis and tests; the method uses True).

    Returns:
        ``(loss, metrics)``: a scalar (float64 when adaptive weights are on, as the official code),
        and detached floats ``loss``, ``policy_loss``, ``kl``, ``loss_pos``, ``loss_neg`` (the mean
        L±), ``r_mean``, ``old_deviation`` = mean (v − v_old)².
    """
    v_pos, v_neg = implicit_velocities(v.float(), v_old.float(), beta)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=v.device)
    s = s.reshape(-1, *([1] * (v.ndim - 1))) if s.ndim else s
    x_t, x0 = x_t.float(), x0.float()
    x_pos, x_neg = x_t - s * v_pos, x_t - s * v_neg
    if adaptive_weights:
        w_pos, w_neg = adaptive_weight(x_pos, x0), adaptive_weight(x_neg, x0)
    else:
        w_pos = w_neg = torch.ones(v.shape[0], dtype=torch.float64, device=v.device)
    loss_pos = _per_sample((x_pos - x0).pow(2)) / w_pos
    loss_neg = _per_sample((x_neg - x0).pow(2)) / w_neg
    r = r.to(loss_pos.dtype)
    policy = (clip_max * (r * loss_pos + (1.0 - r) * loss_neg) / beta).mean()
    kl = _per_sample((v.float() - v_ref.float().detach()).pow(2)).mean() if v_ref is not None else None
    loss = policy + kl_beta * kl if kl is not None and kl_beta else policy
    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "policy_loss": float(policy),
            "kl": float(kl) if kl is not None else 0.0,
            "loss_pos": float(loss_pos.mean()),
            "loss_neg": float(loss_neg.mean()),
            "r_mean": float(r.mean()),
            "old_deviation": float((v.float() - v_old.float()).pow(2).mean()),
        }
    return loss, metrics


def old_policy_decay(step: int, decay_type: int = 1) -> float:
    """The decay d of the old-policy update θ_old ← d·θ_old + (1−d)·θ after ``step`` optimizer steps.

    - ``0``: d = 0 (the old policy is the current one after every iteration);
    - ``1`` (the default): d = min(0.001·s, 0.5);
    - ``2`` (the official OCR setting): d = 0 while s < 75, then min(0.0075·(s − 75), 0.999).
    """
    if decay_type not in OLD_DECAY_SCHEDULES:
        raise ConfigError(f"decay_type must be one of {sorted(OLD_DECAY_SCHEDULES)}, got {decay_type!r}.")
    flat, rate, cap = OLD_DECAY_SCHEDULES[decay_type]
    if step < flat:
        return 0.0
    return min(rate * (step - flat), cap)
