"""Adapters for the DDPM-family UNet pipelines: SD1.x/2.x (``sd``) and SDXL (``sdxl``).

These models predict ε (or v) at integer timesteps; visalign samples them with DDIM, whose
stochastic form (η > 0) gives DDPO's exact per-step log-probs. A checkpoint that ships another
scheduler (SD1.5 ships PNDM) is sampled with a ``DDIMScheduler`` built from the same config; the
pipeline's own scheduler is left untouched.
"""

from __future__ import annotations

import logging

import torch

from visalign import steps as S
from visalign.errors import ConfigError
from visalign.pipelines.base import Conditioning, Geometry, Policy, Schedule
from visalign.pipelines.registry import register_adapter

logger = logging.getLogger(__name__)


class _UNetPolicy(Policy):
    """What SD1.x/2.x and SDXL share: DDIM schedule, UNet call, VAE scaling, [uncond, cond] CFG."""

    is_flow = False
    denoiser_name = "unet"
    cfg_batched = True
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    # ----------------------------------------------------------------- schedule
    def ddim_scheduler(self):
        """The pipeline's scheduler if it is DDIM, else a DDIMScheduler from the same config."""
        from diffusers import DDIMScheduler

        def from_config(scheduler):
            logger.info("Sampling %s with DDIM built from its %s config.", self.family, type(scheduler).__name__)
            return DDIMScheduler.from_config(scheduler.config)

        return self.sampling_scheduler(DDIMScheduler, from_config)

    default_level_sampling = "uniform"

    @property
    def prediction_type(self) -> str:
        return self.ddim_scheduler().config.prediction_type

    def training_noise_levels(self, u, geometry):
        scheduler = self.ddim_scheduler()
        steps = scheduler.config.num_train_timesteps
        t = (u * steps).long().clamp(max=steps - 1)
        return scheduler.alphas_cumprod.to(u.device)[t].float(), t.float()

    def add_noise(self, x0, noise, level):
        return S.ddpm_add_noise(x0, noise, level)

    def training_target(self, x0, noise, level):
        return S.ddpm_target(x0, noise, level, self.prediction_type)

    def schedule(self, num_steps: int, geometry: Geometry) -> Schedule:
        scheduler = self.ddim_scheduler()
        if scheduler.config.thresholding:
            raise ConfigError(
                "DDIM dynamic thresholding is not supported by visalign's log-prob sampler; set "
                "scheduler.config.thresholding=False (SD checkpoints do not use it)."
            )
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.long()
        # DDIM's previous timestep is t − T//N, not the next list entry (PITFALLS, "DDIM").
        prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
        return Schedule(
            timesteps=timesteps.float(),
            alphas_cumprod=alphas[timesteps].float(),
            alphas_cumprod_prev=alpha_prev.float(),
            clip_sample=float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None,
        )

    # ----------------------------------------------------------------- geometry & latents
    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor

    def default_geometry(self) -> Geometry:
        size = self.denoiser.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return Geometry(size * self.pipe.vae_scale_factor, size * self.pipe.vae_scale_factor)

    def noise_shape(self, batch_size: int, geometry: Geometry) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (batch_size, self.denoiser.config.in_channels, geometry.height // f, geometry.width // f)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.ddim_scheduler().init_noise_sigma)

    # ----------------------------------------------------------------- model call
    def forward(self, latents, timesteps, kwargs, shared):
        return self.run_denoiser(latents.to(self.dtype), timesteps.long(), return_dict=False, **kwargs, **shared)[0]

    def _do_cfg(self, guidance_scale: float) -> bool:
        # Stock applies CFG only above 1 and never for guidance-distilled UNets (time_cond_proj_dim).
        return guidance_scale > 1 and self.denoiser.config.time_cond_proj_dim is None

    def _timestep_cond(self, guidance_scale: float, batch_size: int) -> dict:
        dim = self.denoiser.config.time_cond_proj_dim
        if dim is None:
            return {}
        w = torch.tensor(guidance_scale - 1).repeat(batch_size)
        emb = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim)
        return {"timestep_cond": emb.to(device=self.device, dtype=self.dtype)}

    # ----------------------------------------------------------------- VAE
    def _latent_scale_shift(self):
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:  # SDXL-style per-channel statistics
            view = (1, len(mean), 1, 1)
            return (
                torch.tensor(std, device=self.vae.device).view(view) / config.scaling_factor,
                torch.tensor(mean, device=self.vae.device).view(view),
            )
        return 1.0 / config.scaling_factor, 0.0

    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        scale, shift = self._latent_scale_shift()
        z = latents.to(self.vae.dtype) * scale + shift
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        dist = self.vae.encode((pixels * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        scale, shift = self._latent_scale_shift()
        return ((z.float() - shift) / scale).float()


@register_adapter
class StableDiffusionPolicy(_UNetPolicy):
    """SD1.x / SD2.x text-to-image (``StableDiffusionPipeline``)."""

    family = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)
    default_guidance_scale = 7.5

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        do_cfg = self._do_cfg(scale)
        embeds, negative = self.pipe.encode_prompt(list(prompts), self.device, 1, do_cfg, negative_prompts, **kwargs)
        extra = self._timestep_cond(scale, len(prompts))
        return Conditioning(
            cond={"encoder_hidden_states": embeds, **extra},
            uncond={"encoder_hidden_states": negative, **extra} if do_cfg else None,
            guidance_scale=scale,
        )


@register_adapter
class StableDiffusionXLPolicy(_UNetPolicy):
    """SDXL text-to-image (``StableDiffusionXLPipeline``), with its size/crop added conditions."""

    family = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    default_guidance_scale = 5.0

    def default_geometry(self) -> Geometry:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return Geometry(size, size)

    def encode_prompt(
        self,
        prompts,
        negative_prompts=None,
        guidance_scale=None,
        images=None,
        geometry=None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        **kwargs,
    ) -> Conditioning:
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        do_cfg = self._do_cfg(scale)
        geometry = geometry or self.default_geometry()
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompts,
            **kwargs,
        )
        size = (geometry.height, geometry.width)
        projection_dim = (
            int(pooled.shape[-1])
            if self.pipe.text_encoder_2 is None
            else self.pipe.text_encoder_2.config.projection_dim
        )
        time_ids = (
            self.pipe._get_add_time_ids(
                tuple(original_size or size),
                tuple(crops_coords_top_left),
                tuple(target_size or size),
                dtype=embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
            .to(self.device)
            .repeat(len(prompts), 1)
        )
        extra = self._timestep_cond(scale, len(prompts))

        def branch(hidden, pooled_embeds):
            return {
                "encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled_embeds, "time_ids": time_ids},
                **extra,
            }

        return Conditioning(
            cond=branch(embeds, pooled),
            uncond=branch(negative, negative_pooled) if do_cfg else None,
            guidance_scale=scale,
        )
