"""Adapter for Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, family ``sd3``).

CFG is a batched [uncond, cond] forward, as stock does. The T5 text length defaults to 256, the
stock ``__call__`` default (padded tokens are not masked, so the length changes outputs).
"""

from __future__ import annotations

import contextlib
import logging

from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.flow import FlowPolicy
from visalign.pipelines.registry import register_adapter

STOCK_MAX_SEQUENCE_LENGTH = 256


@contextlib.contextmanager
def _quiet_t5_truncation(length: int):
    """Stock SD3 logs "truncated" on every call whose T5 text is cut to ``max_sequence_length``.
    A length below the stock 256 is the caller's choice (the toy T2I runs at 1), so that warning is
    silenced for the call; at the stock length a truncated prompt still warns.
    """
    if length >= STOCK_MAX_SEQUENCE_LENGTH:
        yield
        return
    logger = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@register_adapter
class SD3Policy(FlowPolicy):
    """SD3 / SD3.5 text-to-image."""

    family = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    default_guidance_scale = 7.0
    cfg_batched = True
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipe, max_sequence_length: int = STOCK_MAX_SEQUENCE_LENGTH):
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length

    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size

    def default_geometry(self) -> Geometry:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return Geometry(size, size)

    def _set_timesteps_kwargs(self, num_steps, geometry):
        kwargs = {"num_inference_steps": num_steps}
        config = self.flow_scheduler().config
        if config.get("use_dynamic_shifting"):  # SD3 computes mu only in this case (PITFALLS)
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            f, p = self.pipe.vae_scale_factor, self.denoiser.config.patch_size
            seq_len = (geometry.height // f // p) * (geometry.width // f // p)
            kwargs["mu"] = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return kwargs

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        do_cfg = scale > 1
        length = kwargs.pop("max_sequence_length", self.max_sequence_length)
        with _quiet_t5_truncation(length):
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negative_prompts,
                do_classifier_free_guidance=do_cfg,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=length,
                **kwargs,
            )
        return Conditioning(
            cond={"encoder_hidden_states": embeds, "pooled_projections": pooled},
            uncond={"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if do_cfg else None,
            guidance_scale=scale,
        )

    def noise_shape(self, batch_size, geometry):
        f = self.pipe.vae_scale_factor
        return (batch_size, self.denoiser.config.in_channels, geometry.height // f, geometry.width // f)

    def forward(self, latents, timesteps, kwargs, shared):
        return self.run_denoiser(
            hidden_states=latents.to(self.dtype), timestep=timesteps.float(), return_dict=False, **kwargs, **shared
        )[0]

    def decode(self, latents, geometry):
        return self._decode_unpacked(latents)

    def encode(self, pixels, generator=None, sample=False):
        return self._encode_unpacked(pixels, generator, sample)
