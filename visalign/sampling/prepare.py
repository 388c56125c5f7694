"""Everything before a denoising loop's first step, in one place: validate the inputs, encode the prompts,
expand groups and draw the initial noise (:func:`prepare_sampling`).

:func:`visalign.sample` and the steering loops (:mod:`visalign.steering`) forward their sampling
keywords here; :func:`with_sampling_keywords` shows those keywords in their signatures.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from visalign.errors import InvalidInputError
from visalign.pipelines.base import Conditioning, Geometry, Policy, Schedule
from visalign.sampling.options import DEFAULTS
from visalign.sampling.trajectory import SamplerSpec

__all__ = ["SamplingSetup", "prepare_sampling", "with_sampling_keywords"]


def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("prompts is empty; pass at least one prompt string.")
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError("prompts must be strings (or a list of strings).")
    return prompts


def _check_images(images, num_prompts: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(f"Conditioning images must be a float tensor (B, 3, H, W) in [0, 1]; got {shape}.")
    if images.shape[0] != num_prompts:
        raise InvalidInputError(
            f"Got {images.shape[0]} conditioning images for {num_prompts} prompts; pass one image per prompt."
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        hint = " They look like [-1, 1] images: pass (images + 1) / 2." if lo >= -1 and hi <= 1 else ""
        raise InvalidInputError(f"Conditioning images must be in [0, 1]; got values in [{lo:.3g}, {hi:.3g}].{hint}")
    return images.float()


def _expand_generator(generator, batch: int, group_size: int, same_noise: bool):
    """The generator(s) for the initial noise: a list of B is reduced to one per group when shared."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise InvalidInputError(
                f"Got {len(generator)} generators for a batch of {batch} samples (prompts × group_size); "
                f"pass one generator per sample, or a single generator."
            )
        return list(generator[::group_size]) if same_noise else list(generator)
    return generator


@dataclass
class SamplingSetup:
    """Everything a denoising loop needs before its first step, prepared by :func:`prepare_sampling`.

    :func:`sample` and the steering loops (:mod:`visalign.steering`) start from it, so prompt
    validation, encoding, group expansion and the initial noise have one home.

    Attributes:
        prompts: the B = P·G prompts (group-expanded: prompt p at rows p·G … p·G+G−1).
        spec: the resolved :class:`SamplerSpec`.
        geometry: the output size.
        conditioning: the encoded prompts (and I2V images), B rows.
        latents: the initial noise (B, ...) in the denoiser's layout, float32.
        schedule: the σ or ᾱ table, on the policy's device.
        images: the I2V first frames, (B, 3, H, W), or None.
        group_size: G.
    """

    prompts: list[str]
    spec: SamplerSpec
    geometry: Geometry
    conditioning: Conditioning
    latents: torch.Tensor
    schedule: Schedule
    images: torch.Tensor | None
    group_size: int

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def prepare_sampling(
    policy: Policy,
    prompts: str | Sequence[str],
    num_steps: int = DEFAULTS.num_steps,
    guidance_scale: float | None = DEFAULTS.guidance_scale,
    sampler: str = DEFAULTS.sampler,
    noise: str = DEFAULTS.noise,
    eta: float | None = DEFAULTS.eta,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    group_size: int = 1,
    same_noise_in_group: bool = DEFAULTS.same_noise_in_group,
    sde_window: tuple[int, int] | None = None,
    reduce: str = DEFAULTS.log_prob_reduce,
    **encode_kwargs: Any,
) -> SamplingSetup:
    """Validates the inputs, encodes the prompts and draws the initial noise.

    This is the one place that turns the sampling keywords into a ready-to-run loop; :func:`sample`
    and the steering functions (:mod:`visalign.steering`) pass their sampling keywords here.
    Defaults come from :class:`~visalign.sampling.options.SamplingOptions`.

    Args:
        policy: from :func:`visalign.wrap` or :func:`visalign.load`.
        prompts: P prompts. With ``group_size=G`` the batch is B = P·G, prompt p at rows p·G…p·G+G−1.
        num_steps: the number of denoising steps S (≥ 1).
        guidance_scale: CFG scale (FLUX: the embedded guidance); None uses the family's default.
        sampler: ``"ode"``, ``"sde"``, ``"cps"`` or ``"ddim"`` (``"sde"`` means DDIM η>0 on DDPM families).
        noise: the flow SDE's noise schedule, ``"flow"`` or ``"dance"``.
        eta: noise level; None uses the sampler's default (``SamplingOptions.eta``). 0 gives the ODE.
        generator: one ``torch.Generator``, or a list of B (one per sample, for reproducibility
            independent of batch composition).
        latents: initial noise (B, ...) in the denoiser's layout, instead of drawing it.
        images: I2V first frames, (P, 3, H, W) in [0, 1], one per prompt.
        height, width, num_frames: output size; None uses the family's default.
        negative_prompt: one string or P strings for the unconditional branch.
        group_size: samples per prompt (GRPO's G).
        same_noise_in_group: share the initial noise within each group (DanceGRPO).
        sde_window: ``(start, end)``: stochastic only for steps start ≤ i < end, ODE elsewhere
            (Flow-GRPO-Fast / MixGRPO). Only those steps carry log-probs.
        reduce: log-prob reduction, ``"mean"`` (default) or ``"sum"``.
        **encode_kwargs: passed to the policy's ``encode_prompt`` (e.g. FLUX's ``true_cfg_scale``).

    Returns:
        A :class:`SamplingSetup`. The generator is consumed exactly as :func:`sample` consumes it
        before its first step.
    """
    prompts = _as_prompt_list(prompts)
    if int(num_steps) < 1:
        raise InvalidInputError(f"num_steps must be >= 1, got {num_steps}.")
    if int(group_size) < 1:
        raise InvalidInputError(f"group_size must be >= 1, got {group_size}.")
    num_steps, group_size = int(num_steps), int(group_size)
    spec = SamplerSpec.resolve(policy, sampler, noise, eta, reduce, sde_window, num_steps)
    geometry = policy.geometry(height, width, num_frames)

    if policy.needs_image:
        if images is None:
            raise InvalidInputError(
                f"{policy.family} needs one {policy.image_role} per prompt: pass images=(P, 3, H, W) in [0, 1]."
            )
        images = _check_images(images, len(prompts))
    elif images is not None:
        raise InvalidInputError(f"{policy.family} takes no conditioning images; leave images=None.")
    if negative_prompt is not None:
        negative_prompt = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        if len(negative_prompt) != len(prompts):
            raise InvalidInputError(f"Got {len(negative_prompt)} negative prompts for {len(prompts)} prompts.")

    conditioning = policy.encode_prompt(
        prompts, negative_prompt, guidance_scale, images=images, geometry=geometry, **encode_kwargs
    )
    batch = len(prompts) * group_size
    if group_size > 1:
        conditioning = conditioning.repeat_interleave(group_size)
        prompts = [p for p in prompts for _ in range(group_size)]
        images = None if images is None else images.repeat_interleave(group_size, dim=0)

    if latents is None:
        init_gen = _expand_generator(generator, batch, group_size, same_noise_in_group)
        if same_noise_in_group:
            latents = policy.prepare_latents(batch // group_size, geometry, init_gen).repeat_interleave(group_size, 0)
        else:
            latents = policy.prepare_latents(batch, geometry, init_gen)
    else:
        expected = policy.latent_shape(batch, geometry)
        if tuple(latents.shape) != expected:
            raise InvalidInputError(
                f"latents must have shape {expected} for {batch} samples at {geometry}; got {tuple(latents.shape)}."
            )
        latents = latents.to(policy.device, torch.float32)
    _expand_generator(generator, batch, group_size, False)  # validates a list's length

    schedule = policy.schedule(num_steps, geometry).to(policy.device)
    return SamplingSetup(prompts, spec, geometry, conditioning, latents, schedule, images, group_size)


def with_sampling_keywords(fn):
    """Shows :func:`prepare_sampling`'s keywords in ``fn``'s signature (``help()``, IDEs).

    Functions that forward ``**sampling`` to :func:`prepare_sampling` (:func:`sample`, the
    steering functions) declare the keywords once, there.
    """
    own = inspect.signature(fn)
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in params} | {"policy", "prompts"}
    forwarded = [
        p.replace(kind=p.KEYWORD_ONLY)
        for p in inspect.signature(prepare_sampling).parameters.values()
        if p.name not in taken and p.kind is not p.VAR_KEYWORD
    ]
    rest = [p for p in own.parameters.values() if p.kind is p.VAR_KEYWORD]
    fn.__signature__ = own.replace(parameters=params + forwarded + rest)
    return fn
