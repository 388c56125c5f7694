"""The sampling loop: a Policy plus the step math of :mod:`visalign.steps` → a Trajectory.

:func:`sample` runs visalign's own denoising loop through the Policy (stock pipelines are
inference-only), recording every state, the per-step Gaussian (mean, std) and the exact log-prob
of each stochastic transition. :func:`log_prob` recomputes the log-probs of stored transitions
under the policy's current weights, reading the σ/ᾱ table stored at rollout (docs/math.md §0).

Samplers (``sampler=``):

====== ============================================ ==============================
name   transition                                   families
====== ============================================ ==============================
ode    Euler ODE (flow) / DDIM η=0 (DDPM)           all
sde    flow SDE, ``noise="flow"|"dance"``           flow; on DDPM families: ddim
cps    Flow-GRPO coefficient-preserving step        flow
ddim   DDIM with η > 0 (DDPO)                       DDPM
====== ============================================ ==============================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from visalign import steps as S
from visalign.errors import InvalidInputError, SamplerError
from visalign.pipelines.base import Conditioning, Policy, Schedule
from visalign.sampling.prepare import prepare_sampling, with_sampling_keywords
from visalign.sampling.trajectory import SamplerSpec, Trajectory


@dataclass
class StepOutput:
    """One transition: the drawn next state and the Gaussian it was drawn from."""

    next_latents: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    x0: torch.Tensor
    model_output: torch.Tensor
    log_prob: torch.Tensor | None = None


def transition(
    policy: Policy, spec: SamplerSpec, schedule: Schedule, step, latents: torch.Tensor, model_output: torch.Tensor
):
    """Mean, std and x̂0 of the transition at ``step`` (an int, or a (B,) long tensor per sample).

    This is the only place where a sampler kind is mapped to the step math of
    :mod:`visalign.steps`; sampling, log-prob recomputation and steering all call it.
    """
    per_sample = isinstance(step, torch.Tensor) and step.ndim == 1
    kinds = [spec.kind_at(int(i)) for i in (step.tolist() if per_sample else [int(step)])]
    kind = kinds[0]
    if per_sample and any(k != kind for k in kinds):
        raise SamplerError("A per-sample step batch mixes SDE and ODE steps; recompute them separately.")
    index = step.to(schedule.timesteps.device) if per_sample else int(step)

    if schedule.is_flow:
        sigma, sigma_next = schedule.sigmas[index], schedule.sigmas[index + 1]
        x0 = S.flow_x0(latents.float(), model_output, sigma)
        if kind == "ode":
            return S.ode_step(latents.float(), model_output, sigma, sigma_next), torch.zeros(()), x0
        if kind == "cps":
            mean, std = S.cps_mean_std(latents, model_output, sigma, sigma_next, spec.eta)
            return mean, std, x0
        g = S.flow_diffusion_coefficient(spec.noise, spec.eta, sigma, schedule.sigmas[1])
        mean, std = S.flow_sde_mean_std(latents, model_output, sigma, sigma_next, g)
        return mean, std, x0

    alpha, alpha_prev = schedule.alphas_cumprod[index], schedule.alphas_cumprod_prev[index]
    x0, eps = S.ddpm_x0_eps(latents, model_output, alpha, policy.prediction_type)
    if schedule.clip_sample is not None:
        x0 = x0.clamp(-schedule.clip_sample, schedule.clip_sample)
    eta = 0.0 if kind == "ode" else spec.eta
    mean, std = S.ddim_mean_std(x0, eps, alpha, alpha_prev, eta)
    return mean, std, x0


def denoise_step(
    policy: Policy,
    spec: SamplerSpec,
    schedule: Schedule,
    step: int,
    latents: torch.Tensor,
    conditioning: Conditioning,
    generator=None,
    noise: torch.Tensor | None = None,
    detach_uncond: bool = False,
    model_output: torch.Tensor | None = None,
    mean_offset: torch.Tensor | None = None,
) -> StepOutput:
    """Runs the model at ``step`` and draws the next state. Gradients flow if enabled by the caller.

    Args:
        noise: the standard normal z to use; drawn from ``generator`` (per-sample generators
            allowed) when None and the step is stochastic.
        model_output: the model's output at ``latents`` when the caller already has it (steering
            runs the model in chunks, or with gradients); the model is then not called.
        mean_offset: added to the transition's mean before the draw (reward guidance shifts the
            drift this way); the returned mean and log-prob are those of the shifted Gaussian.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if model_output is None:
        t = schedule.timesteps[step].to(latents.device)
        model_output = policy.predict(latents, t, conditioning, detach_uncond=detach_uncond)
    mean, std, x0 = transition(policy, spec, schedule, step, latents, model_output)
    if mean_offset is not None:
        mean = mean + mean_offset
    std = torch.as_tensor(std, device=mean.device, dtype=torch.float32)
    if float(std.max()) <= 0:
        return StepOutput(mean, mean, std, x0, model_output)
    if noise is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    next_latents = mean + std * noise
    log_prob = S.gaussian_log_prob(next_latents.detach(), mean, std, spec.reduce)
    return StepOutput(next_latents, mean, std, x0, model_output, log_prob)


@torch.no_grad()
def sample(
    policy: Policy,
    prompts: str | Sequence[str],
    *,
    return_x0: bool = False,
    decode: bool = True,
    progress: bool = False,
    max_batch_size: int | None = None,
    **sampling: Any,
) -> Trajectory:
    """Samples trajectories with exact per-step log-probs.

    Args:
        policy: from :func:`visalign.wrap` or :func:`visalign.load`.
        prompts: P prompts; with ``group_size=G`` the batch is B = P·G.
        return_x0: also keep each step's x̂0 in ``traj.x0``.
        decode: decode the final latents to ``traj.images``.
        progress: show a tqdm bar over the steps.
        max_batch_size: the most samples denoised and decoded at once, which bounds the model's
            activation memory; None runs all B together. The prompts are encoded and every initial
            noise is drawn before the first chunk, so with one generator per sample the result does
            not depend on it (bit for bit where the model's kernels are batch-size invariant); with
            one shared generator the per-step SDE noise does.
        **sampling: the sampling keywords of :func:`prepare_sampling` (``num_steps``,
            ``guidance_scale``, ``sampler``, ``noise``, ``eta``, ``generator``, ``latents``,
            ``images``, ``height``, ``width``, ``num_frames``, ``negative_prompt``, ``group_size``,
            ``same_noise_in_group``, ``sde_window``, ``reduce``); defaults and help are
            :class:`~visalign.sampling.options.SamplingOptions`'. A trainer config passes its own
            with ``sample(policy, prompts, **config.sample_kwargs(iteration))``.

    Returns:
        A :class:`Trajectory`.
    """
    if max_batch_size is not None and int(max_batch_size) < 1:
        raise InvalidInputError(f"max_batch_size must be >= 1 or None; got {max_batch_size}.")
    setup = prepare_sampling(policy, prompts, **sampling)
    generator = sampling.get("generator")  # the per-step noise continues the initial noise's stream
    spec, geometry, schedule, batch = setup.spec, setup.geometry, setup.schedule, setup.batch_size
    chunk = batch if max_batch_size is None else min(int(max_batch_size), batch)
    bounds = [(a, min(a + chunk, batch)) for a in range(0, batch, chunk)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=schedule.num_steps * len(bounds), desc="sampling", leave=False)
    parts = []
    for a, b in bounds:
        # One chunk: its rows of the shared conditioning, noise and per-sample generators (a slice of
        # the generator list keeps each sample's stream, so the chunking does not change the draws).
        whole = (a, b) == (0, batch)
        parts.append(
            _denoise(
                policy,
                setup,
                setup.conditioning if whole else setup.conditioning.select(slice(a, b)),
                setup.latents if whole else setup.latents[a:b],
                list(generator[a:b]) if isinstance(generator, (list, tuple)) else generator,
                return_x0,
                decode,
                bar,
            )
        )
    if bar is not None:
        bar.close()

    def join(key):  # one chunk is returned as is: a copy would double the trajectory's memory for a moment
        if parts[0][key] is None or len(parts) == 1:
            return parts[0][key]
        return torch.cat([p[key] for p in parts])

    stds = parts[0]["stds"]  # per step, from the schedule: the same for every chunk
    return Trajectory(
        images=join("images"),
        latents=join("latents"),
        log_probs=None if spec.sampler == "ode" else join("log_probs"),
        means=join("means"),
        stds=stds,
        sde_mask=stds > 0,
        schedule=schedule,
        prompts=setup.prompts,
        conditioning=setup.conditioning,
        geometry=geometry,
        spec=spec,
        x0=join("x0"),
        cond_images=setup.images,
        group_size=setup.group_size,
    )


def _denoise(policy, setup, conditioning, latents, generator, return_x0: bool, decode: bool, bar) -> dict:
    """The denoising loop of :func:`sample` over one chunk of rows: its stacked states, Gaussians and pixels."""
    states, means, stds, log_probs, x0s = [latents], [], [], [], []
    x = latents
    for i in range(setup.schedule.num_steps):
        out = denoise_step(policy, setup.spec, setup.schedule, i, x, conditioning, generator=generator)
        x = out.next_latents
        states.append(x)
        means.append(out.mean)
        stds.append(out.std.reshape(()) if out.std.numel() == 1 else out.std.flatten()[0])
        log_probs.append(out.log_prob if out.log_prob is not None else torch.zeros(x.shape[0], device=x.device))
        if return_x0:
            x0s.append(out.x0)
        if bar is not None:
            bar.update(1)
    return {
        "images": policy.decode(x, setup.geometry) if decode else None,
        "latents": torch.stack(states, dim=1),
        "log_probs": torch.stack(log_probs, dim=1),
        "means": torch.stack(means, dim=1),
        "stds": torch.stack([s.to(x.device) for s in stds]).float(),
        "x0": torch.stack(x0s, dim=1) if return_x0 else None,
    }


sample = with_sampling_keywords(sample)


@dataclass
class LogProbOutput:
    """Recomputed transitions: ``log_probs`` (B, k), ``means`` (B, k, ...), ``stds`` (B, k)."""

    log_probs: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor


def log_prob(
    policy: Policy, traj: Trajectory, steps, detach_uncond: bool = False, conditioning: Conditioning | None = None
) -> LogProbOutput:
    """Recomputes the log-probs (and means) of stored transitions under the current weights.

    Runs under the caller's grad mode, so a trainer gets gradients and a reference pass under
    ``torch.no_grad()`` (and ``policy.adapters_disabled()``) does not.

    Args:
        policy: the policy whose current weights score the transitions.
        traj: a stochastic :class:`Trajectory` from :func:`sample`.
        steps: the steps to score: an int, a list or (k,) tensor shared by all samples, or a (B, k)
            long tensor with each sample's own steps (e.g. DanceGRPO's random timestep subset).
        detach_uncond: run the CFG unconditional branch without gradient.
        conditioning: override the stored conditioning (e.g. re-encoded with gradients).

    Returns:
        A :class:`LogProbOutput`. With unchanged weights the log-probs equal ``traj.log_probs``.
    """
    if traj.log_probs is None or traj.spec.sampler == "ode":
        raise SamplerError(
            "Log-probs of the ODE sampler do not exist (its transitions are deterministic); sample "
            "with sampler='sde', 'cps' or 'ddim' to train on log-probs."
        )
    batch, device = traj.batch_size, traj.latents.device
    steps = torch.as_tensor(steps, dtype=torch.long, device=device)
    if steps.ndim == 0:
        steps = steps.view(1)
    if steps.ndim == 1:
        steps = steps.unsqueeze(0).expand(batch, -1)
    if steps.ndim != 2 or steps.shape[0] != batch:
        raise InvalidInputError(f"steps must be an int, (k,) or (B={batch}, k); got shape {tuple(steps.shape)}.")
    if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= traj.num_steps):
        raise InvalidInputError(f"steps must lie in [0, {traj.num_steps - 1}]; got {steps.unique().tolist()}.")
    stochastic = traj.sde_mask.to(device)[steps]
    if not bool(stochastic.all()):
        bad = sorted(set(steps[~stochastic].tolist()))
        raise SamplerError(
            f"Steps {bad} were deterministic at rollout (outside the SDE window, or zero std at the "
            f"end of the schedule) and have no log-prob; train only on steps where traj.sde_mask is True."
        )
    conditioning = traj.conditioning if conditioning is None else conditioning
    # All (sample, step) pairs go through the model as one batch with per-pair timesteps: one
    # forward and one backward per call, which keeps DDP's one-forward-per-backward contract.
    k = steps.shape[1]
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    index = steps.reshape(-1)
    x, x_next = traj.latents[rows, index], traj.latents[rows, index + 1]
    t = traj.schedule.timesteps.to(device)[index]
    model_output = policy.predict(x, t, conditioning.select(rows), detach_uncond=detach_uncond)
    mean, std, _ = transition(policy, traj.spec, traj.schedule, index, x, model_output)
    std = torch.as_tensor(std, dtype=torch.float32, device=device)
    log_probs = S.gaussian_log_prob(x_next, mean, std, traj.spec.reduce)
    stds = std.flatten()[:1].expand(batch * k) if std.numel() == 1 else std.flatten(1)[:, 0]
    return LogProbOutput(log_probs.view(batch, k), mean.view(batch, k, *mean.shape[1:]), stds.reshape(batch, k))
