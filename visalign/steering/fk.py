"""Feynman-Kac (FK) steering: particles, rewards on x̂0, resampling, and the final correction.

FK steering (Singhal et al., "A General Framework for Inference-time Scaling and Steering of
Diffusion Models", arXiv 2501.06848) runs N particles per prompt through a *stochastic* sampler.
At chosen steps it scores each particle's decoded clean prediction x̂0 with a reward, multiplies
the particle's weight by a potential G (see :mod:`visalign.steering.resampling`), and resamples
particles in proportion to their weights. At the final step it divides by the product of the
earlier potentials along each particle's ancestry, so the weighted particles target
``p(x0)·exp(λ·r(x0))`` exactly in the limit of many particles.

Example::

    import torch
    import visalign as va
    from visalign.testing import brightness, tiny_pipeline

    policy = va.wrap(tiny_pipeline("sd3"))
    out = va.fk_steer(policy, ["a red circle"], brightness, num_particles=4, lam=10.0,
                      resample_every=5, num_steps=20, generator=torch.Generator().manual_seed(0))
    out.images        # (1, 3, H, W): the best final particle of each prompt
    out.rewards       # (1,)
    out.ess           # (1, 20): effective sample size after each step's weighting

What is different from the reference code (docs/math.md §6):

- weights stay in log space (log-sum-exp); the reference clamps ``exp()`` into [0, 1e10];
- when adaptive resampling skips a step, the weights are carried forward (the reference drops
  them, which biases the target);
- the final-step correction is applied for every potential;
- resampling uses its own generator, so the sampler's noise stream is the one :func:`visalign.sample`
  draws (one particle reproduces plain sampling exactly).

Choosing a potential: all four reach the same target; they differ in how much the final
correction has to undo. ``add`` multiplies ``exp(λ·Σ r)`` over the reward steps, so with many
reward steps its final weights degenerate (low ESS) much faster than ``max``, ``diff`` or ``rt``
(on the closed-form Gaussian problem of ``tests/steering``, 8000 particles, reward steps 2, 5, 8,
the final ESS was 150–950 for ``add`` against 4400–4900 for ``max`` and ~7800 for ``diff``).
visalign defaults to ``max``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from visalign.errors import ConfigError, SamplerError
from visalign.pipelines.base import Policy
from visalign.sampling.options import DEFAULTS
from visalign.sampling.sampler import denoise_step
from visalign.steering import resampling as R
from visalign.steering.common import (
    check_max_batch_size,
    decode_and_score,
    expand_reward_kwargs,
    predict_chunked,
    prepare_steering,
    resolve_reward,
    select_rows,
    steering_generator,
    with_steering_keywords,
)

__all__ = ["FKOutput", "fk_steer", "reward_steps"]


@dataclass
class FKOutput:
    """What :func:`fk_steer` returns. P prompts, N particles, S steps.

    Attributes:
        images: (P, ...) the final particle with the highest reward, per prompt.
        rewards: (P,) its reward.
        best_index: (P,) its index among the prompt's final particles.
        particles: (P, N, ...) every final particle, decoded (None with ``return_particles=False``).
        particle_latents: (P, N, ...) their final latents.
        particle_rewards: (P, N) their rewards.
        log_weights: (P, N) their normalised log-weights: the final importance weights of the
            target ``p(x0)·exp(λ·r(x0))``, or −log N each when the final step resampled.
        ess: (P, S) effective sample size after each step's weighting, before any resampling.
        resampled: (P, S) bool, where resampling happened.
        ancestry: (P, S, N) long: after step i, slot k holds the particle that was at slot
            ``ancestry[p, i, k]`` before step i's resampling (the identity where none happened).
        step_rewards: (P, S, N) the reward of each particle's x̂0 at the reward steps (before that
            step's resampling) and of its decoded output at the last step; NaN elsewhere.
        reward_steps: the steps whose x̂0 was scored (the last step scores the output instead).
        prompts: the P prompts.
        num_model_evals: denoiser evaluations, in particle-steps (P·N·S; CFG counts once).
        num_reward_evals: reward evaluations, in particles scored.
    """

    images: torch.Tensor
    rewards: torch.Tensor
    best_index: torch.Tensor
    particles: torch.Tensor | None
    particle_latents: torch.Tensor
    particle_rewards: torch.Tensor
    log_weights: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    ancestry: torch.Tensor
    step_rewards: torch.Tensor
    reward_steps: list[int]
    prompts: list[str]
    num_model_evals: int
    num_reward_evals: int

    def lineage(self, prompt: int, particle: int) -> list[int]:
        """The slot the final particle ``particle`` of prompt ``prompt`` occupied after each step.

        Entry i is its slot after step i (the last entry is ``particle``); read backwards
        through ``ancestry``.
        """
        slots, slot = [], int(particle)
        for i in range(self.ancestry.shape[1] - 1, -1, -1):
            slots.append(slot)
            slot = int(self.ancestry[prompt, i, slot])
        return slots[::-1]


def reward_steps(
    num_steps: int, resample_every: int | None = 5, resample_range: tuple[int, int] | None = None
) -> list[int]:
    """The intermediate steps whose x̂0 is scored and resampled: after every ``resample_every``
    steps of ``[t_start, t_end)`` (default the whole run). The last step is not listed: it always
    scores the output itself (the final correction).

    Steps are 0-based, so "after every 5 of 20 steps" is [4, 9, 14], and the final step 19 makes
    the fourth. Step 0's x̂0 (from pure noise) is only scored with ``resample_every=1``.
    """
    if resample_every is None:
        return []
    every = int(resample_every)
    if every < 1:
        raise ConfigError(f"resample_every must be >= 1 (or None for the final step only); got {resample_every}.")
    start, end = (0, num_steps) if resample_range is None else (int(resample_range[0]), int(resample_range[1]))
    if not 0 <= start < end <= num_steps:
        raise ConfigError(
            f"resample_range={resample_range} must satisfy 0 <= t_start < t_end <= num_steps={num_steps}."
        )
    return [i for i in range(start + every - 1, end, every) if i < num_steps - 1]


def _validate(num_particles, potential, resampler, ess_threshold, lam):
    if int(num_particles) < 1:
        raise ConfigError(f"num_particles must be >= 1; got {num_particles}.")
    if potential not in R.POTENTIALS:
        raise ConfigError(f"Unknown FK potential {potential!r}; choose one of {R.POTENTIALS}.")
    if resampler not in R.RESAMPLERS:
        raise ConfigError(f"Unknown resampler {resampler!r}; choose one of {R.RESAMPLERS}.")
    if not 0.0 < float(ess_threshold) <= 1.0:
        raise ConfigError(f"ess_threshold is a fraction of num_particles in (0, 1]; got {ess_threshold}.")
    if not math.isfinite(float(lam)):
        raise ConfigError(f"lam must be a finite number; got {lam}.")


@torch.no_grad()
@with_steering_keywords
def fk_steer(
    policy: Policy,
    prompts: str | Sequence[str],
    reward: Any,
    num_particles: int = 4,
    potential: str = "max",
    lam: float = 10.0,
    resample_every: int | None = 5,
    resample_range: tuple[int, int] | None = None,
    adaptive: bool = False,
    ess_threshold: float = 0.5,
    resampler: str = "systematic",
    resample_final: bool = True,
    resample_seed: int | None = None,
    reward_kwargs: Mapping[str, Any] | None = None,
    max_batch_size: int | None = None,
    return_particles: bool = True,
    progress: bool = False,
    **sampling: Any,
) -> FKOutput:
    """Samples with Feynman-Kac steering towards ``p(x0)·exp(lam·reward(x0))``.

    Args:
        policy: from :func:`visalign.wrap` or :func:`visalign.load`.
        prompts: P prompts; each gets its own N particles.
        reward: a reward or callable ``(images, prompts) -> Tensor[B]``, or a dict / list of
            ``(reward, weight)`` for a weighted sum. For video families it scores decoded clips
            (B, T, 3, H, W), e.g. a :class:`~visalign.rewards.SegmentalVideoReward`.
        num_particles: N per prompt. With N = 1 the output is exactly
            :func:`visalign.sample`'s for the same generator.
        potential: ``"max"``, ``"add"``, ``"diff"`` or ``"rt"``
            (see :mod:`visalign.steering.resampling`).
        lam: the inverse temperature λ; 0 gives plain sampling
            with uniform weights.
        resample_every: score x̂0 and resample after every k steps (0-based
            steps k−1, 2k−1, …; see :func:`reward_steps`); None scores and resamples only at the
            final step.
        resample_range: ``(t_start, t_end)`` step indices; reward
            steps are ``t_start+k−1, t_start+2k−1, … < t_end``. The final step always counts.
        adaptive: at a reward step, resample a prompt's particles
            only if their ESS < ``ess_threshold·N``; otherwise carry the weights forward.
        ess_threshold: the adaptive threshold, as a fraction of N (default 0.5).
        resampler: ``"systematic"`` (lower variance) or
            ``"multinomial"`` (the reference scheme).
        resample_final: resample after the final correction (subject
            to ``adaptive``), so the returned particles are equally weighted draws; with False they
            keep their importance weights in ``log_weights``.
        resample_seed: seeds the resampling draws; by default derived from
            ``generator``'s initial seed without consuming it.
        reward_kwargs: per-prompt reward conditioning (P rows, or constants),
            repeated for each particle, e.g. ``{"reference_images": first_frames}``.
        max_batch_size: the most particles per denoiser call and per
            decode/reward call; None runs all P·N at once. Results do not depend on it beyond
            floating-point round-off: the noise is drawn for the whole batch.
        return_particles: keep every final particle's pixels (default True).
        progress: a tqdm bar over the steps.
        **sampling: the sampling keywords of :func:`visalign.sampling.prepare_sampling`
            (``num_steps``, ``guidance_scale``, ``sampler``, ``noise``, ``eta``, ``generator``,
            ``images``, ``height``, ``width``, ``num_frames``, ``negative_prompt``, …, and the
            policy's encode keywords); defaults are :class:`~visalign.sampling.SamplingOptions`'.
            The sampler must be stochastic, ``"sde"``, ``"cps"`` or ``"ddim"`` (``"sde"`` means
            DDIM η>0 on DDPM families): ``"ode"`` is refused, as resampled copies of a
            deterministic trajectory stay identical. ``generator`` is the sampler's noise (one
            generator, or one per particle row p·N+k; per-row generators stay with their row when
            particles move). ``images`` are the I2V first frames, one per prompt.

    Returns:
        :class:`FKOutput`: ``images`` and ``rewards`` of the best particle per prompt, and every
        particle with its reward, log-weight, ESS per step and ancestry.

    Raises:
        SamplerError: the sampler is deterministic (``"ode"``, or ``eta=0``).
        ConfigError: an unknown potential or resampler, or a bad schedule.
    """
    _validate(num_particles, potential, resampler, ess_threshold, lam)
    if sampling.get("sampler", DEFAULTS.sampler) == "ode":
        raise SamplerError(
            "FK steering needs a stochastic sampler: with sampler='ode', resampled copies of a particle "
            "follow the same deterministic path and never diverge. Use sampler='sde' (flow models; "
            "'ddim' on SD/SDXL) or 'cps'."
        )
    n = int(num_particles)
    lam = float(lam)
    max_batch_size = check_max_batch_size(max_batch_size)
    reward = resolve_reward(reward)
    setup = prepare_steering(policy, prompts, n, "num_particles", sampling)
    generator = sampling.get("generator")
    if setup.spec.eta <= 0:
        raise SamplerError(
            f"FK steering needs noise: eta={setup.spec.eta} makes the {setup.spec.sampler} sampler deterministic, "
            "so resampled copies never diverge. Use eta > 0."
        )
    spec, schedule, geometry = setup.spec, setup.schedule, setup.geometry
    num_steps = schedule.num_steps
    batch = setup.batch_size
    num_prompts = batch // n
    scored = set(reward_steps(num_steps, resample_every, resample_range))
    rng = steering_generator(generator, resample_seed)
    threshold = float(ess_threshold) * n

    row_prompts = list(setup.prompts)
    row_kwargs = expand_reward_kwargs(reward_kwargs, num_prompts, n)
    conditioning, x = setup.conditioning, setup.latents
    device = x.device
    offsets = (torch.arange(num_prompts, device=device) * n).unsqueeze(1)
    identity = torch.arange(n, device=device).expand(num_prompts, n)

    log_w = torch.zeros(num_prompts, n, dtype=torch.float64, device=device)
    log_prod = torch.zeros_like(log_w)  # Σ log G along each particle's ancestry
    state = R.initial_potential_state(potential, (num_prompts, n), device)
    ess = torch.zeros(num_prompts, num_steps, dtype=torch.float64)
    resampled = torch.zeros(num_prompts, num_steps, dtype=torch.bool)
    ancestry = torch.zeros(num_prompts, num_steps, n, dtype=torch.long)
    step_rewards = torch.full((num_prompts, num_steps, n), float("nan"))
    final_rewards = final_images = None
    num_reward_evals = 0

    iterator = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="fk steering", leave=False)
    for i in iterator:
        t = schedule.timesteps[i].to(device)
        model_output = predict_chunked(policy, x, t, conditioning, max_batch_size)
        out = denoise_step(policy, spec, schedule, i, x, conditioning, generator=generator, model_output=model_output)
        x = out.next_latents
        last = i == num_steps - 1
        if not (last or i in scored):
            ess[:, i] = R.effective_sample_size(log_w).cpu()
            ancestry[:, i] = identity.cpu()
            continue

        if last:  # score the output itself and undo the earlier potentials
            result, final_images = decode_and_score(
                policy, x, geometry, reward, row_prompts, row_kwargs, max_batch_size, keep_images=return_particles
            )
            rewards = result.total.view(num_prompts, n).to(device)
            log_g = R.final_log_potential(lam, rewards, log_prod)
            final_rewards = rewards
        else:
            result, _ = decode_and_score(policy, out.x0, geometry, reward, row_prompts, row_kwargs, max_batch_size)
            rewards = result.total.view(num_prompts, n).to(device)
            log_g, state = R.potential(potential, lam, rewards, state)
            log_prod = log_prod + log_g
        num_reward_evals += batch
        step_rewards[:, i] = rewards.float().cpu()
        log_w = log_w + log_g
        ess_i = R.effective_sample_size(log_w)
        ess[:, i] = ess_i.cpu()

        do = torch.ones(num_prompts, dtype=torch.bool, device=device)
        if adaptive:
            do = ess_i < threshold
        if last and not resample_final:
            do = torch.zeros_like(do)
        index = torch.where(do.unsqueeze(1), R.resample(log_w, resampler, rng), identity)
        ancestry[:, i] = index.cpu()
        resampled[:, i] = do.cpu()
        if not bool(do.any()):
            continue
        # Every per-particle quantity moves with its particle: state, conditioning (I2V included).
        rows = (offsets + index).reshape(-1)
        x = x[rows]
        conditioning = conditioning.select(rows)
        row_prompts = [row_prompts[j] for j in rows.tolist()]
        row_kwargs = select_rows(row_kwargs, rows, batch)
        state = R.gather_particles(state, index)
        log_prod = R.gather_particles(log_prod, index)
        log_w = torch.where(do.unsqueeze(1), torch.zeros_like(log_w), log_w)
        if last:
            final_rewards = R.gather_particles(final_rewards, index)
            if final_images is not None:
                final_images = final_images[rows.to(final_images.device)]

    particle_latents = x.view(num_prompts, n, *x.shape[1:])
    best = final_rewards.argmax(dim=1)
    pick = torch.arange(num_prompts, device=device) * n + best
    particles = None if final_images is None else final_images.view(num_prompts, n, *final_images.shape[1:])
    if final_images is not None:
        best_images = final_images[pick.to(final_images.device)]
    else:
        best_images = policy.decode(x[pick], geometry)
    return FKOutput(
        images=best_images,
        rewards=final_rewards.gather(1, best.unsqueeze(1)).squeeze(1).float(),
        best_index=best,
        particles=particles,
        particle_latents=particle_latents,
        particle_rewards=final_rewards.float(),
        log_weights=R.normalize_log_weights(log_w),
        ess=ess,
        resampled=resampled,
        ancestry=ancestry,
        step_rewards=step_rewards,
        reward_steps=sorted(scored),
        prompts=[row_prompts[j * n] for j in range(num_prompts)],
        num_model_evals=batch * num_steps,
        num_reward_evals=num_reward_evals,
    )
