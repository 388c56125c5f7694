"""Adapter for Qwen-Image-Edit (``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline``,
family ``qwen-image-edit``): instruction editing, image + instruction → image.

Everything of :mod:`visalign.pipelines.qwen_image` (text template, true CFG with the norm rescale,
packing, VAE normalisation, schedule) plus the source image, which enters twice:

- **to the VLM**: the prompt template holds ``<|vision_start|><|image_pad|><|vision_end|>`` and the
  processor turns the source into image tokens, so the text condition depends on the source
  (64 template tokens are dropped). Edit-Plus (2509/2511) writes ``"Picture 1: "`` before them
  and shows the VLM the source at about 384² pixels;
- **to the denoiser**: the source's normalised VAE latents (the distribution's mode), packed, are
  concatenated after the noisy tokens, with their own entry in ``img_shapes``; only the first
  tokens of the output (the noisy ones) are the velocity.

The source goes through the pipeline's own PIL path (8-bit, PIL resize), so a source tensor gives
what stock gives for the PIL image of that tensor. Stock resizes it to about 1 MP
(``calculate_dimensions(1024², aspect)``) for both the VAE and (Edit) the VLM; here ``source_area``
sets that area: ``None`` (default) uses the output's area (Flow-GRPO's ``max_area=resolution²``),
which keeps the sequence short during training; ``source_area=1024**2`` reproduces stock::

    policy = va.wrap(pipe, source_area=1024 * 1024)
    va.sample(policy, ["make the circle red"], images=sources, guidance_scale=4.0, sampler="ode")
    # == pipe(image=[to_pil(s) for s in sources], prompt=[...], negative_prompt=[" "], true_cfg_scale=4.0)

Each sample has its own source (stock repeats one image for a batch; Edit-Plus takes one prompt).
"""

from __future__ import annotations

import math

import torch

from visalign.errors import InvalidInputError, UnsupportedPipelineError
from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.qwen_image import QwenImagePolicy, pad_text
from visalign.pipelines.registry import register_adapter

#: Edit-Plus shows the VLM its source at about this many pixels (diffusers' CONDITION_IMAGE_SIZE).
PLUS_CONDITION_AREA = 384 * 384
#: The area stock resizes the source to for the VAE (and, in Edit, for the VLM).
STOCK_SOURCE_AREA = 1024 * 1024


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) floats in [0, 1] → B RGB PIL images, rounded to 8 bits."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at aspect ``ratio`` = w / h, each a multiple of 32 (as stock)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


@register_adapter
class QwenImageEditPolicy(QwenImagePolicy):
    """Qwen-Image-Edit and Qwen-Image-Edit-Plus: each sample edits its own source image.

    Args:
        pipe: a ``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``.
        source_area: the pixel area the source is resized to for the VAE (and Edit's VLM); ``None``
            uses the output's ``height × width``; ``1024 * 1024`` is stock.
        negative_prompt, max_sequence_length: as for :class:`~visalign.pipelines.qwen_image.QwenImagePolicy`.
    """

    family = "qwen-image-edit"
    pipeline_class_names = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    needs_image = True
    image_role = "source image (instruction editing)"

    def __init__(self, pipe, source_area: int | None = None, **kwargs):
        super().__init__(pipe, **kwargs)
        self.source_area = source_area

    @property
    def plus(self) -> bool:
        """True for Edit-Plus (``"Picture 1: "`` template, 384² VLM view)."""
        return any(k.__name__ == "QwenImageEditPlusPipeline" for k in type(self.pipe).__mro__)

    def _validate_pipeline(self):
        super()._validate_pipeline()
        names = [k.__name__ for k in type(self.pipe).__mro__]
        if "QwenImageEditInpaintPipeline" in names:
            raise UnsupportedPipelineError(
                "QwenImageEditInpaintPipeline (masked editing) is not supported by visalign; use "
                "QwenImageEditPipeline or QwenImageEditPlusPipeline."
            )
        if getattr(self.pipe, "processor", None) is None:
            raise UnsupportedPipelineError(
                f"{type(self.pipe).__name__} has no 'processor' (the Qwen2-VL processor that shows the source "
                f"image to the text encoder); load the full pipeline."
            )

    def check_sources(self, images: torch.Tensor | None) -> torch.Tensor:
        """Validates the source images: one (3, H, W) image in [0, 1] per prompt, sides of at least 32 px."""
        if images is None:
            raise InvalidInputError(
                f"{self.family} edits images: pass the source images, images=Tensor(B, 3, H, W) in [0, 1], "
                f"one per instruction (va.sample(policy, instructions, images=sources))."
            )
        height, width = images.shape[-2:]
        if min(height, width) < 32 or max(height, width) > 200 * min(height, width):
            raise InvalidInputError(
                f"{self.family}: a source image of {height}x{width} px cannot be edited; each side must be at "
                f"least 32 px and the aspect ratio at most 200 (the Qwen2-VL image processor's limits). "
                f"Resize the sources, e.g. to the output size."
            )
        return images

    def source_dims(self, images: torch.Tensor, geometry: Geometry) -> tuple[int, int]:
        """(width, height) of the VAE view of sources of this size, as stock computes them."""
        height, width = images.shape[-2:]
        area = self.source_area or geometry.height * geometry.width
        return calculate_dimensions(area, width / height)

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        """Encodes the instructions with their source images (VLM) and the sources' VAE latents."""
        images = self.check_sources(images)
        if images.shape[0] != len(prompts):
            raise InvalidInputError(
                f"Got {images.shape[0]} source images for {len(prompts)} instructions; "
                f"pass one source image per instruction."
            )
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        geometry = geometry or self.default_geometry()
        length = kwargs.pop("max_sequence_length", self.max_sequence_length)
        pil = to_pil(images)
        vae_w, vae_h = self.source_dims(images, geometry)
        processor = self.pipe.image_processor
        if self.plus:
            cond_w, cond_h = calculate_dimensions(PLUS_CONDITION_AREA, pil[0].width / pil[0].height)
            vlm_images = [processor.resize(im, cond_h, cond_w) for im in pil]
            vae_pixels = torch.cat([processor.preprocess(im, vae_h, vae_w) for im in pil])
        else:
            vlm_images = [processor.resize(im, vae_h, vae_w) for im in pil]
            vae_pixels = processor.preprocess(vlm_images, vae_h, vae_w)
        cond, uncond = self._text_conditioning(prompts, negative_prompts, scale, length, images=vlm_images, **kwargs)
        source = self.pipe._encode_vae_image(vae_pixels.unsqueeze(2).to(self.vae.device, self.vae.dtype), None)
        b, c, _, h, w = source.shape
        source = self.pipe._pack_latents(source, b, c, h, w).to(self.dtype)
        cond["image_latents"] = source
        if uncond is not None:
            uncond["image_latents"] = source  # stock gives both branches the source
        f = self.pipe.vae_scale_factor
        out_h, out_w = self._latent_hw(geometry)
        shapes = ((1, out_h // 2, out_w // 2), (1, vae_h // f // 2, vae_w // f // 2))
        return Conditioning(cond=cond, uncond=uncond, guidance_scale=scale, shared={"img_shapes": shapes})

    def _encode_text(self, texts, length, images=None, **kwargs):
        if not self.plus:
            return self.pipe.encode_prompt(
                prompt=list(texts),
                image=images,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=length,
                **kwargs,
            )
        # Edit-Plus numbers the pictures of one prompt ("Picture 1: ..."), so each sample is encoded
        # on its own, as stock encodes its single prompt, then padded to a batch.
        parts = [
            self.pipe.encode_prompt(
                prompt=[text],
                image=[image],
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=length,
                **kwargs,
            )
            for text, image in zip(texts, images)
        ]
        longest = max(e.shape[1] for e, _ in parts)
        padded = [pad_text(e, m, longest) for e, m in parts]
        mask = torch.cat([m for _, m in padded])
        return torch.cat([e for e, _ in padded]), (None if bool(mask.all()) else mask)

    def _model_input(self, latents, kwargs, dtype):
        kwargs = dict(kwargs)
        source = kwargs.pop("image_latents")
        return torch.cat([latents.to(dtype), source.to(dtype)], dim=1), kwargs
