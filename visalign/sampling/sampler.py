"""The sampling loop: a Policy plus the step math of :mod:`visalign.steps` → a Trajectory.

:func:`sample` runs visalign's own denoising loop through the Policy (stock pipelines are
inference-only), recording every state, the per-step Gaussian (mean, std) and the exact log-prob
of each stochastic transition. :func:`log_prob` recomputes the log-probs of stored transitions
under the policy's current weights, reading the σ/ᾱ table stored at rollout (REFERENCE §0).

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

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from visalign.errors import InvalidInputError, SamplerError
from visalign.pipelines.base import Conditioning, Geometry, Policy, Schedule
from visalign import steps as S
from visalign.sampling.options import DEFAULTS, SAMPLERS, default_eta


@dataclass(frozen=True)
class SamplerSpec:
    """How transitions are drawn. Stored in every Trajectory so log-probs are recomputed identically.

    Attributes:
        sampler: ``"ode"``, ``"sde"``, ``"cps"`` or ``"ddim"`` (resolved per family by :meth:`resolve`).
        noise: the flow SDE's diffusion coefficient, ``"flow"`` (Flow-GRPO) or ``"dance"`` (DanceGRPO).
        eta: the noise level (η for sde/ddim, the angle fraction a for cps).
        reduce: log-prob reduction over non-batch dims, ``"mean"`` (default) or ``"sum"``.
        window: ``(start, end)`` step indices where the sampler is stochastic; the ODE runs elsewhere.
            None means every step.
        num_steps: the schedule's length S. The last step (S−1) is always deterministic: it lands
            on the clean prediction x̂0 (the ODE's last step), so no noise is left in the output;
            it carries no log-prob and is never trained (docs/math.md §1, "The last step").
    """

    sampler: str = "sde"
    noise: str = "flow"
    eta: float = 0.7
    reduce: str = "mean"
    window: tuple[int, int] | None = None
    num_steps: int | None = None

    @staticmethod
    def resolve(policy: Policy, sampler: str, noise: str, eta: float | None, reduce: str,
                window, num_steps: int) -> "SamplerSpec":
        """Validates the options for ``policy`` and fills the defaults."""
        if sampler not in SAMPLERS:
            raise SamplerError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
        if policy.is_flow and sampler == "ddim":
            raise SamplerError(f"sampler='ddim' is for DDPM families; {policy.family} is a flow model: use 'sde' or 'cps'.")
        if not policy.is_flow:
            if sampler == "cps":
                raise SamplerError(f"sampler='cps' is for flow models; {policy.family} is a DDPM model: use 'ddim'.")
            sampler = "ddim" if sampler == "sde" else sampler
        if noise not in ("flow", "dance"):
            raise SamplerError(f"Unknown SDE noise {noise!r}; use noise='flow' (Flow-GRPO) or 'dance' (DanceGRPO).")
        if reduce not in ("mean", "sum"):
            raise SamplerError(f"Unknown log-prob reduction {reduce!r}; use 'mean' or 'sum'.")
        if eta is None:
            eta = default_eta(sampler, noise)
        if eta < 0:
            raise SamplerError(f"eta must be >= 0, got {eta}.")
        if window is not None:
            start, end = (int(window[0]), int(window[1]))
            if not 0 <= start < end <= num_steps:
                raise SamplerError(
                    f"sde_window={tuple(window)} must satisfy 0 <= start < end <= num_steps={num_steps}."
                )
            window = (start, end)
        return SamplerSpec(sampler, noise, float(eta), reduce, window, int(num_steps))

    def kind_at(self, step: int) -> str:
        """The transition used at ``step``: the sampler inside the window and before the last step, else ``"ode"``."""
        if self.window is not None and not self.window[0] <= step < self.window[1]:
            return "ode"
        if self.num_steps is not None and step == self.num_steps - 1:
            return "ode"
        return self.sampler


@dataclass
class Trajectory:
    """One batch of sampled trajectories, with everything needed to recompute log-probs.

    Attributes:
        images: decoded output in [0, 1], (B, 3, H, W) or (B, T, 3, H, W); None if not decoded.
        latents: every state, (B, S+1, ...) in the denoiser's layout; ``latents[:, 0]`` is the noise.
        log_probs: (B, S) float32 log-prob of each transition; 0 where ``sde_mask`` is False.
            None for the ODE sampler.
        means: (B, S, ...) the Gaussian mean of each transition.
        stds: (S,) the std of each transition (0 for deterministic steps).
        sde_mask: (S,) bool, the steps that carry a log-prob (std > 0).
        schedule: the σ table (flow) or ᾱ table (DDPM) and the timesteps used, as at rollout.
        x0: (B, S, ...) each step's clean prediction x̂0, when ``return_x0=True``.
        prompts: the B prompts (group-expanded).
        conditioning: the encoded prompts (and I2V images), reused by :func:`log_prob`.
        geometry: the pixel size; ``cond_images``: the I2V first frames, (B, 3, H, W), or None.
        spec: the :class:`SamplerSpec`; ``group_size``: samples per prompt.
    """

    images: torch.Tensor | None
    latents: torch.Tensor
    log_probs: torch.Tensor | None
    means: torch.Tensor
    stds: torch.Tensor
    sde_mask: torch.Tensor
    schedule: Schedule
    prompts: list[str]
    conditioning: Conditioning
    geometry: Geometry
    spec: SamplerSpec
    x0: torch.Tensor | None = None
    cond_images: torch.Tensor | None = None
    group_size: int = 1

    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule.timesteps

    @property
    def sigmas(self) -> torch.Tensor | None:
        return self.schedule.sigmas

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    def select(self, index) -> "Trajectory":
        """The trajectories of the samples at ``index`` (a slice, list or long tensor)."""
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        pick = (lambda t: None if t is None else t[index.to(t.device) if isinstance(index, torch.Tensor) else index])
        positions = range(len(self.prompts))[index] if isinstance(index, slice) else index.tolist()
        return dataclasses.replace(
            self, images=pick(self.images), latents=pick(self.latents), log_probs=pick(self.log_probs),
            means=pick(self.means), x0=pick(self.x0), cond_images=pick(self.cond_images),
            prompts=[self.prompts[i] for i in positions], conditioning=self.conditioning.select(index),
        )

    @staticmethod
    def cat(items: Sequence["Trajectory"]) -> "Trajectory":
        """Concatenates trajectories sampled with the same settings along the batch."""
        first = items[0]
        cat = (lambda name: None if getattr(first, name) is None
               else torch.cat([getattr(t, name) for t in items]))
        return dataclasses.replace(
            first, images=cat("images"), latents=cat("latents"), log_probs=cat("log_probs"),
            means=cat("means"), x0=cat("x0"), cond_images=cat("cond_images"),
            prompts=[p for t in items for p in t.prompts],
            conditioning=Conditioning.cat([t.conditioning for t in items]),
        )


@dataclass
class StepOutput:
    """One transition: the drawn next state and the Gaussian it was drawn from."""

    next_latents: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    x0: torch.Tensor
    model_output: torch.Tensor
    log_prob: torch.Tensor | None = None


def transition(policy: Policy, spec: SamplerSpec, schedule: Schedule, step, latents: torch.Tensor,
               model_output: torch.Tensor):
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


def denoise_step(policy: Policy, spec: SamplerSpec, schedule: Schedule, step: int, latents: torch.Tensor,
                 conditioning: Conditioning, generator=None, noise: torch.Tensor | None = None,
                 detach_uncond: bool = False, model_output: torch.Tensor | None = None,
                 mean_offset: torch.Tensor | None = None) -> StepOutput:
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
        raise InvalidInputError(
            f"Conditioning images must be a float tensor (B, 3, H, W) in [0, 1]; got {shape}."
        )
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
            raise InvalidInputError(f"{policy.family} is image-to-video: pass images=(P, 3, H, W) in [0, 1].")
        images = _check_images(images, len(prompts))
    elif images is not None:
        raise InvalidInputError(f"{policy.family} takes no conditioning images; leave images=None.")
    if negative_prompt is not None:
        negative_prompt = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negative_prompt) != len(prompts):
            raise InvalidInputError(f"Got {len(negative_prompt)} negative prompts for {len(prompts)} prompts.")

    conditioning = policy.encode_prompt(prompts, negative_prompt, guidance_scale, images=images,
                                        geometry=geometry, **encode_kwargs)
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


@torch.no_grad()
def sample(policy: Policy, prompts: str | Sequence[str], *, return_x0: bool = False, decode: bool = True,
           progress: bool = False, **sampling: Any) -> Trajectory:
    """Samples trajectories with exact per-step log-probs.

    Args:
        policy: from :func:`visalign.wrap` or :func:`visalign.load`.
        prompts: P prompts; with ``group_size=G`` the batch is B = P·G.
        return_x0: also keep each step's x̂0 in ``traj.x0``.
        decode: decode the final latents to ``traj.images``.
        progress: show a tqdm bar over the steps.
        **sampling: the sampling keywords of :func:`prepare_sampling` (``num_steps``,
            ``guidance_scale``, ``sampler``, ``noise``, ``eta``, ``generator``, ``latents``,
            ``images``, ``height``, ``width``, ``num_frames``, ``negative_prompt``, ``group_size``,
            ``same_noise_in_group``, ``sde_window``, ``reduce``); defaults and help are
            :class:`~visalign.sampling.options.SamplingOptions`'. A trainer config passes its own
            with ``sample(policy, prompts, **config.sample_kwargs(iteration))``.

    Returns:
        A :class:`Trajectory`.
    """
    setup = prepare_sampling(policy, prompts, **sampling)
    generator = sampling.get("generator")  # the per-step noise continues the initial noise's stream
    prompts, spec, geometry, conditioning = setup.prompts, setup.spec, setup.geometry, setup.conditioning
    latents, schedule, images, batch = setup.latents, setup.schedule, setup.images, setup.batch_size
    num_steps, group_size = schedule.num_steps, setup.group_size
    states, means, stds, log_probs, x0s = [latents], [], [], [], []
    iterator = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sampling", leave=False)
    x = latents
    for i in iterator:
        out = denoise_step(policy, spec, schedule, i, x, conditioning, generator=generator)
        x = out.next_latents
        states.append(x)
        means.append(out.mean)
        stds.append(out.std.reshape(()) if out.std.numel() == 1 else out.std.flatten()[0])
        log_probs.append(out.log_prob if out.log_prob is not None else torch.zeros(batch, device=x.device))
        if return_x0:
            x0s.append(out.x0)

    stds = torch.stack([s.to(x.device) for s in stds]).float()
    sde_mask = stds > 0
    return Trajectory(
        images=policy.decode(x, geometry) if decode else None,
        latents=torch.stack(states, dim=1),
        log_probs=None if spec.sampler == "ode" else torch.stack(log_probs, dim=1),
        means=torch.stack(means, dim=1),
        stds=stds,
        sde_mask=sde_mask,
        schedule=schedule,
        prompts=prompts,
        conditioning=conditioning,
        geometry=geometry,
        spec=spec,
        x0=torch.stack(x0s, dim=1) if return_x0 else None,
        cond_images=images,
        group_size=group_size,
    )


def with_sampling_keywords(fn):
    """Shows :func:`prepare_sampling`'s keywords in ``fn``'s signature (``help()``, IDEs).

    Functions that forward ``**sampling`` to :func:`prepare_sampling` (:func:`sample`, the
    steering functions) declare the keywords once, there.
    """
    own = inspect.signature(fn)
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in params} | {"policy", "prompts"}
    forwarded = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(prepare_sampling).parameters.values()
                 if p.name not in taken and p.kind is not p.VAR_KEYWORD]
    rest = [p for p in own.parameters.values() if p.kind is p.VAR_KEYWORD]
    fn.__signature__ = own.replace(parameters=params + forwarded + rest)
    return fn


sample = with_sampling_keywords(sample)


@dataclass
class LogProbOutput:
    """Recomputed transitions: ``log_probs`` (B, k), ``means`` (B, k, ...), ``stds`` (B, k)."""

    log_probs: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor


def log_prob(policy: Policy, traj: Trajectory, steps, detach_uncond: bool = False,
             conditioning: Conditioning | None = None) -> LogProbOutput:
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
