"""Steering inside a stock diffusers pipeline, through ``callback_on_step_end``.

When you want to keep calling ``pipe(...)`` (its scheduler, its progress bar, its output types),
these :class:`~diffusers.callbacks.PipelineCallback` subclasses add steering to the stock loop::

    from visalign.steering import RewardGuidanceCallback, FKResampleCallback

    cb = RewardGuidanceCallback(reward, prompts=["a red circle"], scale=0.5, height=512, width=512)
    image = pipe("a red circle", height=512, width=512, callback_on_step_end=cb).images[0]

    cb = FKResampleCallback(reward, prompts=["a red circle"], lam=10.0, resample_every=5)
    images = pipe("a red circle", num_images_per_prompt=4, eta=1.0, callback_on_step_end=cb).images
    images[cb.best_index[0]]                    # the best particle; cb.log_weights, cb.ess, cb.ancestry

What the callback interface allows, and what it does not (diffusers 0.3x–0.4x):

**It can**

- change the latents after each scheduler step (the pipeline continues from what is returned), so
  :class:`RewardGuidanceCallback` adds ``scale·∇_x r(decode(x̂0(x)))`` to the latents, the same
  gradient as :func:`visalign.reward_guidance`, and :class:`FKResampleCallback` replaces the
  latents by a resampled copy of themselves;
- keep state across steps, so FK log-weights (in log space, carried when resampling is skipped),
  potentials, the final-step correction, ESS and ancestry all work as in :func:`visalign.fk_steer`;
- treat the ``num_images_per_prompt`` images of each prompt as that prompt's particles.

**It cannot**

- see the model output or x̂0 of the step: the pipeline does not pass them. Each reward step
  therefore costs **one extra denoiser call** (two with CFG) to predict x̂0 from the new latents,
  plus a backward pass for guidance. :func:`visalign.fk_steer` reuses the step's own x̂0 for free;
- choose the sampler: stock SD3/FLUX/Wan pipelines use a deterministic Euler (ODE) scheduler, and
  resampled copies of a deterministic path never diverge. :class:`FKResampleCallback` refuses a
  ``FlowMatchEulerDiscreteScheduler`` without ``stochastic_sampling=True``; with DDIM it needs
  ``eta > 0`` in the pipeline call, which a callback cannot read, so it checks after the first
  resampling that duplicated particles did diverge and raises otherwise. visalign's own SDE
  samplers (Flow-GRPO/DanceGRPO noise) exist only in :func:`visalign.fk_steer`;
- resample across prompts, or re-index per-sample state the pipeline keeps to itself: only
  ``latents`` come back, so particles move only within one prompt's images, whose text
  conditioning is identical (for Wan I2V stock uses one first frame for the whole batch);
- change the batch size or chunk the model calls (no memory bound beyond the pipeline's batch),
  or return per-particle rewards through the pipeline output: read them from the callback
  (``cb.rewards``, ``cb.best_index``) after the call;
- guide through the model for free: with ``through_model=True`` the extra forward also runs a
  backward through the denoiser (DPS); ``False`` differentiates only the decoder and the reward.

Both callbacks build the visalign :class:`~visalign.pipelines.Policy` of the pipeline (sharing its
modules) to encode the prompts once and to run the extra forward; pass the same ``height``,
``width`` (``num_frames``, ``images``, ``negative_prompt``) as to the pipeline call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from visalign.errors import ConfigError, InvalidInputError, SamplerError
from visalign.pipelines.base import Schedule
from visalign.sampling.sampler import transition
from visalign.sampling.trajectory import SamplerSpec
from visalign.steering import resampling as R
from visalign.steering.common import decode_and_score, resolve_reward
from visalign.steering.fk import reward_steps
from visalign.steering.guidance import _check_differentiable, differentiable_scores, reward_gradient

__all__ = ["RewardGuidanceCallback", "FKResampleCallback"]

_ODE = SamplerSpec(sampler="ode", eta=0.0)


class _StockSteering(PipelineCallback):
    """What both callbacks share: the Policy of the running pipeline, its conditioning, and x̂0."""

    tensor_inputs = ["latents"]

    def __init__(
        self,
        reward: Any,
        prompts: str | Sequence[str],
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        images: torch.Tensor | None = None,
        negative_prompt: str | Sequence[str] | None = None,
    ):
        super().__init__(cutoff_step_ratio=1.0)
        self.reward = resolve_reward(reward)
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise InvalidInputError("prompts is empty; pass the prompts given to the pipeline call.")
        self.size = (height, width, num_frames)
        self.images = images
        self.negative_prompt = negative_prompt
        self._run = None

    # ------------------------------------------------------------------ per-run context
    def _context(self, pipeline, latents: torch.Tensor):
        """(policy, conditioning, row prompts, geometry, group) for this call, built on its first step."""
        import visalign as va

        if self._run is not None:
            return self._run
        policy = va.wrap(pipeline)
        geometry = policy.geometry(*self.size)
        batch, num_prompts = latents.shape[0], len(self.prompts)
        if batch % num_prompts:
            raise InvalidInputError(
                f"The pipeline runs {batch} latents for the callback's {num_prompts} prompts; pass the same "
                f"prompts to the callback as to the pipeline call."
            )
        expected = policy.latent_shape(batch, geometry)
        if tuple(latents.shape) != expected:
            raise InvalidInputError(
                f"The pipeline's latents are {tuple(latents.shape)}, but {geometry} gives {expected}; pass the "
                f"pipeline call's height/width/num_frames to the callback."
            )
        group = batch // num_prompts
        negative = self.negative_prompt
        if isinstance(negative, str):
            negative = [negative] * num_prompts
        images = self.images
        if policy.needs_image and images is None:
            raise InvalidInputError(f"{policy.family} is image-to-video: pass images=(P, 3, H, W) to the callback.")
        with torch.no_grad():
            conditioning = policy.encode_prompt(
                self.prompts, negative, getattr(pipeline, "guidance_scale", None), images=images, geometry=geometry
            )
        conditioning = conditioning.repeat_interleave(group)
        prompts = [p for p in self.prompts for _ in range(group)]
        self._run = (policy, conditioning, prompts, geometry, group)
        self.on_start(pipeline, batch, group)
        return self._run

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == 0:  # a new pipeline call: rebuild the context and reset the state
            self._run = None
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)

    def on_start(self, pipeline, batch: int, group: int) -> None:
        """Resets per-run state; subclasses extend it."""

    @staticmethod
    def _state_schedule(pipeline, policy, index: int) -> Schedule:
        """A one-step schedule at the stock scheduler's step ``index``, for the x̂0 conversion."""
        scheduler = pipeline.scheduler
        t = scheduler.timesteps[index : index + 1].float().cpu()
        if policy.is_flow:
            return Schedule(timesteps=t, sigmas=scheduler.sigmas[index : index + 2].float().cpu())
        alpha = scheduler.alphas_cumprod[t.long()].float()
        clip = scheduler.config.get("clip_sample_range") if scheduler.config.get("clip_sample") else None
        return Schedule(
            timesteps=t,
            alphas_cumprod=alpha,
            alphas_cumprod_prev=alpha,
            clip_sample=None if clip is None else float(clip),
        )

    def x0_of(self, pipeline, policy, conditioning, latents: torch.Tensor, step_index: int) -> torch.Tensor:
        """x̂0 of the state after step ``step_index`` (one extra denoiser call; the output itself at the end)."""
        index = step_index + 1
        if index >= len(pipeline.scheduler.timesteps):
            return latents.float()
        schedule = self._state_schedule(pipeline, policy, index).to(latents.device)
        x = latents.float()
        model_output = policy.predict(x, schedule.timesteps[0], conditioning)
        return transition(policy, _ODE, schedule, 0, x, model_output)[2]


class RewardGuidanceCallback(_StockSteering):
    """Reward-gradient guidance in a stock pipeline: ``latents += scale·∇ r(decode(x̂0(latents)))``.

    The gradient is :func:`visalign.steering.reward_gradient`'s (the one :func:`visalign.reward_guidance`
    uses), taken at the state the scheduler just produced; at the last step x̂0 is the output itself.

    Args:
        reward: one differentiable reward, or a dict / list of ``(reward, weight)``.
        prompts: the prompts given to the pipeline (one per prompt, not per image).
        scale: the step size per guided step (default 1.0).
        steps: guide after steps ``start ≤ i < end`` only.
        through_model: differentiate through the denoiser (DPS) (default True).
        normalize_grad: unit-RMS gradient per sample (default False).
        height, width, num_frames, images, negative_prompt: as given to the pipeline call.

    Raises:
        NotDifferentiableError: at construction, for a non-differentiable reward.
    """

    def __init__(
        self,
        reward: Any,
        prompts: str | Sequence[str],
        scale: float = 1.0,
        steps: tuple[int, int] | None = None,
        through_model: bool = True,
        normalize_grad: bool = False,
        **context,
    ):
        super().__init__(reward, prompts, **context)
        _check_differentiable(self.reward)
        self.scale, self.steps = float(scale), steps
        self.through_model, self.normalize_grad = through_model, normalize_grad
        self.grad_norms: list[float] = []

    def on_start(self, pipeline, batch, group):
        self.grad_norms = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        if self.steps is not None and not self.steps[0] <= step_index < self.steps[1]:
            return callback_kwargs
        policy, conditioning, prompts, geometry, _ = self._context(pipeline, latents)
        index = step_index + 1
        if index >= len(pipeline.scheduler.timesteps):  # the output itself: differentiate decode + reward
            x = latents.detach().float().requires_grad_(True)
            with torch.enable_grad():
                r = self._score(policy, x, prompts, geometry)
                (grad,) = torch.autograd.grad(r.sum(), x)
        else:
            schedule = self._state_schedule(pipeline, policy, index).to(latents.device)
            grad, _, _ = reward_gradient(
                policy,
                _ODE,
                schedule,
                0,
                latents,
                conditioning,
                self.reward,
                prompts,
                geometry,
                None,
                self.through_model,
            )
        rms = grad.flatten(1).pow(2).mean(1).sqrt()
        self.grad_norms.append(float(rms.mean()))
        if self.normalize_grad:
            grad = grad / (rms + 1e-12).view(-1, *([1] * (grad.ndim - 1)))
        callback_kwargs["latents"] = (latents.float() + self.scale * grad).to(latents.dtype)
        return callback_kwargs

    def _score(self, policy, x, prompts, geometry):
        return differentiable_scores(self.reward, policy.decode(x, geometry), prompts)


class FKResampleCallback(_StockSteering):
    """FK particle resampling across each prompt's ``num_images_per_prompt`` images, in a stock pipeline.

    Uses the same potentials, log-space weights, carried weights, adaptive ESS rule, resamplers
    and final-step correction as :func:`visalign.fk_steer` (all from
    :mod:`visalign.steering.resampling`). Reward steps follow :func:`visalign.steering.reward_steps`
    (counted in callback steps; x̂0 is that of the state the scheduler just produced), and the
    last step scores the output, applies the correction and resamples before the pipeline decodes.

    After the call: ``rewards`` (P, N) final rewards, ``best_index`` (P,), ``log_weights`` (P, N),
    ``ess`` and ``resampled`` (lists per step of (P,) tensors), ``ancestry`` (list of (P, N)).

    Args:
        reward: any reward (values only), or a dict / list of ``(reward, weight)``.
        prompts: the prompts given to the pipeline.
        lam, potential, resample_every, resample_range, adaptive, ess_threshold, resampler,
        resample_final: as in :func:`visalign.fk_steer`.
        seed: seeds the resampling draws (default 0).
        height, width, num_frames, images, negative_prompt: as given to the pipeline call.

    Raises:
        SamplerError: the pipeline's scheduler is deterministic (see the module docstring).
    """

    def __init__(
        self,
        reward: Any,
        prompts: str | Sequence[str],
        lam: float = 10.0,
        potential: str = "max",
        resample_every: int | None = 5,
        resample_range: tuple[int, int] | None = None,
        adaptive: bool = False,
        ess_threshold: float = 0.5,
        resampler: str = "systematic",
        resample_final: bool = True,
        seed: int = 0,
        **context,
    ):
        super().__init__(reward, prompts, **context)
        if potential not in R.POTENTIALS:
            raise ConfigError(f"Unknown FK potential {potential!r}; choose one of {R.POTENTIALS}.")
        if resampler not in R.RESAMPLERS:
            raise ConfigError(f"Unknown resampler {resampler!r}; choose one of {R.RESAMPLERS}.")
        self.lam, self.potential, self.resampler = float(lam), potential, resampler
        self.resample_every, self.resample_range = resample_every, resample_range
        self.adaptive, self.ess_threshold, self.resample_final = adaptive, float(ess_threshold), resample_final
        self.seed = int(seed)

    def on_start(self, pipeline, batch, group):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = pipeline.scheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.get("stochastic_sampling"):
            raise SamplerError(
                f"{type(pipeline).__name__} samples with a deterministic FlowMatchEulerDiscreteScheduler: resampled "
                "copies would follow the same path and never diverge. Use va.fk_steer(va.wrap(pipe), ...) (SDE "
                "sampler), or a scheduler with stochastic_sampling=True."
            )
        num_prompts = batch // group
        self.group = group
        self.scored = set(reward_steps(len(scheduler.timesteps), self.resample_every, self.resample_range))
        self.rng = torch.Generator().manual_seed(self.seed)
        self.log_weights = torch.zeros(num_prompts, group, dtype=torch.float64)
        self.log_prod = torch.zeros_like(self.log_weights)
        self.state = R.initial_potential_state(self.potential, (num_prompts, group))
        self.ess, self.resampled, self.ancestry = [], [], []
        self.rewards = self.best_index = None
        self._duplicates = None

    def _check_diverged(self, latents: torch.Tensor) -> None:
        """After a resampling that duplicated particles, a stochastic step must have separated them."""
        if self._duplicates is None:
            return
        first, second = self._duplicates
        self._duplicates = None
        if torch.equal(latents[first], latents[second]):
            raise SamplerError(
                "Resampled copies did not diverge after a scheduler step: the pipeline is sampling "
                "deterministically (for DDIM pass eta > 0 to the pipeline call, e.g. eta=1.0)."
            )

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        policy, conditioning, prompts, geometry, n = self._context(pipeline, latents)
        self._check_diverged(latents)
        num_prompts = latents.shape[0] // n
        last = step_index == len(pipeline.scheduler.timesteps) - 1
        identity = torch.arange(n).expand(num_prompts, n)
        if not (last or step_index in self.scored):
            self.ess.append(R.effective_sample_size(self.log_weights))
            self.resampled.append(torch.zeros(num_prompts, dtype=torch.bool))
            self.ancestry.append(identity.clone())
            return callback_kwargs
        with torch.no_grad():
            x0 = self.x0_of(pipeline, policy, conditioning, latents, step_index)
            result, _ = decode_and_score(policy, x0, geometry, self.reward, prompts)
        rewards = result.total.view(num_prompts, n).cpu()
        if last:
            log_g = R.final_log_potential(self.lam, rewards, self.log_prod)
            self.rewards = rewards
        else:
            log_g, self.state = R.potential(self.potential, self.lam, rewards, self.state)
            self.log_prod = self.log_prod + log_g
        self.log_weights = self.log_weights + log_g
        ess = R.effective_sample_size(self.log_weights)
        self.ess.append(ess)
        do = ess < self.ess_threshold * n if self.adaptive else torch.ones(num_prompts, dtype=torch.bool)
        if last and not self.resample_final:
            do = torch.zeros_like(do)
        index = torch.where(do.unsqueeze(1), R.resample(self.log_weights, self.resampler, self.rng), identity)
        self.resampled.append(do)
        self.ancestry.append(index)
        if bool(do.any()):
            rows = (torch.arange(num_prompts).unsqueeze(1) * n + index).reshape(-1)
            latents = latents[rows.to(latents.device)]
            self.state = R.gather_particles(self.state, index)
            self.log_prod = R.gather_particles(self.log_prod, index)
            self.log_weights = torch.where(do.unsqueeze(1), torch.zeros_like(self.log_weights), self.log_weights)
            if last:
                self.rewards = R.gather_particles(self.rewards, index)
            else:
                seen = {}
                for j, row in enumerate(rows.tolist()):
                    if row in seen:
                        self._duplicates = (seen[row], j)
                        break
                    seen[row] = j
        if last:
            self.best_index = self.rewards.argmax(dim=1)
            self.log_weights = R.normalize_log_weights(self.log_weights)
        callback_kwargs["latents"] = latents
        return callback_kwargs
