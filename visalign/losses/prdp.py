"""The PRDP objective as pure functions of tensors (docs/math.md §4).

Proximal reward-difference prediction, Deng et al., CVPR 2024 (arXiv 2402.08714): regress the
difference of two trajectories' predicted rewards (summed per-step log-ratios to the reference) on
the difference of their true rewards, with per-step proximal clipping.
"""

from __future__ import annotations

import torch

from visalign.errors import ConfigError

__all__ = ["pair_indices", "prdp_loss"]


def pair_indices(num_samples: int, group_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a, b) of all C(G,2) pairs a < b within each contiguous group of ``group_size``."""
    if num_samples % group_size:
        raise ConfigError(f"{num_samples} samples do not split into groups of {group_size}.")
    within = torch.combinations(torch.arange(group_size, device=device), 2)
    offsets = torch.arange(0, num_samples, group_size, device=device).view(-1, 1)
    return (offsets + within[:, 0]).reshape(-1), (offsets + within[:, 1]).reshape(-1)


def prdp_loss(
    log_ratios: torch.Tensor,
    old_log_ratios: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    beta: float,
    clip_range: float,
):
    """The PRDP objective (docs/math.md §4).

    Args:
        log_ratios: (B, k) r̂_θ,i = log π_θ − log π_ref of each trained step (with gradient).
        old_log_ratios: (B, k) r̂_old,i, the same under the rollout policy.
        rewards: (B,) the trajectories' rewards; groups of ``group_size`` are contiguous.
        group_size: G (pairs are formed within a group).
        beta: β > 0; the regression target is (r_a − r_b)/β.
        clip_range: ε of the per-step proximal clip.

    Returns:
        ``(loss, metrics)``: the mean over pairs of max(l, l_clip), and detached floats ``loss``,
        ``loss_unclipped`` (mean l), ``clipfrac`` (share of per-step terms outside r̂_old ± ε),
        ``clipped_pair_frac`` (share of pairs where l_clip > l, i.e. the clipped branch is taken),
        ``pred_reward_mean`` (mean r̂_θ).
    """
    a, b = pair_indices(log_ratios.shape[0], group_size, log_ratios.device)
    old = old_log_ratios.to(log_ratios.dtype)
    clipped = torch.clamp(log_ratios, old - clip_range, old + clip_range)
    pred, pred_clip = log_ratios.sum(1), clipped.sum(1)
    target = (rewards[a] - rewards[b]).to(log_ratios.dtype) / beta
    loss_plain = ((pred[a] - pred[b]) - target) ** 2
    loss_clip = ((pred_clip[a] - pred_clip[b]) - target) ** 2
    loss = torch.maximum(loss_plain, loss_clip).mean()
    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "loss_unclipped": float(loss_plain.mean()),
            "clipfrac": float(((log_ratios - old).abs() > clip_range).float().mean()),
            "clipped_pair_frac": float((loss_clip > loss_plain).float().mean()),
            "pred_reward_mean": float(pred.mean()),
        }
    return loss, metrics
