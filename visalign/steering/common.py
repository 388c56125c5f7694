"""What the steering methods share: rewards with weights, and particle batches run in chunks.

- :func:`resolve_reward` turns one reward, or several with user weights, into one reward;
- :func:`predict_chunked` runs the denoiser on at most ``max_batch_size`` particles at a time;
- :func:`decode_and_score` decodes latents and scores them in chunks of the same size, returning
  the reward's :class:`~visalign.rewards.RewardResult` (total and named parts);
- :func:`with_steering_keywords` and :func:`prepare_steering` take the sampling keywords of
  :func:`~visalign.sampling.prepare_sampling` once for every steering function;
- :func:`steering_generator` gives the CPU generator that draws resampling uniforms, kept apart
  from the sampler's noise so that steering never shifts the noise stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.pipelines.base import Conditioning, Geometry, Policy
from visalign.rewards.base import call_reward, reward_name
from visalign.rewards.result import RewardResult
from visalign.sampling.prepare import SamplingSetup, prepare_sampling, with_sampling_keywords

__all__ = [
    "resolve_reward",
    "predict_chunked",
    "decode_and_score",
    "steering_generator",
    "check_max_batch_size",
    "expand_reward_kwargs",
    "select_rows",
    "with_steering_keywords",
    "prepare_steering",
]


def resolve_reward(reward: Any):
    """One reward from ``reward``: a reward or callable, a dict, or a list of ``(reward, weight)``.

    A dict ``{name: reward}`` / ``{name: (reward, weight)}`` or a list of ``(reward, weight)``
    pairs becomes a :class:`~visalign.rewards.Combined` weighted sum (no normalisation), whose
    :class:`~visalign.rewards.RewardResult` (from :func:`~visalign.rewards.call_reward`) carries
    every weighted part in ``components``.
    """
    from visalign.rewards.combine import Combined

    if isinstance(reward, Mapping):
        return Combined(dict(reward))
    if isinstance(reward, (list, tuple)):
        if not reward:
            raise ConfigError("Got an empty list of rewards; pass a reward, or (reward, weight) pairs.")
        members = {}
        for i, item in enumerate(reward):
            r, w = item if isinstance(item, tuple) and len(item) == 2 else (item, 1.0)
            name = reward_name(r).replace(".", "_")
            members[name if name not in members else f"{name}_{i}"] = (r, float(w))
        return Combined(members)
    if not callable(reward):
        raise InvalidInputError(
            f"reward must be a visalign Reward, a callable (images, prompts) -> Tensor[B], a dict "
            f"{{name: (reward, weight)}} or a list of (reward, weight); got {type(reward).__name__}."
        )
    return reward


def with_steering_keywords(fn):
    """:func:`~visalign.sampling.with_sampling_keywords` for a steering function.

    Shows :func:`~visalign.sampling.prepare_sampling`'s keywords after ``fn``'s own in its
    signature, less ``group_size``: a steering function sets it from its own count (``n``,
    ``num_particles``, ``num_samples``).
    """
    fn = with_sampling_keywords(fn)
    signature = fn.__signature__
    fn.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "group_size"]
    )
    return fn


def prepare_steering(
    policy: Policy, prompts, group_size: int, count_name: str, sampling: Mapping[str, Any]
) -> SamplingSetup:
    """:func:`~visalign.sampling.prepare_sampling` with ``group_size`` samples per prompt.

    Args:
        count_name: the steering function's keyword that sets ``group_size``, for the message
            when ``sampling`` holds a ``group_size`` of its own.
        sampling: the caller's sampling keywords (defaults: :class:`~visalign.sampling.SamplingOptions`').
    """
    if "group_size" in sampling:
        raise ConfigError(f"Pass the number of samples per prompt as {count_name}=, not group_size=.")
    return prepare_sampling(policy, prompts, group_size=group_size, **sampling)


def check_max_batch_size(max_batch_size: int | None) -> int | None:
    if max_batch_size is not None and int(max_batch_size) < 1:
        raise ConfigError(f"max_batch_size must be >= 1 or None; got {max_batch_size}.")
    return None if max_batch_size is None else int(max_batch_size)


def _chunks(batch: int, max_batch_size: int | None):
    step = batch if max_batch_size is None else max_batch_size
    for start in range(0, batch, step):
        yield start, min(start + step, batch)


def predict_chunked(
    policy: Policy,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    conditioning: Conditioning,
    max_batch_size: int | None = None,
) -> torch.Tensor:
    """``policy.predict`` on at most ``max_batch_size`` rows at a time (CFG doubles a forward's rows)."""
    if max_batch_size is None or latents.shape[0] <= max_batch_size:
        return policy.predict(latents, timestep, conditioning)
    outs = [
        policy.predict(latents[a:b], timestep, conditioning.select(slice(a, b)))
        for a, b in _chunks(latents.shape[0], max_batch_size)
    ]
    return torch.cat(outs)


def select_rows(kwargs: Mapping[str, Any], index, batch: int) -> dict[str, Any]:
    """Per-sample reward conditioning (tensors or lists with ``batch`` rows) at ``index``."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            out[key] = value[index]
        elif isinstance(value, (list, tuple)) and len(value) == batch:
            rows = range(batch)[index] if isinstance(index, slice) else list(torch.as_tensor(index).tolist())
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


def expand_reward_kwargs(reward_kwargs: Mapping[str, Any] | None, num_prompts: int, group: int) -> dict[str, Any]:
    """Per-prompt reward conditioning (P rows) repeated for each prompt's ``group`` samples."""
    out = {}
    for key, value in (reward_kwargs or {}).items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == num_prompts:
            out[key] = value.repeat_interleave(group, dim=0)
        elif isinstance(value, (list, tuple)) and len(value) == num_prompts:
            out[key] = [v for v in value for _ in range(group)]
        else:
            out[key] = value
    return out


def decode_and_score(
    policy: Policy,
    latents: torch.Tensor,
    geometry: Geometry,
    reward: Any,
    prompts: Sequence[str],
    reward_kwargs: Mapping[str, Any] | None = None,
    max_batch_size: int | None = None,
    keep_images: bool = False,
) -> tuple[RewardResult, torch.Tensor | None]:
    """Decodes latents to pixels and scores them, ``max_batch_size`` rows at a time.

    Returns:
        ``(result, images)``: the :class:`~visalign.rewards.RewardResult` of the B rows (``total``
        float32 (B,) on the images' device, with the reward's named parts), and the decoded pixels
        (B, ...) when ``keep_images`` (else None).
    """
    batch = latents.shape[0]
    reward_kwargs = reward_kwargs or {}
    results, images = [], []
    for a, b in _chunks(batch, max_batch_size):
        pixels = policy.decode(latents[a:b], geometry)
        results.append(
            call_reward(reward, pixels, list(prompts[a:b]), **select_rows(reward_kwargs, slice(a, b), batch))
        )
        if keep_images:
            images.append(pixels)
    return RewardResult.cat(results), (torch.cat(images) if keep_images else None)


def steering_generator(generator, resample_seed: int | None = None) -> torch.Generator:
    """The CPU generator for resampling draws.

    It never consumes the sampler's ``generator``: it is seeded with ``resample_seed`` when given,
    else from the sampler generator's initial seed (the first one of a list), else from
    ``torch.initial_seed()``. So steering with one particle draws exactly the noise of
    :func:`visalign.sample`, and a run is reproducible from its seeds.
    """
    if resample_seed is None:
        first = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
        base = first.initial_seed() if isinstance(first, torch.Generator) else torch.initial_seed()
        resample_seed = (int(base) * 6364136223846793005 + 1442695040888963407) % (2**63)
    return torch.Generator().manual_seed(int(resample_seed))
