"""The GRPO objective for diffusion and flow policies, as pure functions of tensors (docs/math.md §2).

DanceGRPO (Xue et al., arXiv 2505.07818), Flow-GRPO (Liu et al., arXiv 2505.05470) and DDPO
(Black et al., arXiv 2305.13301): group-relative advantages, the PPO-clipped ratio objective with an
optional KL term, and the choice of trained steps; GRPO-Guard's normalised ratio and reweighted
loss (GRPO-Guard, arXiv 2510.22319; docs/math.md §11). :class:`visalign.algorithms.grpo.GRPOTrainer`
calls them; tests pin them against hand-computed numbers.
"""

from __future__ import annotations

import torch

from visalign.errors import ConfigError

__all__ = ["flow_grpo_kl", "group_advantages", "grpo_guard_loss", "grpo_loss", "guard_log_ratio", "select_train_steps"]


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    std: str = "group",
    clip: float | None = 5.0,
    eps: float = 1e-4,
    zero_std_tol: float = 1e-6,
):
    """Group-relative advantages A = (r − mean_group)/(std + eps), clipped to ±clip.

    Args:
        rewards: (N,) rewards, groups contiguous (sample g·G … g·G+G−1 share a prompt).
        group_size: G.
        std: ``"group"`` (each group's std) or ``"global"`` (the std over all N, Flow-GRPO's default).
        clip: the advantage clip A_max (None disables).
        eps: a floor added to the std (Flow-GRPO's 1e-4): rewards that differ by jitter far below it
            get advantages far below 1, not a full-strength ±1.
        zero_std_tol: a group whose reward std is at most this carries no signal.

    Returns:
        ``(advantages (N,), zero_std (N // G,) bool)``. Zero-std groups get advantage 0.
        Stds are population stds (divide by G), as the peers compute them.
    """
    rewards = rewards.float()
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}.")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, unbiased=False, keepdim=True)
    zero_std = group_std.squeeze(1) <= zero_std_tol
    scale = group_std if std == "group" else rewards.std(unbiased=False)
    if std not in ("group", "global"):
        raise ConfigError(f"advantage std must be 'group' or 'global', got {std!r}.")
    advantages = (grouped - mean) / (scale + eps)
    advantages = torch.where(zero_std.unsqueeze(1), torch.zeros_like(advantages), advantages)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages.reshape(-1), zero_std


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
):
    """The PPO-clipped GRPO objective over trained steps (docs/math.md §2).

    ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) + β·KL`` per (sample, step), with ρ = exp(log π − log π_old).

    Args:
        log_probs: (B, k) log π_θ of the trained transitions (with gradient).
        old_log_probs: (B, k) log π_old from the rollout.
        advantages: (B,) one advantage per sample.
        clip_range: ε.
        kl: optional (B, k) KL to the reference per transition; ``kl_beta`` scales it.
        weights: optional (B,) sample weights (0 drops a sample, e.g. a zero-std group).
        reduction: ``"mean"`` over weighted terms, or ``"sum"`` (the caller normalises).

    Returns:
        ``(loss, metrics)``: a scalar and a dict of detached floats — ``policy_loss``, ``kl``,
        ``clipfrac`` (share of terms with |ρ−1| > ε), ``approx_kl`` (½·mean((log π − log π_old)²)),
        ``ratio_mean``.
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1).to(ratio.dtype)
    terms = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    if kl is not None and kl_beta:
        terms = terms + kl_beta * kl
    w = torch.ones_like(advantages) if weights is None else weights.float()
    w = w.unsqueeze(1).expand_as(terms)
    total = (terms * w).sum()
    count = w.sum().clamp(min=1.0)
    loss = total / count if reduction == "mean" else total
    with torch.no_grad():
        mask = w > 0
        pick = (lambda t: t[mask]) if bool(mask.any()) else (lambda t: t.flatten()[:0])
        metrics = {
            "policy_loss": float(
                (((-adv * ratio).maximum(-adv * ratio.clamp(1 - clip_range, 1 + clip_range))) * w).sum() / count
            ),
            "clipfrac": float(((ratio - 1).abs() > clip_range).float()[mask].mean()) if bool(mask.any()) else 0.0,
            "approx_kl": float(0.5 * pick(log_ratio).pow(2).mean()) if bool(mask.any()) else 0.0,
            "ratio_mean": float(pick(ratio).mean()) if bool(mask.any()) else 1.0,
            "kl": float((kl * w).sum() / count) if kl is not None else 0.0,
        }
    return loss, metrics


def select_train_steps(
    sde_mask: torch.Tensor,
    batch: int,
    fraction: float,
    generator: torch.Generator | None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Which transitions each sample trains on, as a (B, k) long tensor (docs/math.md §2).

    Never the last step. With an SDE window: every stochastic step of the window. Otherwise a
    random ``fraction`` of the stochastic steps, drawn per sample (DanceGRPO trains on 60%).
    """
    num_steps = sde_mask.shape[0]
    candidates = [i for i in range(num_steps - 1) if bool(sde_mask[i])]
    if not candidates:
        raise ConfigError(
            "No trainable steps: every stochastic step is the last one. Use more sampling steps or a wider SDE window."
        )
    if window is not None:
        return torch.tensor(candidates, dtype=torch.long).unsqueeze(0).expand(batch, -1).clone()
    k = max(1, round(fraction * len(candidates)))
    choice = torch.stack([torch.randperm(len(candidates), generator=generator)[:k] for _ in range(batch)])
    return torch.tensor(candidates, dtype=torch.long)[choice].sort(dim=1).values


def flow_grpo_kl(kl: torch.Tensor, minus_dt: torch.Tensor) -> torch.Tensor:
    """The KL in the form of Flow-GRPO's code, from the exact Gaussian KL of a flow-SDE step (docs/math.md §2).

    A step's std is g·√(−dt), so its exact KL is ‖Δμ‖²/(2g²·(−dt)). Flow-GRPO divides by 2g² only,
    which is the exact KL times (−dt): a per-unit-time KL, for which its β (0.004–0.04) were tuned.

    Args:
        kl: the exact KL per transition, any shape.
        minus_dt: σ_i − σ_{i+1} > 0 of each transition, broadcastable to ``kl``.
    """
    return kl * minus_dt.to(kl.dtype)


def guard_log_ratio(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    means: torch.Tensor,
    old_means: torch.Tensor,
    std: torch.Tensor,
    reduce: str = "mean",
) -> torch.Tensor:
    """GRPO-Guard's RatioNorm: the normalised log-ratio log ρ̃ of each trained transition (docs/math.md §11).

    ``log ρ̃ = s·[log π_θ − log π_old + R(δ²)/(2s²)]`` with δ = μ_θ − μ_old, s the step's std and R
    the log-prob's reduction over the latent dimensions (``reduce``, mean or sum). For a Gaussian
    step the plain log-ratio is R(z·δ)/s − R(δ²)/(2s²), z = (x' − μ_old)/s the rollout noise, so
    log ρ̃ = R(z·δ): its mean over z is 0 and it does not depend on s, where the plain log-ratio's
    mean is −R(δ²)/(2s²) < 0 (the left shift GRPO-Guard corrects).

    Args:
        log_probs: (B, k) log π_θ of the trained transitions (with gradient).
        old_log_probs: (B, k) log π_old from the rollout.
        means: (B, k, ...) μ_θ of those transitions (with gradient).
        old_means: (B, k, ...) μ_old, the rollout's means (``Trajectory.means`` at the trained steps).
        std: (B, k) the step std s of each transition (per sample), > 0.
        reduce: the reduction the log-probs were computed with, ``"mean"`` (default) or ``"sum"``.

    Returns:
        (B, k) log ρ̃, float32.
    """
    if reduce not in ("mean", "sum"):
        raise ConfigError(f"reduce must be 'mean' or 'sum', got {reduce!r}.")
    delta = (means.float() - old_means.float()).flatten(2)
    sq = delta.pow(2).mean(-1) if reduce == "mean" else delta.pow(2).sum(-1)
    s = std.float()
    return s * (log_probs.float() - old_log_probs.float() + sq / (2 * s * s))


def grpo_guard_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    minus_dt: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
):
    """GRPO-Guard's objective: the PPO clip of :func:`grpo_loss` on ρ̃, each policy term divided by −dt.

    ``max(−A·ρ̃, −A·clip(ρ̃, 1−ε, 1+ε))/(−dt) + β·KL`` per (sample, step): the gradient
    reweighting of GRPO-Guard (docs/math.md §11) that evens out the steps' gradient scales. The
    KL term is not reweighted.

    Args:
        log_ratio: (B, k) log ρ̃ from :func:`guard_log_ratio` (with gradient).
        advantages: (B,) one advantage per sample.
        clip_range: ε.
        minus_dt: (B, k) or broadcastable, σ_i − σ_{i+1} > 0 of each trained transition.
        kl, kl_beta, weights, reduction: as in :func:`grpo_loss`.

    Returns:
        ``(loss, metrics)``: the metrics of :func:`grpo_loss` on ρ̃ (``clipfrac``, ``approx_kl``,
        ``ratio_mean`` are of ρ̃), with ``policy_loss`` the reweighted policy term.
    """
    _, metrics = grpo_loss(
        log_ratio.detach(), torch.zeros_like(log_ratio), advantages, clip_range, kl=kl, kl_beta=kl_beta, weights=weights
    )
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1).to(ratio.dtype)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    policy = policy / minus_dt.to(policy.dtype).expand_as(policy)
    terms = policy + kl_beta * kl if kl is not None and kl_beta else policy
    w = (torch.ones_like(advantages) if weights is None else weights.float()).unsqueeze(1).expand_as(terms)
    count = w.sum().clamp(min=1.0)
    total = (terms * w).sum()
    metrics["policy_loss"] = float((policy.detach() * w).sum() / count)
    return (total / count if reduction == "mean" else total), metrics
