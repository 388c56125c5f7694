"""CLIP-based rewards: CLIPScore and PickScore (transformers ``CLIPModel``).

Both embed the image (torch preprocessing, so differentiable) and the prompt, and score the
cosine similarity of the two embeddings:

- :class:`CLIPScore` (Hessel et al. 2021, arXiv 2104.08718), in three documented variants;
- :class:`PickScore` (Kirstain et al. 2023, arXiv 2305.01569): ``logit_scale.exp() * cos``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from visalign.errors import ConfigError
from visalign.rewards.base import Reward, freeze
from visalign.rewards.loading import from_pretrained
from visalign.rewards.preprocess import ImageTransform

__all__ = ["CLIPScore", "PickScore", "CLIPEmbedder"]


def _features(out: Any) -> torch.Tensor:
    """The embedding from ``get_image_features``/``get_text_features`` (tensor or output object)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find the embedding in {type(out).__name__}")


class CLIPEmbedder(torch.nn.Module):
    """A frozen CLIP model with torch image preprocessing and its tokenizer.

    Args:
        model: a hub id / local folder (loaded with ``CLIPModel.from_pretrained``), or a built
            ``CLIPModel`` (or ``CLIPVisionModelWithProjection`` when only images are embedded).
        processor: a ``CLIPProcessor`` (hub id, folder or object). Its image settings define the
            preprocessing and its tokenizer encodes prompts. Defaults to ``model`` when that is a
            string; with a built model and no processor, preprocessing falls back to CLIP's
            (shortest side, centre crop at the model's ``image_size``) and prompts cannot be encoded.
        torch_dtype: the dtype to load weights in.
        vision_only: load ``CLIPVisionModelWithProjection`` from a hub id (for image-only rewards).
    """

    def __init__(
        self, model: Any, processor: Any = None, *, torch_dtype: torch.dtype | None = None, vision_only: bool = False
    ):
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection

        kwargs = {}
        if vision_only and isinstance(model, (str, os.PathLike)):
            kwargs["config"] = _vision_config(model)
        cls = CLIPVisionModelWithProjection if vision_only else CLIPModel
        with _quiet_if(vision_only):  # the text tower's weights are unexpected there, by design
            self.model = freeze(from_pretrained(cls, model, what="CLIP model", torch_dtype=torch_dtype, **kwargs))
        if processor is None and isinstance(model, (str, os.PathLike)):
            processor = model
        if isinstance(processor, (str, os.PathLike)):
            processor = from_pretrained(CLIPProcessor, processor, what="CLIP processor")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        if processor is not None:  # a full processor or a bare image processor
            self.transform = ImageTransform.from_processor(processor)
        else:
            self.transform = ImageTransform.clip(_image_size(self.model))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeds [0, 1] images (B, 3, H, W); L2-normalised when ``normalize``."""
        pixels = self.transform(images, dtype=self.dtype)
        if hasattr(self.model, "get_image_features"):
            feats = _features(self.model.get_image_features(pixel_values=pixels))
        else:
            feats = _features(self.model(pixel_values=pixels))
        feats = feats.float()
        return feats / feats.norm(dim=-1, keepdim=True) if normalize else feats

    def text_features(self, prompts: list[str], normalize: bool = True) -> torch.Tensor:
        """Embeds prompts (truncated to the tokenizer's maximum); each distinct prompt once."""
        if self.tokenizer is None:
            raise ConfigError(
                "this CLIP reward has no tokenizer: pass processor= (a CLIPProcessor or its hub id) to encode prompts."
            )
        unique = list(dict.fromkeys(prompts))
        device = next(self.model.parameters()).device
        max_len = getattr(self.tokenizer, "model_max_length", 77)
        max_len = 77 if max_len is None or max_len > 10_000 else max_len
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(
            device
        )
        feats = _features(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        ).float()
        if normalize:
            feats = feats / feats.norm(dim=-1, keepdim=True)
        position = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([position[p] for p in prompts], device=device)
        return feats[index]

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its prompt, shape (B,)."""
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


@contextlib.contextmanager
def _quiet_if(quiet: bool):
    """Silences transformers' load report (e.g. the unused text tower of a vision-only load)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _vision_config(source: Any) -> Any:
    """The vision config of a full CLIP checkpoint, with the top-level ``projection_dim``."""
    from transformers import AutoConfig, CLIPVisionConfig

    cfg = from_pretrained(AutoConfig, source, what="CLIP config")
    if getattr(cfg, "vision_config", None) is None:
        return cfg
    vision = CLIPVisionConfig(**cfg.vision_config.to_dict())
    vision.projection_dim = cfg.projection_dim
    return vision


def _image_size(model: Any) -> int:
    cfg = getattr(model, "config", None)
    vision = getattr(cfg, "vision_config", cfg)
    return int(getattr(vision, "image_size", 224))


class CLIPScore(Reward):
    r"""CLIPScore: how well an image matches its prompt under CLIP (Hessel et al., arXiv 2104.08718).

    With ``cos`` the cosine similarity of the L2-normalised image and text embeddings:

    - ``variant="hessel"`` (default): ``2.5 * max(cos, 0)`` with the caption prefixed
      ``"A photo depicts "``, as in the paper (typically 0.5-1.0 with ViT-B/32);
    - ``variant="cosine"``: the raw ``cos`` in [-1, 1], no prefix; the smooth choice for gradients
      (``max(., 0)`` has zero gradient where ``cos < 0``);
    - ``variant="torchmetrics"``: ``100 * max(cos, 0)``, no prefix, as ``torchmetrics``'
      ``CLIPScore`` reports it.

    Args:
        model: hub id,
            local folder, or built model.
        processor: defaults to ``model`` when it is a string.
        variant: see above (default "hessel").
        prefix: the caption prefix; defaults to the variant's.
        batch_size: images scored at once (default 32).
        torch_dtype: dtype to load the weights in.
        name, differentiable: as for every :class:`Reward` (defaults: the class name, True).

    Example::

        reward = CLIPScore()                     # downloads openai/clip-vit-base-patch32
        reward(images, ["a red cube"] * len(images))
    """

    default_name = "clipscore"
    VARIANTS = ("hessel", "cosine", "torchmetrics")

    def __init__(
        self,
        model: Any = "openai/clip-vit-base-patch32",
        processor: Any = None,
        *,
        variant: str = "hessel",
        prefix: str | None = None,
        batch_size: int | None = 32,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = True,
    ):
        if variant not in self.VARIANTS:
            raise ConfigError(f"CLIPScore variant must be one of {self.VARIANTS}; got {variant!r}.")
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        self.variant = variant
        self.prefix = ("A photo depicts " if variant == "hessel" else "") if prefix is None else prefix
        self.clip = CLIPEmbedder(model, processor, torch_dtype=torch_dtype)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = self.clip.cosine(images, [self.prefix + p for p in prompts])
        if self.variant == "hessel":
            return 2.5 * cos.clamp(min=0)
        if self.variant == "torchmetrics":
            return 100.0 * cos.clamp(min=0)
        return cos


class PickScore(Reward):
    r"""PickScore: a CLIP-H fine-tuned on Pick-a-Pic human preferences (Kirstain et al., arXiv 2305.01569).

    The score is ``logit_scale.exp() * cos(image, text)`` (about 20-23 for typical generations with
    the released model; ``logit_scale.exp()`` is about 100).

    Args:
        model: a hub id, a local folder or a loaded ``CLIPModel`` (default the released PickScore_v1).
        processor: a hub id, folder or ``CLIPProcessor`` (default the CLIP-H processor PickScore was
            trained with).
        batch_size, torch_dtype, name, differentiable: as for every :class:`Reward` (defaults 16, fp32,
            the class name, True).
    """

    default_name = "pickscore"

    def __init__(
        self,
        model: Any = "yuvalkirstain/PickScore_v1",
        processor: Any = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        *,
        batch_size: int | None = 16,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = True,
    ):
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        self.clip = CLIPEmbedder(model, processor, torch_dtype=torch_dtype)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scale = self.clip.model.logit_scale.float().exp()
        return scale * self.clip.cosine(images, prompts)
