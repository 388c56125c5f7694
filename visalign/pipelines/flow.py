"""What the rectified-flow adapters (SD3, FLUX, Wan) share: the σ schedule and the VAE affine.

The σ table is read from a ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps`` (never
re-derived: the scheduler shifts an already-shifted σ_min, see PITFALLS "Schedules"). Checkpoints
that ship a multistep flow scheduler (Wan ships ``UniPCMultistepScheduler`` with ``flow_shift``)
are sampled with a flow-match Euler scheduler of the same shift; the pipeline's own is untouched.
"""

from __future__ import annotations

import logging

import torch

from visalign import steps as S
from visalign.errors import ConfigError
from visalign.pipelines.base import Geometry, Policy, Schedule

logger = logging.getLogger(__name__)


class FlowPolicy(Policy):
    """Base of the rectified-flow adapters: x_σ = (1−σ)·x0 + σ·ε, the model predicts v ≈ ε − x0."""

    is_flow = True

    def flow_scheduler(self):
        """The pipeline's FlowMatchEulerDiscreteScheduler, or one equivalent to its flow scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self.sampling_scheduler(FlowMatchEulerDiscreteScheduler, self._euler_like)

    def _euler_like(self, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = scheduler.config
        if not (config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction"):
            raise ConfigError(
                f"{self.family} has a {type(scheduler).__name__} that is not a flow-matching scheduler; "
                f"set pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=...) before wrapping."
            )
        euler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            shift=config.get("flow_shift", 1.0),
        )
        logger.info(
            "Sampling %s with FlowMatchEulerDiscreteScheduler(shift=%s) in place of %s.",
            self.family,
            euler.config.shift,
            type(scheduler).__name__,
        )
        return euler

    def _set_timesteps_kwargs(self, num_steps: int, geometry: Geometry) -> dict:
        """What the stock pipeline passes to ``set_timesteps``; adapters override (FLUX: sigmas, mu)."""
        return {"num_inference_steps": num_steps}

    def schedule(self, num_steps: int, geometry: Geometry) -> Schedule:
        scheduler = self.flow_scheduler()
        scheduler.set_timesteps(**self._set_timesteps_kwargs(num_steps, geometry))
        return Schedule(timesteps=scheduler.timesteps.float().cpu(), sigmas=scheduler.sigmas.float().cpu())

    def shift_sigmas(self, sigmas: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Maps unshifted σ ∈ (0, 1) through the scheduler's shift, as ``set_timesteps`` maps its grid.

        Training that draws its own noise level (DPO, SD3-style logit-normal σ) uses this so that
        train-time σ follows the same shift as sampling: the static ``shift`` (SD3, Wan), or the
        resolution-dependent ``mu`` for schedulers with dynamic shifting (FLUX). Scheduler units
        are ``σ · scheduler.config.num_train_timesteps``.
        """
        scheduler = self.flow_scheduler()
        sigmas = sigmas.float()
        if scheduler.config.get("use_dynamic_shifting"):
            mu = self._set_timesteps_kwargs(1, geometry).get("mu")
            if mu is None:
                raise ConfigError(f"{self.family}'s scheduler uses dynamic shifting but the adapter gives no mu.")
            return scheduler.time_shift(mu, 1.0, sigmas)
        shift = float(scheduler.config.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    # ----------------------------------------------------------------- training-time noise
    def training_noise_levels(self, u, geometry):
        sigma = self.shift_sigmas(u, geometry).clamp(1e-4, 1.0)
        return sigma, sigma * self.flow_scheduler().config.num_train_timesteps

    def add_noise(self, x0, noise, level):
        return S.flow_add_noise(x0, noise, level)

    def training_target(self, x0, noise, level):
        return S.flow_target(x0, noise)

    # ----------------------------------------------------------------- VAE affine
    def _latent_affine(self):
        """(scale, shift) with pixels-latent z = latents·scale + shift, as the stock decode does."""
        config = self.vae.config
        return 1.0 / config.scaling_factor, config.shift_factor or 0.0

    def _decode_unpacked(self, latents: torch.Tensor) -> torch.Tensor:
        scale, shift = self._latent_affine()
        z = latents.to(self.vae.dtype) * scale + shift
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _encode_unpacked(self, pixels: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        dist = self.vae.encode((pixels * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        scale, shift = self._latent_affine()
        return (z.float() - shift) / scale


class PatchedFlowPolicy(FlowPolicy):
    """Base of the flow adapters whose latents are cut into 2×2 patches, one token each (FLUX.1, FLUX.2,
    Qwen-Image, Z-Image): sizes come in multiples of twice the VAE factor.
    """

    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def default_geometry(self) -> Geometry:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return Geometry(size, size)

    def _token_hw(self, geometry: Geometry) -> tuple[int, int]:
        """The token grid (after 2×2 patchifying) of an output of this size."""
        f = self.pipe.vae_scale_factor
        return geometry.height // (f * 2), geometry.width // (f * 2)

    def _latent_hw(self, geometry: Geometry) -> tuple[int, int]:
        """The latent grid before patchifying: twice the token grid."""
        h, w = self._token_hw(geometry)
        return 2 * h, 2 * w
