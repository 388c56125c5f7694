"""Adapters for HunyuanVideo 1.5 text-to-video (``hunyuan-video15``) and image-to-video (``hunyuan-video15-i2v``).

What differs from the other video families, each as stock ``HunyuanVideo15Pipeline`` does it:

- **Text:** two encoders, each with its attention mask (the transformer masks padding): Qwen2.5-VL
  hidden states (the third-last layer, after the chat template's system prefix is cropped; 1000
  tokens) and ByT5 embeddings of the quoted text in the prompt (256 tokens; zeros without quotes).
  The negative prompt defaults to "".
- **CFG** is the pipeline's ``guider`` (``ClassifierFreeGuidance``): two forwards, conditional then
  unconditional, ``u + s·(c − u)``. ``guidance_scale`` defaults to the guider's (stock's ``__call__``
  has no such argument: set ``pipe.guider = pipe.guider.new(guidance_scale=s)`` for stock).
  A guider with ``guidance_rescale``, a ``start``/``stop`` window or another guidance method is refused.
- **Schedule:** stock gives the flow-match scheduler σ = linspace(1, 0, N+1)[:-1], which it shifts.
- **Latents** are (B, 32, F', H/16, W/16); the denoiser reads ``cat(latents, condition, mask)`` (65
  channels) and image tokens. Text-to-video: zero condition, mask and image tokens (the transformer
  then masks the image tokens). Image-to-video: the condition is the first frame's VAE latent
  (× ``scaling_factor``) on latent frame 0 with mask 1 there, and the image tokens are SigLIP's
  features of the image; stock sizes the video from the image (the ``target_size`` bucket of its
  aspect ratio), so give ``height``/``width`` of that bucket to reproduce stock. The step-distilled
  ``use_meanflow`` image-to-video transformers are refused.
- **VAE:** ``latents / scaling_factor``. visalign decodes and encodes one sample at a time: the
  diffusers 0.42 VAE attention fails on batches larger than one (stock needs
  ``pipe.vae.enable_slicing()`` to decode a batch).
- **dtype:** stock draws the initial noise and keeps the state in the transformer's dtype; visalign
  draws float32 noise and keeps a float32 state, so the two agree in float32 (the stock guarantee)
  and differ in bfloat16 from the first draw on.

**LoRA.** diffusers 0.42 has no LoRA loader mixin for these pipelines, so :meth:`save_lora` writes the
same file the other families write (``pytorch_lora_weights.safetensors``, keys ``transformer.…`` and the
adapter config as metadata), which the transformer itself loads::

    pipe = HunyuanVideo15Pipeline.from_pretrained("hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v")
    pipe.transformer.load_lora_adapter("runs/hunyuan15_grpo/lora", weight_name="pytorch_lora_weights.safetensors")

``policy.load_lora(folder)`` does the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from visalign.errors import InvalidInputError, UnsupportedPipelineError
from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.flow import FlowPolicy
from visalign.pipelines.registry import register_adapter

_ASPECT_RATIO = (16, 9)  # (width, height): stock text-to-video's default_aspect_ratio


@register_adapter
class HunyuanVideo15Policy(FlowPolicy):
    """HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``)."""

    family = "hunyuan-video15"
    pipeline_class_names = ("HunyuanVideo15Pipeline",)
    is_video = True
    cfg_batched = False  # the guider runs the conditional and unconditional forwards separately
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def _validate_pipeline(self) -> None:
        super()._validate_pipeline()
        self._check_guider()

    def _check_guider(self):
        from diffusers import ClassifierFreeGuidance

        guider = getattr(self.pipe, "guider", None)
        name = type(self.pipe).__name__
        if not isinstance(guider, ClassifierFreeGuidance):
            raise UnsupportedPipelineError(
                f"This {name} guides with {type(guider).__name__}; visalign reproduces classifier-free "
                f"guidance only. Set pipe.guider = ClassifierFreeGuidance(guidance_scale=...)."
            )
        if guider.guidance_rescale > 0 or guider._start != 0.0 or guider._stop != 1.0:
            raise UnsupportedPipelineError(
                f"This {name}'s guider has guidance_rescale={guider.guidance_rescale}, start={guider._start}, "
                f"stop={guider._stop}; visalign reproduces plain CFG on every step only. Set "
                f"pipe.guider = pipe.guider.new(guidance_rescale=0.0, start=0.0, stop=1.0)."
            )
        return guider

    # ----------------------------------------------------------------- geometry
    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.denoiser.config.patch_size

    def default_geometry(self) -> Geometry:
        height, width = self.pipe.video_processor.calculate_default_height_width(
            _ASPECT_RATIO[1], _ASPECT_RATIO[0], self.pipe.target_size
        )
        return Geometry(int(height), int(width), 121)

    def validate_num_frames(self, num_frames: int) -> int:
        k = self.pipe.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % k:
            near = max(1, round((num_frames - 1) / k) * k + 1)
            raise InvalidInputError(
                f"num_frames={num_frames} is not of the form {k}·n+1, which the HunyuanVideo 1.5 VAE needs. "
                f"Use num_frames={near}."
            )
        return num_frames

    def noise_shape(self, batch_size, geometry):
        f = self.pipe.vae_scale_factor_spatial
        frames = (geometry.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (batch_size, self.pipe.num_channels_latents, frames, geometry.height // f, geometry.width // f)

    def _set_timesteps_kwargs(self, num_steps, geometry):
        return {"sigmas": np.linspace(1.0, 0.0, num_steps + 1)[:-1]}

    # ----------------------------------------------------------------- conditioning
    @property
    def default_guidance_scale(self) -> float:  # the guider's, as stock
        return float(self.pipe.guider.guidance_scale)

    def _text(self, prompts):
        embeds, mask, embeds_2, mask_2 = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, dtype=self.dtype, batch_size=len(prompts)
        )
        return {
            "encoder_hidden_states": embeds,
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": embeds_2,
            "encoder_attention_mask_2": mask_2,
        }

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        if kwargs:
            raise InvalidInputError(f"{self.family} takes no encoding options; got {sorted(kwargs)}.")
        guider = self._check_guider()
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        # The guider's test (stock encodes the negative prompt only when CFG is on).
        off_at = 0.0 if guider.use_original_formulation else 1.0
        do_cfg = guider._enabled and not math.isclose(scale, off_at)
        cond = self._text(list(prompts))
        uncond = None
        if do_cfg:  # stock encodes prompt=None as "" per sample
            uncond = self._text(list(negative_prompts) if negative_prompts is not None else [""] * len(prompts))
        # The original formulation c + s·(c − u) is u + (s + 1)·(c − u).
        effective = scale + 1.0 if guider.use_original_formulation else scale
        return Conditioning(cond=cond, uncond=uncond, guidance_scale=effective)

    def forward(self, latents, timesteps, kwargs, shared):
        kwargs = dict(kwargs)
        batch, channels, frames, height, width = latents.shape
        first = kwargs.pop("image_latent", None)  # (B, C, 1, h, w), image-to-video only
        condition = latents.new_zeros(batch, channels, frames, height, width, dtype=self.dtype)
        mask = latents.new_zeros(batch, 1, frames, height, width, dtype=self.dtype)
        if first is not None:
            condition[:, :, :1] = first.to(self.dtype)
            mask[:, :, 0] = 1.0
        image_embeds = kwargs.pop("image_embeds", None)
        if image_embeds is None:  # text-to-video: zero image tokens, which the transformer masks out
            image_embeds = latents.new_zeros(
                batch, self.pipe.vision_num_semantic_tokens, self.pipe.vision_states_dim, dtype=self.dtype
            )
        hidden = torch.cat([latents.to(self.dtype), condition, mask], dim=1)
        return self.run_denoiser(
            hidden_states=hidden,
            image_embeds=image_embeds,
            timestep=timesteps.to(self.dtype),
            return_dict=False,
            **kwargs,
            **shared,
        )[0]

    # ----------------------------------------------------------------- VAE
    def _latent_affine(self):
        return 1.0 / self.vae.config.scaling_factor, 0.0

    def decode(self, latents, geometry):
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        video = torch.cat([self.vae.decode(z[i : i + 1], return_dict=False)[0] for i in range(z.shape[0])])
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)

    def _encode_video(self, video: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        """[-1, 1] video (B, 3, T, H, W) → scaled latents, one sample at a time (see the module docstring)."""
        latents = []
        for i in range(video.shape[0]):
            dist = self.vae.encode(video[i : i + 1].to(self.vae.dtype)).latent_dist
            latents.append(dist.sample(generator) if sample else dist.mode())
        return torch.cat(latents).float() * self.vae.config.scaling_factor

    def encode(self, pixels, generator=None, sample=False):
        """Video pixels (B, T, 3, H, W) in [0, 1] → latents (B, C, T', h, w)."""
        return self._encode_video(pixels.permute(0, 2, 1, 3, 4) * 2 - 1, generator, sample)

    # ----------------------------------------------------------------- LoRA (no pipeline loader)
    def _write_lora(self, save_directory, name, state, metadata) -> None:
        from diffusers.loaders.lora_base import LoraBaseMixin

        LoraBaseMixin._save_lora_weights(
            save_directory, lora_layers={name: state}, lora_metadata={name: metadata}, safe_serialization=True
        )

    def load_lora(self, path: str, adapter_name: str | None = None) -> None:
        """``pipe.transformer.load_lora_adapter(path, ...)``: diffusers has no pipeline LoRA loader here.

        ``path``: a folder written by :meth:`save_lora`, a ``.safetensors`` file or a hub id.
        """
        self.denoiser.load_lora_adapter(path, prefix="transformer", use_safetensors=True, adapter_name=adapter_name)


@register_adapter
class HunyuanVideo15I2VPolicy(HunyuanVideo15Policy):
    """HunyuanVideo 1.5 image-to-video (``HunyuanVideo15ImageToVideoPipeline``): each sample needs a first frame."""

    family = "hunyuan-video15-i2v"
    pipeline_class_names = ("HunyuanVideo15ImageToVideoPipeline",)
    needs_image = True

    def _validate_pipeline(self) -> None:
        super()._validate_pipeline()
        name = type(self.pipe).__name__
        if self.denoiser.config.use_meanflow:
            raise UnsupportedPipelineError(
                f"This {name}'s transformer has use_meanflow=True (a step-distilled variant that also reads the "
                f"next timestep); visalign supports the standard HunyuanVideo 1.5 image-to-video transformers."
            )
        for part in ("image_encoder", "feature_extractor"):
            if getattr(self.pipe, part, None) is None:
                raise InvalidInputError(
                    f"This {name} has no '{part}'; image-to-video needs it. Load the full pipeline."
                )

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        if images is None:
            raise InvalidInputError(
                f"{self.family} needs a first frame per prompt: pass images=Tensor(B, 3, H, W) in [0, 1]."
            )
        geometry = geometry or self.default_geometry()
        conditioning = super().encode_prompt(prompts, negative_prompts, guidance_scale, **kwargs)
        images = self._fit(images.float(), geometry)
        image_inputs = {"image_latent": self.image_latent(images, geometry), "image_embeds": self.image_embeds(images)}
        conditioning.cond.update(image_inputs)
        if conditioning.uncond is not None:
            conditioning.uncond.update(image_inputs)  # stock gives both branches the image
        return conditioning

    @staticmethod
    def _fit(images: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Scales and centre-crops images to the output size, as stock's ``resize_mode="crop"`` (no-op at it)."""
        height, width = images.shape[-2:]
        if (height, width) == (geometry.height, geometry.width):
            return images
        scale = max(geometry.height / height, geometry.width / width)
        size = (max(geometry.height, round(height * scale)), max(geometry.width, round(width * scale)))
        images = torch.nn.functional.interpolate(
            images, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        top, left = (size[0] - geometry.height) // 2, (size[1] - geometry.width) // 2
        return images[..., top : top + geometry.height, left : left + geometry.width].clamp(0, 1)

    def image_latent(self, images: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """The first frame's VAE latent (B, C, 1, h, w): the mode × ``scaling_factor``, as stock's."""
        pixels = self.pipe.video_processor.preprocess(images, height=geometry.height, width=geometry.width)
        return self._encode_video(pixels.to(self.vae.device).unsqueeze(2)).to(self.device)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """SigLIP's last hidden state of each image, from the same uint8 images stock's processor reads."""
        from PIL import Image

        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pil = [Image.fromarray(a) for a in arrays]
        encoder = self.pipe.image_encoder
        inputs = self.pipe.feature_extractor.preprocess(
            images=pil, do_resize=True, return_tensors="pt", do_convert_rgb=True
        )
        inputs = inputs.to(device=encoder.device, dtype=next(encoder.parameters()).dtype)
        return encoder(**inputs).last_hidden_state.to(device=self.device, dtype=self.dtype)
