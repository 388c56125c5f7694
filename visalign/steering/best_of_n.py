"""Best-of-N: draw N independent samples per prompt and keep the one the reward likes best.

The baseline that every steering method must beat at matched compute (docs/math.md §6): N samples
cost N·S denoiser evaluations, the same as FK steering with N particles over S steps.

Example::

    out = va.best_of_n(policy, ["a red circle"], reward, n=8, num_steps=20, max_batch_size=4)
    out.images, out.rewards         # the best sample per prompt and its reward
    out.all_rewards                 # (P, n)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from visalign.errors import ConfigError
from visalign.pipelines.base import Policy
from visalign.sampling.sampler import denoise_step
from visalign.steering.common import (
    check_max_batch_size,
    decode_and_score,
    expand_reward_kwargs,
    prepare_steering,
    resolve_reward,
    select_rows,
    with_steering_keywords,
)

__all__ = ["BestOfNOutput", "best_of_n"]


@dataclass
class BestOfNOutput:
    """What :func:`best_of_n` returns. P prompts, n samples each.

    Attributes:
        images: (P, ...) the highest-reward sample per prompt.
        rewards: (P,) its reward.
        best_index: (P,) its index among the prompt's n samples.
        latents: (P, ...) its final latents.
        all_images: (P, n, ...) every sample (None with ``return_all=False``).
        all_rewards: (P, n) every sample's reward.
        prompts: the P prompts.
        num_model_evals: denoiser evaluations, in sample-steps (P·n·S).
    """

    images: torch.Tensor
    rewards: torch.Tensor
    best_index: torch.Tensor
    latents: torch.Tensor
    all_images: torch.Tensor | None
    all_rewards: torch.Tensor
    prompts: list[str]
    num_model_evals: int


@torch.no_grad()
@with_steering_keywords
def best_of_n(
    policy: Policy,
    prompts: str | Sequence[str],
    reward: Any,
    n: int = 8,
    reward_kwargs: Mapping[str, Any] | None = None,
    max_batch_size: int | None = None,
    return_all: bool = True,
    **sampling: Any,
) -> BestOfNOutput:
    """Samples ``n`` candidates per prompt, scores them and keeps the best.

    Args:
        policy: from :func:`visalign.wrap` or :func:`visalign.load`.
        prompts: P prompts.
        reward: a reward or callable ``(images, prompts) -> Tensor[B]``, or a dict / list of
            ``(reward, weight)`` for a weighted sum.
        n: candidates per prompt (default 8).
        reward_kwargs: per-prompt reward conditioning, repeated per candidate.
        max_batch_size: the most candidates sampled, decoded and scored at
            once; None samples all P·n together.
        return_all: keep every candidate's pixels in ``all_images`` (default True).
        **sampling: the sampling keywords of :func:`visalign.sampling.prepare_sampling`
            (``num_steps``, ``guidance_scale``, ``sampler``, ``noise``, ``eta``, ``generator``,
            ``images``, ``height``, ``width``, ``num_frames``, ``negative_prompt``, …, and the
            policy's encode keywords); defaults are
            :class:`~visalign.sampling.SamplingOptions`'. Any sampler works (``"ode"`` included:
            candidates differ by their initial noise). ``generator`` is one generator, or one per
            candidate row p·n+k; all initial noise is drawn before the first chunk, so it does not
            depend on ``max_batch_size``. With one shared generator the per-step SDE noise does
            (use per-row generators to make it not).

    Returns:
        :class:`BestOfNOutput`.
    """
    if int(n) < 1:
        raise ConfigError(f"n must be >= 1; got {n}.")
    n = int(n)
    max_batch_size = check_max_batch_size(max_batch_size)
    reward = resolve_reward(reward)
    # Validate, encode once and draw every candidate's initial noise, whatever the chunking; then run
    # the same denoising steps as visalign.sample, one chunk of candidates at a time.
    setup = prepare_steering(policy, prompts, n, "n", sampling)
    generator = sampling.get("generator")
    batch, num_prompts = setup.batch_size, setup.batch_size // n
    row_kwargs = expand_reward_kwargs(reward_kwargs, num_prompts, n)
    chunk = batch if max_batch_size is None else max_batch_size
    per_row = isinstance(generator, (list, tuple))

    scores, pixels, finals = [], [], []
    for a in range(0, batch, chunk):
        b = min(a + chunk, batch)
        conditioning, x = setup.conditioning.select(slice(a, b)), setup.latents[a:b]
        chunk_generator = list(generator[a:b]) if per_row else generator
        for i in range(setup.schedule.num_steps):
            x = denoise_step(
                policy, setup.spec, setup.schedule, i, x, conditioning, generator=chunk_generator
            ).next_latents
        result, images_ab = decode_and_score(
            policy,
            x,
            setup.geometry,
            reward,
            setup.prompts[a:b],
            select_rows(row_kwargs, slice(a, b), batch),
            None,
            keep_images=return_all,
        )
        scores.append(result.total)
        finals.append(x)
        pixels.append(images_ab)
    all_rewards = torch.cat(scores).view(num_prompts, n)
    best = all_rewards.argmax(dim=1)
    pick = (torch.arange(num_prompts, device=best.device) * n + best).tolist()
    latents = torch.cat(finals)
    all_images = torch.cat(pixels) if return_all else None
    return BestOfNOutput(
        images=all_images[pick] if return_all else policy.decode(latents[pick], setup.geometry),
        rewards=all_rewards.gather(1, best.unsqueeze(1)).squeeze(1),
        best_index=best,
        latents=latents[pick],
        all_images=None if all_images is None else all_images.view(num_prompts, n, *all_images.shape[1:]),
        all_rewards=all_rewards,
        prompts=[setup.prompts[p * n] for p in range(num_prompts)],
        num_model_evals=batch * setup.schedule.num_steps,
    )
