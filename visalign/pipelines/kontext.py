"""Adapter for FLUX.1 Kontext (``FluxKontextPipeline``, family ``flux-kontext``): instruction
editing, image + instruction → image.

Everything of :mod:`visalign.pipelines.flux` (CLIP + T5 text, 2x2 packing, embedded guidance,
optional true CFG, ``linspace`` σ with a ``mu`` from the packed output length) plus the source:
its VAE latents (the distribution's mode, ``(z − shift) · scale``), packed, are concatenated after
the noisy tokens, with position ids whose first coordinate is 1; only the first tokens of the
output (the noisy ones) are the velocity.

Sizes. Stock resizes the *output* to about ``max_area`` pixels (default 1 MP) whatever
``height``/``width`` say, and (``_auto_resize=True``) snaps the *source* to the nearest of Kontext's
preferred resolutions (about 1 MP). Here the output is exactly ``height`` × ``width`` and the source
is encoded at its own size (which must be a multiple of :attr:`spatial_multiple`; trainers resize
the ``image`` column to the run's size), i.e. stock's ``max_area=height*width, _auto_resize=False``;
``va.wrap(pipe, auto_resize=True)`` snaps the source as stock's default does::

    va.sample(policy, ["make the circle red"], images=sources, height=512, width=512, sampler="ode")
    # == pipe(image=to_pil(source), prompt=..., height=512, width=512, max_area=512 * 512, _auto_resize=False)

The source goes through the pipeline's own PIL path (8-bit), so a source tensor gives what stock
gives for the PIL image of that tensor. Each sample may have its own source.
"""

from __future__ import annotations

import torch

from visalign.errors import InvalidInputError, UnsupportedPipelineError
from visalign.pipelines.base import Conditioning
from visalign.pipelines.flux import FluxPolicy
from visalign.pipelines.qwen_image_edit import to_pil
from visalign.pipelines.registry import register_adapter


@register_adapter
class FluxKontextPolicy(FluxPolicy):
    """FLUX.1 Kontext [dev]: each sample edits its own source image.

    Args:
        pipe: a ``FluxKontextPipeline``.
        auto_resize: snap sources to Kontext's preferred resolutions (stock's ``_auto_resize``);
            default False: sources are encoded at their own size.
        max_sequence_length: the T5 length (stock 512).
    """

    family = "flux-kontext"
    pipeline_class_names = ("FluxKontextPipeline",)
    default_guidance_scale = 3.5  # stock __call__ default (Kontext [dev]'s model card suggests 2.5)
    needs_image = True
    image_role = "source image (instruction editing)"

    def __init__(self, pipe, auto_resize: bool = False, max_sequence_length: int = 512):
        super().__init__(pipe, max_sequence_length=max_sequence_length)
        self.auto_resize = auto_resize

    def _validate_pipeline(self):
        super()._validate_pipeline()
        if any(k.__name__ == "FluxKontextInpaintPipeline" for k in type(self.pipe).__mro__):
            raise UnsupportedPipelineError(
                "FluxKontextInpaintPipeline (masked editing) is not supported by visalign; use FluxKontextPipeline."
            )

    def source_size(self, images: torch.Tensor) -> tuple[int, int]:
        """(height, width) the sources are encoded at, as stock computes it."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        height, width = images.shape[-2:]
        m = self.spatial_multiple
        if self.auto_resize:
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        elif height % m or width % m:
            near = lambda v: max(m, round(v / m) * m)  # noqa: E731
            raise InvalidInputError(
                f"{self.family}: source images of {height}x{width} px; their height and width must be multiples "
                f"of {m} (VAE factor x 2x2 packing). Resize them, e.g. to {near(height)}x{near(width)}, or wrap "
                f"with va.wrap(pipe, auto_resize=True) to snap them to Kontext's preferred resolutions."
            )
        return height // m * m, width // m * m

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
        """Encodes the instructions (as FLUX.1) and the sources' packed latents and position ids."""
        if images is None:
            raise InvalidInputError(
                f"{self.family} edits images: pass the source images, images=Tensor(B, 3, H, W) in [0, 1], "
                f"one per instruction (va.sample(policy, instructions, images=sources))."
            )
        if images.shape[0] != len(prompts):
            raise InvalidInputError(
                f"Got {images.shape[0]} source images for {len(prompts)} instructions; "
                f"pass one source image per instruction."
            )
        height, width = self.source_size(images)
        conditioning = super().encode_prompt(
            prompts, negative_prompts, guidance_scale, None, geometry, true_cfg_scale=true_cfg_scale, **kwargs
        )
        processor = self.pipe.image_processor
        pixels = processor.preprocess([processor.resize(im, height, width) for im in to_pil(images)], height, width)
        source = self.pipe._encode_vae_image(pixels.to(self.vae.device, self.vae.dtype), None)
        b, c, h, w = source.shape
        source = self.pipe._pack_latents(source, b, c, h, w).to(self.dtype)
        conditioning.cond["image_latents"] = source
        if conditioning.uncond is not None:
            conditioning.uncond["image_latents"] = source  # stock gives both branches the source
        shared = conditioning.shared
        ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, shared["img_ids"].dtype)
        ids[..., 0] = 1
        shared["img_ids"] = torch.cat([shared["img_ids"], ids], dim=0)
        return conditioning

    def forward(self, latents, timesteps, kwargs, shared):
        kwargs = dict(kwargs)
        source = kwargs.pop("image_latents")
        hidden = torch.cat([latents, source.to(latents.dtype)], dim=1)
        return super().forward(hidden, timesteps, kwargs, shared)[:, : latents.shape[1]]
