"""Reward-gradient guidance: push each step's mean up the gradient of a differentiable reward.

At each guided step, with x the current state and x̂0(x) the model's clean prediction,

    mean ← mean + scale · ∇_x Σ_k w_k · r_k(decode(x̂0(x)))

and the next state is drawn around the shifted mean (for the ODE sampler it *is* the shifted
mean). This is DPS-style guidance (Chung et al., "Diffusion Posterior Sampling for General Noisy
Inverse Problems", arXiv 2209.14687) with a reward in place of the measurement likelihood, and
the multi-reward form is the Flow-NRG idea of VideoAlign (Liu et al., "Improving Video
Generation with Human Feedback", arXiv 2501.13918), which guides noisy latents with user-weighted
reward objectives. Flow-NRG trains a reward on noisy latents; here the reward scores decoded
pixels of x̂0, so any differentiable visalign reward works without training.

``through_model=True`` (DPS) back-propagates through the denoiser: ∂x̂0/∂x includes the model's
Jacobian, which costs a backward pass through the denoiser and the VAE decoder per guided step.
``through_model=False`` treats the model output as a constant (∂x̂0/∂x is σ-scaled identity), so
only the decoder and the reward are differentiated: much cheaper, and usually enough late in
sampling.

``scale`` is a step size per guided step in latent units (DPS's ζ). Reward gradients vary a lot in
size between rewards and resolutions; ``normalize_grad=True`` rescales each sample's gradient to
unit RMS, so ``scale`` becomes the RMS shift per step.

Example::

    out = va.reward_guidance(policy, ["a red circle"], {"clip": (clip, 1.0), "aes": (aesthetic, 0.2)},
                             scale=0.5, guidance_steps=(0, 15), num_steps=20)
    out.images, out.rewards, out.components["clip"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from visalign.errors import ConfigError, NotDifferentiableError
from visalign.pipelines.base import Policy
from visalign.rewards.base import call_reward, is_differentiable, reward_name
from visalign.sampling.sampler import denoise_step, transition
from visalign.steering.common import (
    check_max_batch_size,
    decode_and_score,
    expand_reward_kwargs,
    predict_chunked,
    prepare_steering,
    resolve_reward,
    select_rows,
    with_steering_keywords,
)

__all__ = ["GuidanceOutput", "reward_guidance", "reward_gradient"]


@dataclass
class GuidanceOutput:
    """What :func:`reward_guidance` returns. B = P·num_samples rows.

    Attributes:
        images: (B, ...) the guided samples.
        rewards: (B,) the (weighted) reward of each output.
        components: name → (B,) each weighted part of the reward's
            :class:`~visalign.rewards.RewardResult` (several rewards); empty for a single reward.
        latents: (B, ...) the final latents.
        prompts: the B prompts.
        guided_steps: the steps where the gradient was added.
        grad_norms: (B, S) the RMS of the reward gradient at each step (0 where unguided).
    """

    images: torch.Tensor
    rewards: torch.Tensor
    latents: torch.Tensor
    prompts: list[str]
    guided_steps: list[int]
    grad_norms: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_differentiable(reward) -> None:
    """Refuses a reward whose ``differentiable`` is False, naming it (or a Combined's culprit members)."""
    if is_differentiable(reward):
        return
    members = getattr(reward, "non_differentiable", None)  # Combined: the members at fault
    bad = (members() if callable(members) else []) or [reward_name(reward)]
    raise NotDifferentiableError(
        f"reward_guidance follows the reward's gradient, but {bad} {'is' if len(bad) == 1 else 'are'} not "
        f"differentiable (differentiable=False), so no gradient reaches the latents. Use differentiable rewards "
        f"(CLIPScore, PickScore, Aesthetic, HPSv2, a YesTokenReward on torch pixels), or steer with va.fk_steer "
        f"/ va.best_of_n, which need only reward values."
    )


def differentiable_scores(
    reward: Any, pixels: torch.Tensor, prompts: Sequence[str], reward_kwargs: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The reward's total on ``pixels`` (which require grad), refusing scores that carry no gradient."""
    rewards = call_reward(reward, pixels, list(prompts), **(reward_kwargs or {})).total
    if rewards.grad_fn is None:
        raise NotDifferentiableError(
            f"reward_guidance follows the reward's gradient, but the scores of '{reward_name(reward)}' carry no "
            f"gradient: they come back detached from the pixels (computed under torch.no_grad(), through "
            f"numpy/PIL, or with .detach()). Compute the reward with torch operations on the pixels, or steer "
            f"with va.fk_steer / va.best_of_n, which need only reward values."
        )
    return rewards


def reward_gradient(
    policy: Policy,
    spec,
    schedule,
    step: int,
    latents: torch.Tensor,
    conditioning,
    reward: Any,
    prompts: Sequence[str],
    geometry,
    reward_kwargs: Mapping[str, Any] | None = None,
    through_model: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """∇_x r(decode(x̂0(x))) at ``step`` for a batch, and the model output there.

    Args:
        through_model: differentiate through the denoiser (DPS) or treat its output as constant.

    Returns:
        ``(grad, model_output, rewards)``: the gradient (latents' shape, float32), the detached
        model output (reused for the step itself), and the rewards of x̂0 (B,).
    """
    x = latents.detach().float().requires_grad_(True)
    t = schedule.timesteps[step].to(x.device)
    with torch.enable_grad():
        if through_model:
            model_output = policy.predict(x, t, conditioning)
        else:
            with torch.no_grad():
                model_output = policy.predict(x.detach(), t, conditioning)
        _, _, x0 = transition(policy, spec, schedule, step, x, model_output)
        pixels = policy.decode(x0, geometry)
        rewards = differentiable_scores(reward, pixels, prompts, reward_kwargs)
        (grad,) = torch.autograd.grad(rewards.sum(), x)
    return grad.detach(), model_output.detach(), rewards.detach()


def _guided_steps(num_steps: int, guidance_steps) -> list[int]:
    if guidance_steps is None:
        return list(range(num_steps))
    start, end = int(guidance_steps[0]), int(guidance_steps[1])
    if not 0 <= start < end <= num_steps:
        raise ConfigError(
            f"guidance_steps={tuple(guidance_steps)} must satisfy 0 <= start < end <= num_steps={num_steps}."
        )
    return list(range(start, end))


@with_steering_keywords
def reward_guidance(
    policy: Policy,
    prompts: str | Sequence[str],
    reward: Any,
    scale: float = 1.0,
    guidance_steps: tuple[int, int] | None = None,
    num_samples: int = 1,
    through_model: bool = True,
    normalize_grad: bool = False,
    reward_kwargs: Mapping[str, Any] | None = None,
    max_batch_size: int | None = None,
    progress: bool = False,
    **sampling: Any,
) -> GuidanceOutput:
    """Samples with reward-gradient guidance added to each guided step's mean.

    Args:
        policy: from :func:`visalign.wrap` or :func:`visalign.load`.
        prompts: P prompts.
        reward: one differentiable reward, or several with weights: a dict
            ``{name: (reward, weight)}`` or a list of ``(reward, weight)``; the guidance follows
            ``Σ w_k r_k`` (Flow-NRG's user-weighted objectives).
        scale: the step size s of ``mean += s·∇``; 0 is plain sampling (default 1.0).
        guidance_steps: guide steps ``start ≤ i < end`` only;
            None guides every step.
        num_samples: samples per prompt (default 1).
        through_model: back-propagate through the denoiser (DPS);
            False treats the model output as constant (cheaper; see the module docstring).
        normalize_grad: rescale each sample's gradient to unit RMS (default False).
        reward_kwargs: per-prompt reward conditioning, repeated per sample.
        max_batch_size: the most samples per forward/backward; None runs all.
        progress: a tqdm bar over the steps.
        **sampling: the sampling keywords of :func:`visalign.sampling.prepare_sampling`
            (``num_steps``, ``guidance_scale``, ``sampler``, ``noise``, ``eta``, ``generator``,
            ``images``, ``height``, ``width``, ``num_frames``, ``negative_prompt``, …, and the
            policy's encode keywords); defaults are :class:`~visalign.sampling.SamplingOptions`'.
            Any sampler works, ``"ode"`` included.

    Returns:
        :class:`GuidanceOutput` with ``images``, ``rewards`` and, for a reward with named parts
        (several rewards), their weighted ``components``.

    Raises:
        NotDifferentiableError: the reward is not differentiable (``differentiable=False``, or its
            scores carry no gradient back to the pixels).
    """
    reward = resolve_reward(reward)
    _check_differentiable(reward)
    max_batch_size = check_max_batch_size(max_batch_size)
    scale = float(scale)
    setup = prepare_steering(policy, prompts, num_samples, "num_samples", sampling)
    generator = sampling.get("generator")
    spec, schedule, geometry, conditioning = setup.spec, setup.schedule, setup.geometry, setup.conditioning
    batch, rows_prompts = setup.batch_size, setup.prompts
    row_kwargs = expand_reward_kwargs(reward_kwargs, batch // setup.group_size, setup.group_size)
    guided = _guided_steps(schedule.num_steps, guidance_steps) if scale != 0 else []
    chunk = batch if max_batch_size is None else max_batch_size
    grad_norms = torch.zeros(batch, schedule.num_steps)

    x = setup.latents
    iterator = range(schedule.num_steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="reward guidance", leave=False)
    for i in iterator:
        if i in guided:
            grads, outputs = [], []
            for a in range(0, batch, chunk):
                b = min(a + chunk, batch)
                g, mo, _ = reward_gradient(
                    policy,
                    spec,
                    schedule,
                    i,
                    x[a:b],
                    conditioning.select(slice(a, b)),
                    reward,
                    rows_prompts[a:b],
                    geometry,
                    select_rows(row_kwargs, slice(a, b), batch),
                    through_model,
                )
                grads.append(g)
                outputs.append(mo)
            grad, model_output = torch.cat(grads), torch.cat(outputs)
            rms = grad.flatten(1).pow(2).mean(1).sqrt()
            grad_norms[:, i] = rms.cpu()
            if normalize_grad:
                grad = grad / (rms + 1e-12).view(-1, *([1] * (grad.ndim - 1)))
            offset = scale * grad
        else:
            with torch.no_grad():
                model_output = predict_chunked(
                    policy, x, schedule.timesteps[i].to(x.device), conditioning, max_batch_size
                )
            offset = None
        with torch.no_grad():
            x = denoise_step(
                policy,
                spec,
                schedule,
                i,
                x,
                conditioning,
                generator=generator,
                model_output=model_output,
                mean_offset=offset,
            ).next_latents

    with torch.no_grad():
        result, out_images = decode_and_score(
            policy, x, geometry, reward, rows_prompts, row_kwargs, max_batch_size, keep_images=True
        )
    return GuidanceOutput(
        images=out_images,
        rewards=result.total,
        latents=x,
        prompts=rows_prompts,
        guided_steps=guided,
        grad_norms=grad_norms,
        components=result.detach().components,
    )
