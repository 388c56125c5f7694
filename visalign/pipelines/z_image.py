"""Adapter for Z-Image (``ZImagePipeline``, family ``z-image``): Z-Image and Z-Image-Turbo.

What differs from the other flow families, all kept here:

- **Text.** A Qwen3 model reads the prompt through its chat template (thinking enabled), padded
  to ``max_sequence_length`` (512) with a mask; the penultimate hidden state *of the real tokens
  only* is the text condition, so each prompt has its own length. They are stored zero-padded with
  their lengths and handed to the transformer as the list of unpadded tensors it takes.
- **Model.** A single-stream DiT over a list of samples ``(C, 1, h, w)``; it is conditioned on
  ``t = 1 − σ`` (``(1000 − timestep) / 1000``) and predicts ``−v``; :meth:`forward` returns ``v``.
- **CFG convention.** Stock's ``guidance_scale`` w mixes ``c + w·(c − u)``, i.e. visalign's
  ``u + s·(c − u)`` with ``s = w + 1``. Here ``guidance_scale`` is visalign's s, as for every family
  (``<= 1``: no CFG, which is what trainers assume); stock's ``guidance_scale=w`` is visalign's
  ``w + 1``. Z-Image-Turbo runs without CFG (stock ``guidance_scale=0``, here 1); stock's default 5
  is 6 here. The conditional and negative branches run as one batched forward, conditional first,
  and combine as stock does. The negative prompt defaults to ``""`` (stock's).
- **Latents.** The FLUX.1 VAE (16 channels, ``latents / scaling_factor + shift_factor``), unpacked;
  ``sigmas = linspace(1, 1/N, N)``; ``mu`` is passed, but Z-Image's scheduler has static shift 3.

Stock equality: ``va.sample(policy, prompts, guidance_scale=s, sampler="ode")`` equals
``pipe(prompts, guidance_scale=s - 1)`` for the same generator. ``cfg_normalization`` and
``cfg_truncation`` (stock options, off by default) are not supported.
"""

from __future__ import annotations

import torch

from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.datatypes import _cat_batched
from visalign.pipelines.flow import PatchedFlowPolicy
from visalign.pipelines.registry import register_adapter


@register_adapter
class ZImagePolicy(PatchedFlowPolicy):
    """Z-Image text-to-image.

    Args:
        pipe: a ``ZImagePipeline``.
        max_sequence_length: the text length the prompts are padded to before encoding (stock 512).
    """

    family = "z-image"
    pipeline_class_names = ("ZImagePipeline",)
    default_guidance_scale = 6.0  # stock's default guidance_scale=5 in visalign's convention
    cfg_batched = True  # stock batches [cond, uncond] in one forward
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe, max_sequence_length: int = 512):
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length

    def default_geometry(self) -> Geometry:
        return Geometry(1024, 1024)  # stock's default size

    def _set_timesteps_kwargs(self, num_steps, geometry):
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        config = self.flow_scheduler().config
        h, w = self._latent_hw(geometry)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": get_default_z_image_sigmas(num_steps), "mu": mu}

    # ----------------------------------------------------------------- text
    def _encode_text(self, texts: list[str], length: int) -> list[torch.Tensor]:
        # The pipeline rewrites the list it is given in place (chat template), so pass a copy.
        return self.pipe._encode_prompt(prompt=list(texts), device=self.device, max_sequence_length=length)

    @staticmethod
    def _stack(embeds: list[torch.Tensor], length: int) -> dict:
        rows = [torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds]
        lengths = torch.tensor([e.shape[0] for e in embeds], device=embeds[0].device)
        return {"cap_feats": torch.stack(rows), "cap_lengths": lengths}

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        """Encodes prompts; ``guidance_scale`` > 1 runs CFG against the negative prompts (default ``""``)."""
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        length = kwargs.pop("max_sequence_length", self.max_sequence_length)
        embeds = self._encode_text(prompts, length)
        negative = None
        if scale > 1:
            negative = self._encode_text(
                list(negative_prompts) if negative_prompts is not None else [""] * len(prompts), length
            )
        longest = max(e.shape[0] for e in embeds + (negative or []))
        return Conditioning(
            cond=self._stack(embeds, longest),
            uncond=None if negative is None else self._stack(negative, longest),
            guidance_scale=scale,
        )

    # ----------------------------------------------------------------- model
    def forward(self, latents, timesteps, kwargs, shared):
        feats, lengths = kwargs["cap_feats"], kwargs["cap_lengths"].tolist()
        x = list(latents.to(self.dtype).unsqueeze(2).unbind(0))
        t = (1000 - timesteps.float()) / 1000  # the model is conditioned on 1 − σ
        out = self.run_denoiser(x, t, [f[:n] for f, n in zip(feats, lengths)], return_dict=False, **shared)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # the model predicts −v

    def predict(self, latents, timesteps, conditioning, detach_uncond=False):
        """The guided velocity; with CFG, stock's batched [cond, uncond] forward and ``c + (s−1)·(c − u)``."""
        if not conditioning.do_cfg or detach_uncond or not self.cfg_batched:
            return super().predict(latents, timesteps, conditioning, detach_uncond)
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        both = _cat_batched([conditioning.cond, conditioning.uncond])
        out = self.forward(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both, conditioning.shared)
        # forward returned −(model output); stock mixes the model outputs, which is the same up to sign.
        cond, uncond = (-out).chunk(2)
        return -(cond + (conditioning.guidance_scale - 1) * (cond - uncond))

    # ----------------------------------------------------------------- latents
    def noise_shape(self, batch_size, geometry):
        return (batch_size, self.denoiser.config.in_channels, *self._latent_hw(geometry))

    def decode(self, latents, geometry):
        return self._decode_unpacked(latents)

    def encode(self, pixels, generator=None, sample=False):
        return self._encode_unpacked(pixels, generator, sample)
