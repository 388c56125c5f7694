"""Adapters for FLUX.2 [dev] (``Flux2Pipeline``, family ``flux2``) and FLUX.2 [klein]
(``Flux2KleinPipeline``, family ``flux2-klein``), text-to-image.

What differs from FLUX.1, all kept here:

- **Text.** A decoder-only LLM (Mistral-3 for [dev], Qwen3 for [klein]) reads the prompt through
  its chat template, padded to ``max_sequence_length`` (512); the text condition is the
  concatenation of three intermediate hidden states ((10, 20, 30) for [dev], (9, 18, 27) for
  [klein]). Padding is not masked, so the length matters, as for FLUX.1's T5.
- **Latents.** The VAE has 32 channels; its latents are patchified 2x2 (128 channels) and normalised
  by the VAE's batch-norm running statistics (``(z − mean) / sqrt(var + eps)``), then flattened
  row-major into tokens. The noise is drawn as ``(B, 128, H/16·…, W/16·…)`` and flattened, as stock
  draws it; position ids are 4-D ``(t, h, w, l)``.
- **Schedule.** ``sigmas = linspace(1, 1/N, N)`` with an empirical ``mu`` that depends on the
  sequence length *and* the number of steps (``compute_empirical_mu``).
- **Guidance.** [dev] is guidance-distilled: ``guidance_scale`` feeds the guidance embedding, no
  CFG. [klein] base has no guidance embedding and runs CFG as two forwards against the empty
  prompt (stock's fixed negative prompt); the step-distilled [klein] (``is_distilled``) runs
  without CFG whatever ``guidance_scale`` is, as stock does.
- **Timestep.** ``t / 1000`` (σ) cast to the model dtype first; the transformer scales it back.

Stock's ``output_type="latent"`` differs: [dev] returns the packed tokens (what
``Trajectory.final_latents`` holds), [klein] the un-normalised VAE latents; :meth:`Flux2Policy.vae_latents`
maps the former to the latter.
"""

from __future__ import annotations

import numpy as np
import torch

from visalign.errors import UnsupportedPipelineError
from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.flow import PatchedFlowPolicy
from visalign.pipelines.registry import register_adapter


@register_adapter
class Flux2Policy(PatchedFlowPolicy):
    """FLUX.2 [dev]: embedded guidance, Mistral-3 text encoder.

    Args:
        pipe: a ``Flux2Pipeline``.
        max_sequence_length: the padded text length (stock ``__call__`` default 512).
        text_encoder_out_layers: the hidden states stacked into the text condition (stock default).
    """

    family = "flux2"
    pipeline_class_names = ("Flux2Pipeline",)
    default_guidance_scale = 4.0
    cfg_batched = False
    embedded_guidance = True
    # The double-stream attention projections, and the single-stream blocks' fused QKV+MLP input
    # projection, so that the LoRA reaches the single-stream blocks (most of FLUX.2's layers).
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "to_qkv_mlp_proj",
    )
    stock_text_layers: tuple[int, ...] = (10, 20, 30)

    def __init__(self, pipe, max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] | None = None):
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers or self.stock_text_layers)

    def _validate_pipeline(self):
        super()._validate_pipeline()
        names = {k.__name__ for k in type(self.pipe).__mro__}
        if names & {"Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline"}:
            raise UnsupportedPipelineError(
                f"{type(self.pipe).__name__} is not supported by visalign; use Flux2Pipeline or Flux2KleinPipeline."
            )

    def _set_timesteps_kwargs(self, num_steps, geometry):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        h, w = self._token_hw(geometry)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps)
        if self.flow_scheduler().config.get("use_flow_sigmas"):
            return {"num_inference_steps": num_steps, "mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    # ----------------------------------------------------------------- text
    def _encode_text(self, texts: list[str], length: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipe.encode_prompt(
            prompt=list(texts),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=length,
            text_encoder_out_layers=self.text_encoder_out_layers,
            **kwargs,
        )

    def _uncond(self, prompts, negative_prompts, scale, length, **kwargs):
        """The unconditional text inputs, or None without CFG ([dev] never runs CFG)."""
        return None

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        geometry = geometry or self.default_geometry()
        length = kwargs.pop("max_sequence_length", self.max_sequence_length)
        embeds, text_ids = self._encode_text(prompts, length, **kwargs)
        cond = {"encoder_hidden_states": embeds}
        if self.denoiser.config.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), scale, device=self.device, dtype=torch.float32)
        uncond = self._uncond(prompts, negative_prompts, scale, length, **kwargs)
        h, w = self._token_hw(geometry)
        img_ids = self.pipe._prepare_latent_ids(torch.empty(1, 1, h, w, device="meta"))[0].to(self.device)
        return Conditioning(
            cond=cond,
            uncond=uncond,
            guidance_scale=scale if uncond is not None else 1.0,
            shared={"txt_ids": text_ids[0], "img_ids": img_ids},
        )

    # ----------------------------------------------------------------- latents
    def noise_shape(self, batch_size, geometry):
        return (batch_size, self.denoiser.config.in_channels, *self._token_hw(geometry))

    def to_model_layout(self, latents):
        return self.pipe._pack_latents(latents)

    def forward(self, latents, timesteps, kwargs, shared):
        dtype = self.dtype  # one lookup per call: a module's dtype walks its parameters
        # Stock casts t to the latents' (model) dtype before dividing by 1000.
        t = timesteps.to(dtype) / 1000
        out = self.run_denoiser(hidden_states=latents.to(dtype), timestep=t, return_dict=False, **kwargs, **shared)[0]
        return out[:, : latents.shape[1]]

    def _bn_stats(self, like: torch.Tensor):
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def unpack(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """(B, h·w, C) tokens → (B, C, h, w): the inverse of stock's row-major ``_pack_latents``."""
        h, w = self._token_hw(geometry)
        return latents.permute(0, 2, 1).reshape(latents.shape[0], latents.shape[2], h, w)

    def vae_latents(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Tokens → the VAE's latents (B, 32, 2h, 2w): un-normalised and un-patchified, as stock decodes."""
        z = self.unpack(latents, geometry)
        mean, std = self._bn_stats(z)
        return self.pipe._unpatchify_latents(z * std + mean)

    def decode(self, latents, geometry):
        z = self.vae_latents(latents, geometry).to(self.vae.dtype)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def tokens_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, 32, 2h, 2w) → normalised tokens (B, h·w, 128), as stock's ``_encode_vae_image``."""
        z = self.pipe._patchify_latents(z)
        mean, std = self._bn_stats(z)
        return self.pipe._pack_latents((z - mean) / std)

    def encode(self, pixels, generator=None, sample=False):
        dist = self.vae.encode((pixels * 2 - 1).to(self.vae.dtype)).latent_dist
        return self.tokens_from_vae((dist.sample(generator) if sample else dist.mode()).float())


@register_adapter
class Flux2KleinPolicy(Flux2Policy):
    """FLUX.2 [klein]: Qwen3 text encoder; CFG against the empty prompt unless step-distilled."""

    family = "flux2-klein"
    pipeline_class_names = ("Flux2KleinPipeline",)
    embedded_guidance = False
    stock_text_layers = (9, 18, 27)

    @property
    def distilled(self) -> bool:
        """Step-distilled [klein] (``is_distilled``): stock ignores ``guidance_scale`` and runs no CFG."""
        return bool(self.pipe.config.get("is_distilled", False))

    def _uncond(self, prompts, negative_prompts, scale, length, **kwargs):
        if scale <= 1 or self.distilled:
            return None
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        embeds, _ = self._encode_text(negatives, length, **kwargs)
        return {"encoder_hidden_states": embeds}
