"""Adapter for Qwen-Image (``QwenImagePipeline``, family ``qwen-image``).

What differs from the other flow families, all kept here:

- **Text.** A Qwen2.5-VL model reads the prompt inside a fixed chat template; its last hidden
  state, minus the template's first ``prompt_template_encode_start_idx`` (34) tokens, is the text
  condition, with a padding mask. Prompts of one batch are padded to the longest; the denoiser
  masks the padding, and each forward trims the batch to its own longest prompt, as stock does
  for the batch it encodes.
- **CFG.** "True CFG" as two forwards, enabled by a negative prompt and ``true_cfg_scale > 1`` in
  stock. Here ``guidance_scale`` is that scale and the negative prompt defaults to ``" "`` (Qwen's
  model card and Flow-GRPO's training use ``" "``), so ``guidance_scale > 1`` means CFG as for every
  visalign family. The guided velocity is rescaled to the conditional one's norm per token
  (``comb · ‖cond‖ / ‖comb‖``, as stock does), so :meth:`predict` is overridden here.
- **Latents.** 16-channel latents of a Wan-style 3D VAE (8x), normalised per channel by the VAE's
  ``latents_mean``/``latents_std``, packed into 2x2 patches (64 features per token), the noise drawn
  as ``(B, 1, C, h, w)`` and packed, as stock draws it.
- **Schedule.** Stock passes ``sigmas = linspace(1, 1/N, N)`` and a ``mu`` from the packed sequence
  length (the scheduler shifts dynamically, exponentially, and stretches to ``shift_terminal``).
- **Timestep.** The model takes ``t / 1000`` (= σ), cast to the model dtype first, as stock does.

Stock equality: ``va.sample(policy, prompts, guidance_scale=s, sampler="ode")`` equals
``pipe(prompts, negative_prompt=[" "] * B, true_cfg_scale=s)`` for the same generator (and, with
``guidance_scale <= 1``, ``pipe(prompts)`` without a negative prompt).
"""

from __future__ import annotations

import numpy as np
import torch

from visalign.errors import UnsupportedPipelineError
from visalign.pipelines.base import Conditioning
from visalign.pipelines.flow import PatchedFlowPolicy
from visalign.pipelines.registry import register_adapter

#: The negative prompt of Qwen-Image's model card (and of Flow-GRPO's Qwen-Image training).
DEFAULT_NEGATIVE_PROMPT = " "


def pad_text(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads (B, L, D) text embeddings to ``length`` tokens; returns them with a (B, length) long mask."""
    batch, current = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(batch, current, dtype=torch.long, device=embeds.device)
    if current < length:
        embeds = torch.cat([embeds, embeds.new_zeros(batch, length - current, embeds.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(batch, length - current)], dim=1)
    return embeds, mask.long()


def trim_text(kwargs: dict) -> dict:
    """The batch's text trimmed to its longest prompt, the mask dropped when nothing is padded.

    Stock pads each encoded batch to its longest prompt and passes no mask when no token is
    padding; doing the same per forward keeps a selected sub-batch equal to encoding it alone.
    """
    kwargs = dict(kwargs)
    mask = kwargs["encoder_hidden_states_mask"]
    length = int(mask.sum(1).max())
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, :length]
    mask = mask[:, :length]
    kwargs["encoder_hidden_states_mask"] = None if bool(mask.all()) else mask
    return kwargs


@register_adapter
class QwenImagePolicy(PatchedFlowPolicy):
    """Qwen-Image text-to-image.

    Args:
        pipe: a ``QwenImagePipeline``.
        negative_prompt: the unconditional prompt of CFG when ``va.sample`` gets none (default
            ``" "``).
        max_sequence_length: the most text tokens kept (stock ``__call__`` default 512).
    """

    family = "qwen-image"
    pipeline_class_names = ("QwenImagePipeline",)
    default_guidance_scale = 4.0  # stock's true_cfg_scale
    cfg_batched = False  # stock runs the conditional and negative forwards separately
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipe, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, max_sequence_length: int = 512):
        super().__init__(pipe)
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length

    def _validate_pipeline(self):
        super()._validate_pipeline()
        config = self.denoiser.config
        unsupported = [
            name for name in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope") if config.get(name)
        ]
        if unsupported:
            raise UnsupportedPipelineError(
                f"{type(self.pipe).__name__} has a transformer with {', '.join(unsupported)}=True (a guidance-"
                f"distilled or layered Qwen-Image variant), which visalign does not support. Use Qwen-Image "
                f"(Qwen/Qwen-Image) or Qwen-Image-Edit (Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509)."
            )

    def _set_timesteps_kwargs(self, num_steps, geometry):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        config = self.flow_scheduler().config
        h, w = self._latent_hw(geometry)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    # ----------------------------------------------------------------- text
    def _encode_text(self, texts: list[str], length: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.pipe.encode_prompt(
            prompt=list(texts), device=self.device, num_images_per_prompt=1, max_sequence_length=length, **kwargs
        )

    def _text_conditioning(self, prompts, negative_prompts, scale, length, **kwargs):
        """(cond, uncond) text kwargs, padded to one length so that they batch together."""
        embeds, mask = self._encode_text(prompts, length, **kwargs)
        negative = negative_mask = None
        if scale > 1:
            negatives = [self.negative_prompt] * len(prompts) if negative_prompts is None else list(negative_prompts)
            negative, negative_mask = self._encode_text(negatives, length, **kwargs)
        longest = max(embeds.shape[1], 0 if negative is None else negative.shape[1])
        embeds, mask = pad_text(embeds, mask, longest)
        cond = {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
        uncond = None
        if negative is not None:
            negative, negative_mask = pad_text(negative, negative_mask, longest)
            uncond = {"encoder_hidden_states": negative, "encoder_hidden_states_mask": negative_mask}
        return cond, uncond

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        """Encodes prompts; ``guidance_scale`` > 1 runs true CFG against the negative prompts."""
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        geometry = geometry or self.default_geometry()
        length = kwargs.pop("max_sequence_length", self.max_sequence_length)
        cond, uncond = self._text_conditioning(prompts, negative_prompts, scale, length, **kwargs)
        h, w = self._latent_hw(geometry)
        return Conditioning(
            cond=cond, uncond=uncond, guidance_scale=scale, shared={"img_shapes": ((1, h // 2, w // 2),)}
        )

    # ----------------------------------------------------------------- model
    def combine_guidance(self, uncond, cond, scale):
        """Stock's CFG, ``u + s·(c − u)`` rescaled per token to ‖c‖."""
        combined = super().combine_guidance(uncond, cond, scale)
        return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))

    def _model_input(self, latents: torch.Tensor, kwargs: dict, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        """The denoiser's hidden states and the remaining keyword inputs (edit adapters append the source)."""
        return latents.to(dtype), kwargs

    def forward(self, latents, timesteps, kwargs, shared):
        dtype = self.dtype  # one lookup per call: a module's dtype walks its parameters
        shared = dict(shared)
        img_shapes = [list(shared.pop("img_shapes"))] * latents.shape[0]
        hidden, kwargs = self._model_input(latents, trim_text(kwargs), dtype)
        # Stock casts t to the latents' (model) dtype before dividing by 1000.
        t = timesteps.to(dtype) / 1000
        out = self.run_denoiser(
            hidden_states=hidden, timestep=t, img_shapes=img_shapes, return_dict=False, **kwargs, **shared
        )[0]
        return out[:, : latents.shape[1]]

    # ----------------------------------------------------------------- latents
    def noise_shape(self, batch_size, geometry):
        return (batch_size, 1, self.denoiser.config.in_channels // 4, *self._latent_hw(geometry))

    def to_model_layout(self, latents):
        b, _, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _latent_stats(self, like: torch.Tensor):
        config = self.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(view).to(like.device, like.dtype)
        return mean, inv_std

    def decode(self, latents, geometry):
        z = self.pipe._unpack_latents(latents, geometry.height, geometry.width, self.pipe.vae_scale_factor)
        z = z.to(self.vae.dtype)
        mean, inv_std = self._latent_stats(z)  # stock divides by the reciprocal std (pipeline_qwenimage)
        image = self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, 1, h, w) → the denoiser's normalised latents, as stock's ``_encode_vae_image``."""
        config = self.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(z.device, z.dtype)
        std = torch.tensor(config.latents_std).view(view).to(z.device, z.dtype)
        return (z - mean) / std

    def encode(self, pixels, generator=None, sample=False):
        """Pixels (B, 3, H, W) in [0, 1] → packed, normalised latents (B, h·w/4, 4C)."""
        dist = self.vae.encode((pixels * 2 - 1).unsqueeze(2).to(self.vae.dtype)).latent_dist
        z = self.normalize_latents(dist.sample(generator) if sample else dist.mode())
        b, c, _, h, w = z.shape
        return self.pipe._pack_latents(z.float(), b, c, h, w)
