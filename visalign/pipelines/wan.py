"""Adapters for Wan 2.1 text-to-video (``wan-t2v``) and image-to-video (``wan-i2v``).

- CFG runs as two forwards, as stock does (batching them changes v by ~4e-6).
- The VAE's ``latents_mean``/``latents_std`` normalise latents per channel.
- I2V conditions on ``cat(4 mask channels, VAE latent of [image, zeros×(F−1)])`` concatenated to the
  latents on the channel axis, plus CLIP image embeddings when ``transformer.config.image_dim`` is
  set (Wan 2.1). Stock repeats one image for the whole batch; here each sample may have its own.
- Wan 2.2 loads as the same pipeline classes: the two-expert A14B models (``transformer_2``,
  ``boundary_ratio``) and TI2V-5B (``expand_timesteps``) have their adapters in
  :mod:`visalign.pipelines.wan22`; the registry picks the adapter with :meth:`accepts`.
"""

from __future__ import annotations

import importlib.util

import torch

from visalign.errors import ConfigError, InvalidInputError, MissingDependencyError
from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.flow import FlowPolicy
from visalign.pipelines.registry import register_adapter


def wan_variant(pipe) -> str:
    """Which Wan a ``WanPipeline``/``WanImageToVideoPipeline`` is.

    ``"ti2v"`` (Wan 2.2 TI2V-5B, ``expand_timesteps``), ``"experts"`` (Wan 2.2 A14B: ``transformer_2``
    or ``boundary_ratio``) or ``"single"`` (Wan 2.1: one transformer).
    """
    config = getattr(pipe, "config", None) or {}
    if config.get("expand_timesteps"):
        return "ti2v"
    if getattr(pipe, "transformer_2", None) is not None or config.get("boundary_ratio") is not None:
        return "experts"
    return "single"


class _WanPolicy(FlowPolicy):
    is_video = True
    cfg_batched = False
    default_guidance_scale = 5.0
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    wan_variant: str = "single"

    @classmethod
    def accepts(cls, pipe) -> bool:
        return wan_variant(pipe) == cls.wan_variant

    def __init__(
        self,
        pipe,
        max_sequence_length: int = 512,
        expert_lora: str | None = None,
        guidance_scale_2: float | None = None,
    ):
        given = [
            name
            for name, value in (("expert_lora", expert_lora), ("guidance_scale_2", guidance_scale_2))
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of the two-expert "
                f"Wan 2.2 pipelines (transformer_2 and boundary_ratio set), but this {type(pipe).__name__} is "
                f"{type(self).family}, with one transformer: there is no second expert to train or guide. "
                f"Drop the option, or load a two-expert checkpoint such as Wan-AI/Wan2.2-T2V-A14B-Diffusers."
            )
        super().__init__(pipe)
        # The stock __call__ default (its encode_prompt defaults to 226: PITFALLS, "Text length").
        self.max_sequence_length = max_sequence_length

    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]

    def default_geometry(self) -> Geometry:
        return Geometry(480, 832, 81)

    def validate_num_frames(self, num_frames: int) -> int:
        k = self.pipe.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % k:
            near = max(1, round((num_frames - 1) / k) * k + 1)
            raise InvalidInputError(
                f"num_frames={num_frames} is not of the form {k}·n+1, which the Wan VAE needs. Use num_frames={near}."
            )
        return num_frames

    def _latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def noise_shape(self, batch_size, geometry):
        f = self.pipe.vae_scale_factor_spatial
        frames = (geometry.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (batch_size, self._latent_channels(), frames, geometry.height // f, geometry.width // f)

    def _missing_ftfy(self, cause=None) -> MissingDependencyError:
        return MissingDependencyError(
            f"{type(self.pipe).__name__} cleans prompts with the optional package 'ftfy', which is not "
            f"installed (diffusers would fail with \"NameError: name 'ftfy' is not defined\", or skip the "
            f"cleaning Wan was trained with). Install the video extra: `pip install 'visalign[video]'` "
            f"(or `pip install ftfy`), then restart Python."
        )

    def _encode_text(self, prompts, negative_prompts, do_cfg, length):
        if importlib.util.find_spec("ftfy") is None:
            raise self._missing_ftfy()
        try:
            embeds, negative = self.pipe.encode_prompt(
                prompt=list(prompts),
                negative_prompt=negative_prompts,
                do_classifier_free_guidance=do_cfg,
                num_videos_per_prompt=1,
                max_sequence_length=length,
                device=self.device,
            )
        except NameError as exc:  # ftfy installed after diffusers' Wan module was imported
            if "ftfy" in str(exc):
                raise self._missing_ftfy() from exc
            raise
        cast = lambda t: None if t is None else t.to(self.dtype)  # noqa: E731
        return cast(embeds), cast(negative)

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        do_cfg = scale > 1
        embeds, negative = self._encode_text(
            prompts, negative_prompts, do_cfg, kwargs.pop("max_sequence_length", self.max_sequence_length)
        )
        return Conditioning(
            cond={"encoder_hidden_states": embeds},
            uncond={"encoder_hidden_states": negative} if do_cfg else None,
            guidance_scale=scale,
        )

    def forward(self, latents, timesteps, kwargs, shared):
        return self.run_denoiser(
            hidden_states=latents.to(self.dtype), timestep=timesteps.float(), return_dict=False, **kwargs, **shared
        )[0]

    # ----------------------------------------------------------------- VAE
    def _latent_stats(self, like: torch.Tensor):
        config = self.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=torch.float32).view(view)
        std = torch.tensor(config.latents_std, device=like.device, dtype=torch.float32).view(view)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(z)
        return (z.float() - mean) / std

    def decode(self, latents, geometry):
        mean, std = self._latent_stats(latents)
        z = latents.float() * std + mean
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, T, H, W)
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)

    def encode(self, pixels, generator=None, sample=False):
        """Video pixels (B, T, 3, H, W) in [0, 1] → normalised latents (B, C, T', h, w)."""
        video = (pixels.permute(0, 2, 1, 3, 4) * 2 - 1).to(self.vae.dtype)
        dist = self.vae.encode(video).latent_dist
        return self.normalize_latents(dist.sample(generator) if sample else dist.mode())


@register_adapter
class WanT2VPolicy(_WanPolicy):
    """Wan 2.1 text-to-video (``WanPipeline``)."""

    family = "wan-t2v"
    pipeline_class_names = ("WanPipeline",)


@register_adapter
class WanI2VPolicy(_WanPolicy):
    """Wan 2.1 image-to-video (``WanImageToVideoPipeline``): each sample needs a first frame."""

    family = "wan-i2v"
    pipeline_class_names = ("WanImageToVideoPipeline",)
    needs_image = True

    def _latent_channels(self) -> int:
        return self.vae.config.z_dim

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        if images is None:
            raise InvalidInputError(
                "wan-i2v needs a conditioning image per prompt: pass images=Tensor(B, 3, H, W) in [0, 1]."
            )
        geometry = geometry or self.default_geometry()
        conditioning = super().encode_prompt(prompts, negative_prompts, guidance_scale, **kwargs)
        image_inputs = {"image_condition": self.image_condition(images, geometry)}
        if self.denoiser.config.image_dim is not None:
            image_inputs["encoder_hidden_states_image"] = self.image_embeds(images)
        conditioning.cond.update(image_inputs)
        if conditioning.uncond is not None:
            conditioning.uncond.update(image_inputs)  # stock gives both branches the image
        return conditioning

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP vision features (penultimate hidden state) of each image, as stock's encode_image."""
        encoder = self.pipe.image_encoder
        # The processor sees the same [0, 1] floats stock gets from a PIL image after its rescale.
        inputs = self.pipe.image_processor(images=list(images.float().cpu()), do_rescale=False, return_tensors="pt").to(
            encoder.device
        )
        hidden = encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        return hidden.to(device=self.device, dtype=self.dtype)

    def image_condition(self, images: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """``cat(mask, normalised VAE latent of [image, zeros×(F−1)])``, (B, 4+C, T', h, w)."""
        frames = geometry.num_frames
        pixels = self.pipe.video_processor.preprocess(images.float(), height=geometry.height, width=geometry.width)
        pixels = pixels.to(device=self.vae.device, dtype=torch.float32).unsqueeze(2)  # [-1, 1]
        video = torch.cat([pixels, pixels.new_zeros(pixels.shape[0], 3, frames - 1, *pixels.shape[-2:])], dim=2)
        latent = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        latent = self.normalize_latents(latent)

        batch, _, latent_frames, h, w = latent.shape
        k = self.pipe.vae_scale_factor_temporal
        # The mask marks frame 0 as given; the first latent frame covers k pixel frames.
        mask = torch.zeros(batch, 1, frames, h, w, device=latent.device)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(k, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch, latent_frames, k, h, w).transpose(1, 2)
        return torch.cat([mask, latent], dim=1).to(device=self.device, dtype=self.dtype)

    def forward(self, latents, timesteps, kwargs, shared):
        kwargs = dict(kwargs)
        condition = kwargs.pop("image_condition")
        hidden = torch.cat([latents.to(self.dtype), condition], dim=1)
        return self.run_denoiser(
            hidden_states=hidden, timestep=timesteps.float(), return_dict=False, **kwargs, **shared
        )[0]
