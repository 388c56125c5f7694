"""Adapter for FLUX.1 (``FluxPipeline``, family ``flux``).

FLUX differs from the other flow models in three ways, all kept here:

- **Packing.** The transformer consumes 2×2 patches of the latent as tokens, (B, h·w/4, 4C).
  visalign keeps trajectories in the packed layout (the step math is element-wise, and packing is
  an exact permutation) and unpacks only to decode.
- **Guidance.** FLUX.1-dev is guidance-distilled: ``guidance_scale`` feeds the guidance embedding
  and there is no CFG. True CFG runs only with a negative prompt and ``true_cfg_scale > 1``, as two
  forwards (as stock does).
- **Schedule.** Stock passes its own σ list ``linspace(1, 1/N, N)`` and a resolution-dependent
  ``mu`` computed from the packed sequence length.
"""

from __future__ import annotations

import numpy as np
import torch

from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.flow import PatchedFlowPolicy
from visalign.pipelines.registry import register_adapter


@register_adapter
class FluxPolicy(PatchedFlowPolicy):
    """FLUX.1 [dev] / [schnell] text-to-image."""

    family = "flux"
    pipeline_class_names = ("FluxPipeline",)
    default_guidance_scale = 3.5
    cfg_batched = False
    embedded_guidance = True
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipe, max_sequence_length: int = 512):
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length

    def _set_timesteps_kwargs(self, num_steps, geometry):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.flow_scheduler().config
        h, w = self._latent_hw(geometry)
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            return {"num_inference_steps": num_steps, "mu": mu}
        return {"sigmas": sigmas, "mu": mu}

    # ----------------------------------------------------------------- text
    def encode_prompt(
        self,
        prompts,
        negative_prompts=None,
        guidance_scale=None,
        images=None,
        geometry=None,
        true_cfg_scale: float = 1.0,
        **kwargs,
    ) -> Conditioning:
        """Encodes prompts; ``guidance_scale`` is the embedded guidance, ``true_cfg_scale`` real CFG."""
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        geometry = geometry or self.default_geometry()
        length = kwargs.pop("max_sequence_length", self.max_sequence_length)

        def encode(texts):
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=list(texts),
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=length,
                **kwargs,
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, text_ids

        cond, text_ids = encode(prompts)
        if self.denoiser.config.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), float(scale), device=self.device, dtype=torch.float32)
        uncond = None
        if negative_prompts is not None and true_cfg_scale > 1:
            uncond, _ = encode(negative_prompts)
            if "guidance" in cond:
                uncond["guidance"] = cond["guidance"]
        h, w = self._latent_hw(geometry)
        image_ids = self.pipe._prepare_latent_image_ids(len(prompts), h // 2, w // 2, self.device, text_ids.dtype)
        return Conditioning(
            cond=cond, uncond=uncond, guidance_scale=true_cfg_scale, shared={"txt_ids": text_ids, "img_ids": image_ids}
        )

    # ----------------------------------------------------------------- latents
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, h·w/4, 4C), FLUX's token layout."""
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """(B, h·w/4, 4C) → (B, C, h, w)."""
        return self.pipe._unpack_latents(latents, geometry.height, geometry.width, self.pipe.vae_scale_factor)

    def noise_shape(self, batch_size, geometry):
        # Drawn unpacked, then packed, so the same generator gives stock's noise (PITFALLS, "Flux packing").
        return (batch_size, self.denoiser.config.in_channels // 4, *self._latent_hw(geometry))

    def to_model_layout(self, latents):
        return self.pack(latents)

    def forward(self, latents, timesteps, kwargs, shared):
        # Stock casts t to the model dtype before dividing by 1000 (PITFALLS, "Timestep dtype").
        t = timesteps.to(self.dtype) / 1000
        return self.run_denoiser(
            hidden_states=latents.to(self.dtype), timestep=t, return_dict=False, **kwargs, **shared
        )[0]

    def decode(self, latents, geometry):
        return self._decode_unpacked(self.unpack(latents, geometry))

    def encode(self, pixels, generator=None, sample=False):
        return self.pack(self._encode_unpacked(pixels, generator, sample))
