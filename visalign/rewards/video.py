"""Video rewards: image rewards over sampled frames, and whole-clip (multi-head) reward models.

:class:`SegmentalVideoReward` follows InstructVideo (Yuan et al. 2023, arXiv 2312.12490):

1. Split the F frames into S equal segments; segment s covers frames
   ``[floor(s*F/S), floor((s+1)*F/S))``.
2. Take one frame per segment: a uniformly random frame of the segment (TSN sampling, for
   training) or the segment's first frame (``"fixed"``, for evaluation).
3. Score each chosen frame with any image reward.
4. Average with temporal attenuation weights ``w_f = exp(-lambda * |f - F/2|)``, normalised to sum
   to 1 over the chosen frames (``lambda = 1`` in the paper; it is harsh for long clips, where
   a smaller value keeps the edge frames in play; ``lambda = 0`` is a plain mean).

:class:`VideoReward` is the base of rewards that take the whole clip (B, T, 3, H, W), and
:class:`MultiHeadVideoReward` adapts multi-dimensional video reward models such as VideoAlign's
VideoReward (Liu et al. 2025, arXiv 2501.13918), whose heads (visual quality, motion quality, text
alignment) are summed, optionally after z-normalisation, into one overall score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError, RewardError
from visalign.rewards.base import (
    Reward,
    _accepted_kwargs,
    as_reward,
    call_reward,
    freeze,
    is_differentiable,
    reward_name,
)
from visalign.rewards.result import RewardResult

__all__ = ["segment_indices", "attenuation_weights", "VideoReward", "SegmentalVideoReward", "MultiHeadVideoReward"]


def segment_indices(
    num_frames: int,
    segments: int,
    sampling: str = "fixed",
    *,
    batch: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The frame picked in each of ``segments`` equal segments of ``num_frames`` frames.

    Segment ``s`` covers ``[floor(s*F/S), floor((s+1)*F/S))``.

    Args:
        num_frames: F.
        segments: S, at most F.
        sampling: ``"fixed"`` takes each segment's first frame; ``"tsn"`` a uniformly random frame
            of each segment (independently per video).
        batch: with ``"tsn"``, draw for this many videos; the result is then (batch, S).
        generator: the random source of ``"tsn"`` (a CPU generator).

    Returns:
        `torch.LongTensor`: (S,) for ``"fixed"`` or ``batch=None``, else (batch, S).
    """
    if segments < 1 or segments > num_frames:
        raise InvalidInputError(
            f"cannot split {num_frames} frames into {segments} segments; use 1 <= segments <= {num_frames}."
        )
    s = torch.arange(segments + 1)
    bounds = (s * num_frames) // segments
    start, length = bounds[:-1], bounds[1:] - bounds[:-1]
    if sampling == "fixed":
        return start if batch is None else start.expand(batch, segments).clone()
    if sampling != "tsn":
        raise ConfigError(f"sampling must be 'tsn' or 'fixed'; got {sampling!r}.")
    shape = (segments,) if batch is None else (batch, segments)
    u = torch.rand(shape, generator=generator)
    return start + (u * length).long().clamp(max=length - 1)


def attenuation_weights(frame_indices: torch.Tensor, num_frames: int, lam: float) -> torch.Tensor:
    """InstructVideo's temporal attenuation, ``exp(-lam * |f - F/2|)`` normalised over the last dim.

    Args:
        frame_indices: (..., S) frame numbers f (0-based).
        num_frames: F.
        lam: the decay rate lambda (>= 0); 0 gives equal weights.

    Returns:
        `torch.Tensor`: float32 weights of the same shape, summing to 1 along the last dim.
    """
    if lam < 0:
        raise ConfigError(f"attenuation must be >= 0; got {lam}.")
    d = (frame_indices.float() - num_frames / 2).abs()
    return torch.softmax(-lam * d, dim=-1)  # = exp(-lam d) / sum exp(-lam d), computed stably


class VideoReward(Reward):
    """Base of rewards that score whole clips: ``reward(videos, prompts) -> Tensor[B]``.

    ``videos`` are floats in [0, 1], (B, T, 3, H, W). Subclasses implement :meth:`score`.
    """

    input_kind = "video"
    default_name = "video_reward"


class SegmentalVideoReward(VideoReward):
    """Scores videos with an image reward on one frame per segment, temporally attenuated.

    See the module docstring for the exact indices and weights.

    Args:
        image_reward: any image reward (a :class:`Reward` or a callable).
        segments: S (default 4).
        sampling: ``"tsn"`` (random frame per segment, training) or
            ``"fixed"`` (first frame per segment, evaluation). A call may override it with
            ``sampling=``.
        attenuation: lambda of ``exp(-lambda |f - F/2|)``; 0 averages
            evenly.
        seed: seeds the TSN draws; a call may pass its own ``generator=`` (default 0).
        name: defaults to ``"segmental_" + image reward name``.

    After each call, ``last_frame_indices`` (B, S) and ``last_weights`` (B, S) hold what was used.
    Differentiable exactly when the image reward is.
    """

    def __init__(
        self,
        image_reward: Any,
        segments: int = 4,
        sampling: str = "tsn",
        attenuation: float = 1.0,
        *,
        seed: int = 0,
        name: str | None = None,
    ):
        if sampling not in ("tsn", "fixed"):
            raise ConfigError(f"sampling must be 'tsn' or 'fixed'; got {sampling!r}.")
        if attenuation < 0:
            raise ConfigError(f"attenuation must be >= 0; got {attenuation}.")
        if segments < 1:
            raise ConfigError(f"segments must be >= 1; got {segments}.")
        super().__init__(
            name=name or f"segmental_{reward_name(image_reward)}",
            differentiable=is_differentiable(image_reward),
            batch_size=None,
        )
        self.image_reward = as_reward(image_reward)
        self.needs_prompts = getattr(self.image_reward, "needs_prompts", True)
        self.segments, self.sampling, self.attenuation = segments, sampling, float(attenuation)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_frame_indices: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    @property
    def accepted_conditioning(self) -> set[str] | None:
        inner = self.image_reward.accepted_conditioning
        return None if inner is None else inner | {"sampling", "generator"}

    def score(
        self,
        videos: torch.Tensor,
        prompts: list[str] | None,
        *,
        sampling: str | None = None,
        generator: torch.Generator | None = None,
        **conditioning,
    ) -> torch.Tensor:
        b, f = videos.shape[:2]
        idx = segment_indices(
            f, self.segments, sampling or self.sampling, batch=b, generator=generator or self.generator
        )
        weights = attenuation_weights(idx, f, self.attenuation).to(videos.device)
        idx = idx.to(videos.device)
        frames = videos[torch.arange(b, device=videos.device)[:, None], idx]  # (B, S, 3, H, W)
        s = self.segments
        flat_prompts = None if prompts is None else [p for p in prompts for _ in range(s)]
        cond = {k: _repeat(v, b, s) for k, v in conditioning.items()}
        scores = call_reward(self.image_reward, frames.flatten(0, 1), flat_prompts, **cond).total
        self.last_frame_indices, self.last_weights = idx, weights
        return (scores.view(b, s) * weights).sum(-1)


def _repeat(value: Any, batch: int, times: int) -> Any:
    """Repeats per-video conditioning for each of its frames."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat_interleave(times, dim=0)
    if isinstance(value, (list, tuple)) and len(value) == batch:
        return [v for v in value for _ in range(times)]
    return value


class MultiHeadVideoReward(VideoReward):
    """Adapts a multi-dimensional video reward model (VideoAlign-style) to the reward interface.

    The wrapped ``model(videos, prompts, **conditioning)`` returns named sub-scores: a mapping
    ``{head: Tensor[B]}``, an object with those attributes, or a (B, K) tensor whose columns are
    ``head_names``. The reward is

        overall = sum_h weight_h * (s_h - mean_h) / std_h

    with ``(mean_h, std_h)`` from ``normalization`` (identity for heads not listed) and weights 1
    by default, i.e. the plain sum of heads, as VideoAlign reports "Overall".

    Args:
        model: the video reward model (a callable; an ``nn.Module`` is frozen and moved with the
            reward).
        heads: the heads to sum; defaults to all the model returns.
        weights: per-head weights (default 1).
        normalization: per-head (mean, std), e.g.
            from the model's config.
        head_names: the column names when the model returns a tensor.
        name, differentiable, batch_size: as for every :class:`Reward` (defaults ``"video_reward"``,
            False, None).

    :meth:`evaluate` (and :func:`~visalign.rewards.call_reward`) returns the heads as the parts of
    a :class:`~visalign.rewards.RewardResult`: ``components[h]`` is ``weight_h * (s_h - mean_h) /
    std_h`` (they add up to ``overall``), ``raw[h]`` the model's own ``s_h`` and ``weights[h]``
    ``weight_h``, for the summed heads.
    """

    default_differentiable = False

    def __init__(
        self,
        model: Callable,
        *,
        heads: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        normalization: Mapping[str, tuple[float, float]] | None = None,
        head_names: Sequence[str] | None = None,
        name: str | None = None,
        differentiable: bool = False,
        batch_size: int | None = None,
    ):
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        if isinstance(model, torch.nn.Module):
            freeze(model)
        self.model = model
        self.heads = list(heads) if heads is not None else None
        self.weights = dict(weights or {})
        self.normalization = {k: (float(m), float(s)) for k, (m, s) in (normalization or {}).items()}
        bad = [k for k, (_, s) in self.normalization.items() if s <= 0]
        if bad:
            raise ConfigError(f"normalization std must be > 0; got it for heads {bad}.")
        self.head_names = list(head_names) if head_names is not None else None

    @property
    def accepted_conditioning(self) -> set[str] | None:
        return _accepted_kwargs(self.model)

    def _heads(self, videos: torch.Tensor, prompts: list[str] | None, **conditioning) -> dict[str, torch.Tensor]:
        out = self.model(videos, prompts, **conditioning)
        b = videos.shape[0]
        if isinstance(out, torch.Tensor):
            if out.dim() != 2 or self.head_names is None or out.shape[1] != len(self.head_names):
                raise RewardError(
                    f"{self.name}: the model returned a tensor of shape {tuple(out.shape)}; a "
                    "(B, K) tensor needs head_names= with K names (or return a dict of heads)."
                )
            out = {h: out[:, i] for i, h in enumerate(self.head_names)}
        elif not isinstance(out, Mapping):
            names = self.heads or self.head_names
            if not names:
                raise RewardError(
                    f"{self.name}: cannot read heads from {type(out).__name__}; return a dict or pass heads=."
                )
            out = {h: getattr(out, h) for h in names}
        heads = {}
        for h, v in out.items():
            v = torch.as_tensor(v, device=videos.device).float().reshape(-1)
            if v.shape[0] != b:
                raise RewardError(f"{self.name}: head {h!r} has {v.shape[0]} scores for {b} videos.")
            heads[h] = v
        return heads

    def score_parts(self, videos: torch.Tensor, prompts: list[str] | None, **conditioning) -> RewardResult:
        """The summed heads of one chunk, weighted and normalised, with the raw heads."""
        raw = self._heads(videos, prompts, **conditioning)
        selected = self.heads or list(raw)
        missing = [h for h in selected if h not in raw]
        if missing:
            raise RewardError(f"{self.name}: the model returned heads {list(raw)}, not {missing}.")
        weights = {h: float(self.weights.get(h, 1.0)) for h in selected}
        comps = {}
        for h in selected:
            mean, std = self.normalization.get(h, (0.0, 1.0))
            comps[h] = weights[h] * (raw[h] - mean) / std
        total = torch.stack(list(comps.values())).sum(0)
        return RewardResult(total, comps, {h: raw[h] for h in selected}, weights)

    def score(self, videos: torch.Tensor, prompts: list[str] | None, **conditioning):
        return self.score_parts(videos, prompts, **conditioning).total
