"""The Diffusion-DPO / Flow-DPO objective and its relatives as pure functions of tensors (docs/math.md §3).

Diffusion-DPO is Wallace et al., arXiv 2311.12908; Flow-DPO and Flow-RWR are from VideoAlign (Liu et
al., arXiv 2501.13918). :class:`visalign.algorithms.dpo.DPOTrainer` calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visalign.errors import ConfigError

__all__ = ["best_worst_pairs", "dpo_beta", "dpo_loss", "prediction_errors", "rwr_weights"]


def prediction_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample regression error e = mean over all non-batch dims of (pred − target)², in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float | torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
):
    """The Diffusion-/Flow-DPO loss (docs/math.md §3).

    ``z = −½·β·[(e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)]``, loss = mean over pairs of −log σ(z) (the
    mean of log σ, never log σ of the mean).

    Args:
        err_w, err_l: (B,) the policy's errors on the chosen and rejected samples (with gradient).
        ref_err_w, ref_err_l: (B,) the reference's errors on the same noisy inputs (no gradient).
        beta: β, a float or a (B,) per-pair β_t (see :func:`dpo_beta`).
        weights: optional (B,) pair weights (0 drops a pair, e.g. a group without a reward spread).
        reduction: ``"mean"`` (weighted mean over pairs) or ``"sum"`` (Σ w·(−log σ(z)); the caller
            normalises, e.g. across micro-batches).

    Returns:
        ``(loss, metrics)``: a scalar, and detached floats over the weighted pairs: ``loss``,
        ``implicit_acc`` = mean(z > 0) (a tie counts as wrong, so identical policy and reference give
        0), ``reward_margin`` = mean(z) (the implicit reward margin), and the four mean errors
        ``err_chosen``, ``err_rejected``, ``ref_err_chosen``, ``ref_err_rejected``.
    """
    beta = torch.as_tensor(beta, dtype=torch.float32, device=err_w.device)
    z = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    w = torch.ones_like(z) if weights is None else weights.to(z)
    count = w.sum().clamp(min=1e-12)
    total = (w * -F.logsigmoid(z)).sum()
    loss = total / count if reduction == "mean" else total
    with torch.no_grad():
        mean = lambda t: float((w * t.float()).sum() / count)  # noqa: E731
        metrics = {
            "loss": mean(-F.logsigmoid(z)),
            "implicit_acc": mean(z > 0),
            "reward_margin": mean(z),
            "err_chosen": mean(err_w),
            "err_rejected": mean(err_l),
            "ref_err_chosen": mean(ref_err_w),
            "ref_err_rejected": mean(ref_err_l),
        }
    return loss, metrics


def dpo_beta(beta: float, schedule: str, level: torch.Tensor, prediction_type: str = "velocity"):
    """β per pair: constant, or the ε-equivalent schedule (docs/math.md §3).

    The ε-equivalent schedule weights each error as the ε-prediction error it corresponds to, so a
    β tuned for ε-models carries over: for flow velocity (ε̂ − ε = (1−σ)(v̂ − v)) β_t = β·(1−σ)²; for
    DDPM v-prediction (ε̂ − ε = √ᾱ(v̂ − v)) β_t = β·ᾱ; for x0-prediction β_t = β·ᾱ/(1−ᾱ); for ε it is β.

    Args:
        beta: β > 0.
        schedule: ``"constant"`` or ``"eps"``.
        level: (B,) σ (flow) or ᾱ_t (DDPM) of each pair.
        prediction_type: the policy's ``prediction_type``: ``"velocity"`` (rectified flow),
            ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """
    level = level.float()
    if schedule == "constant":
        return torch.full_like(level, float(beta))
    if schedule != "eps":
        raise ConfigError(f"beta_schedule must be 'constant' or 'eps'; got {schedule!r}.")
    weight = {
        "velocity": lambda: (1.0 - level) ** 2,
        "epsilon": lambda: torch.ones_like(level),
        "v_prediction": lambda: level,
        "sample": lambda: level / (1.0 - level),
    }
    if prediction_type not in weight:
        raise ConfigError(f"Unknown prediction_type {prediction_type!r}; expected one of {sorted(weight)}.")
    return beta * weight[prediction_type]()


def rwr_weights(rewards: torch.Tensor, group_size: int, beta: float) -> torch.Tensor:
    """Flow-RWR weights: softmax(r/β) within each group of ``group_size``, so each group sums to 1."""
    return torch.softmax(rewards.float().view(-1, group_size) / beta, dim=1).reshape(-1)


def best_worst_pairs(rewards: torch.Tensor, group_size: int, min_gap: float = 1e-8):
    """Online DPO pairs: the best and the worst sample of each contiguous group of ``group_size``.

    Returns:
        ``(best, worst, gap, active)``: (P,) row indices into ``rewards`` of each group's best and
        worst sample, their reward gap, and whether the gap exceeds ``min_gap`` (a group without
        a reward spread states no preference).
    """
    grouped = rewards.view(-1, group_size)
    offset = torch.arange(grouped.shape[0], device=rewards.device) * group_size
    gap = grouped.max(1).values - grouped.min(1).values
    return offset + grouped.argmax(1), offset + grouped.argmin(1), gap, gap > min_gap
