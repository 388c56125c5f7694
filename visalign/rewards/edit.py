"""A reward for instruction editing: did the edit follow the instruction, and is the rest preserved?

:class:`EditReward` scores an edited image against its source image and instruction:

- **instruction** (the main term): a VLM sees the source first and the edited image second and is
  asked whether the second applies the instruction to the first; the score is P("yes")
  (normalised against "no" by default) — :class:`~visalign.rewards.YesTokenReward` in its
  pairwise mode, with an editing question (the yes-token framing of RewardDance, arXiv 2509.08826,
  and VQAScore, arXiv 2404.01291; EditReward-style judges ask the same of both images);
- **preservation** (optional, ``preservation_weight > 0``): how much of the source survives.
  ``"clip"`` (default) is the cosine similarity of the two images' CLIP embeddings, Flow-GRPO's
  ``image_similarity`` term for FLUX.1 Kontext and Qwen-Image-Edit (weights 0.5 and 0.2 there).
  It is chosen as the default because an instruction-following judge alone is satisfied by a new
  image that merely shows the requested content; CLIP similarity penalises that drift while
  tolerating the local change an edit makes (a pixel distance would punish the edit itself as
  much as the drift). ``"pixel"`` is ``1 − mean |edited − source|`` (no model: for sources and
  outputs of the same framing, e.g. the toy world, or as a cheap regulariser).

The total is ``instruction + preservation_weight · preservation``; both parts are reported
(``RewardResult.raw["instruction"]``, ``["preservation"]``).

The source images come as ``source_images=`` (a (B, 3, H, W) tensor in [0, 1]; e.g.
``va.best_of_n(policy, instructions, reward, images=sources, reward_kwargs={"source_images": sources})``),
or from a prompt file's ``image`` column (what trainers pass today: PIL images or file paths;
relative paths resolve against ``image_dir``, else the working directory). Sources are resized to
the edited images' size.

Recipe name: ``reward: {edit: {type: EditReward, model: Qwen/Qwen2.5-VL-7B-Instruct}}``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.rewards.base import Reward
from visalign.rewards.checks import check_images
from visalign.rewards.result import RewardResult

__all__ = ["EditReward", "DEFAULT_EDIT_QUESTION", "pixel_similarity"]

DEFAULT_EDIT_QUESTION = (
    "The first image is the original and the second image is an edited version of it. Does the second image "
    'apply the instruction "{prompt}" to the first image, changing nothing else? Please answer yes or no.'
)


def pixel_similarity(images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """``1 − mean |images − sources|`` per sample, in [0, 1]; both (B, 3, H, W) in [0, 1]."""
    return 1 - (images.float() - sources.float()).abs().flatten(1).mean(1)


class EditReward(Reward):
    """VLM yes-token instruction following (+ optional preservation) for instruction editing.

    Args:
        model: the VLM (hub id / folder for ``AutoModelForImageTextToText``, or a built model), e.g.
            ``"Qwen/Qwen2.5-VL-7B-Instruct"``.
        processor: its processor; defaults to ``model`` when a string.
        question: the question with ``{prompt}`` (the instruction); the source is shown first.
        preservation: ``"clip"`` (default), ``"pixel"`` or ``None``.
        preservation_weight: the weight of the preservation term (default 0.2; 0 turns it off).
        clip_model, clip_processor: the CLIP model of ``"clip"`` preservation (hub id, folder or
            built model; default ``"openai/clip-vit-large-patch14"``, as Flow-GRPO's similarity).
        image_dir: the folder relative paths of an ``image`` column resolve against (a recipe's
            prompt-file folder); None: the working directory.
        normalize, system_prompt, yes_words, no_words: as for :class:`~visalign.rewards.YesTokenReward`.
        batch_size, torch_dtype, name: as for every :class:`Reward`.
    """

    default_name = "edit"
    default_differentiable = False

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        question: str = DEFAULT_EDIT_QUESTION,
        preservation: str | None = "clip",
        preservation_weight: float = 0.2,
        clip_model: Any = "openai/clip-vit-large-patch14",
        clip_processor: Any = None,
        image_dir: str | None = None,
        normalize: bool = True,
        system_prompt: str | None = None,
        yes_words: Sequence[str] = ("yes",),
        no_words: Sequence[str] = ("no",),
        batch_size: int | None = 8,
        torch_dtype: torch.dtype | str | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name, differentiable=False, batch_size=batch_size)
        from visalign.rewards.vlm import YesTokenReward

        if isinstance(torch_dtype, str):  # a recipe writes "bfloat16"
            torch_dtype = getattr(torch, torch_dtype)
        if preservation not in ("clip", "pixel", None):
            raise ConfigError(f"EditReward: preservation must be 'clip', 'pixel' or None; got {preservation!r}.")
        if preservation_weight < 0:
            raise ConfigError(f"EditReward: preservation_weight must be >= 0; got {preservation_weight}.")
        self.judge = YesTokenReward(
            model,
            processor,
            mode="pairwise",
            pairwise_question=question,
            normalize=normalize,
            system_prompt=system_prompt,
            yes_words=yes_words,
            no_words=no_words,
            batch_size=None,
            torch_dtype=torch_dtype,
            name=f"{self.name}/instruction",
        )
        self.image_dir = image_dir
        self.preservation = preservation if preservation_weight > 0 else None
        self.preservation_weight = float(preservation_weight) if self.preservation else 0.0
        self.clip = None
        if self.preservation == "clip":
            from visalign.rewards.clip import CLIPEmbedder

            self.clip = CLIPEmbedder(
                clip_model,
                clip_processor,
                torch_dtype=torch_dtype,
                vision_only=isinstance(clip_model, (str, os.PathLike)),
            )

    def sources(self, images: torch.Tensor, source_images: Any = None, image: Any = None) -> torch.Tensor:
        """The source images as a (B, 3, H, W) tensor at the edited images' size."""
        batch, size = images.shape[0], tuple(images.shape[-2:])
        if source_images is None and image is not None:
            if isinstance(image, torch.Tensor):
                source_images = image
            else:
                from visalign.training.prompts import load_images

                values = list(image) if isinstance(image, (list, tuple)) else [image]
                source_images = load_images(
                    [{"image": v} for v in values], "image", base_dir=getattr(self, "image_dir", None), size=size
                )
        if source_images is None:
            raise InvalidInputError(
                f"{self.name} scores an edit against its source image: pass source_images=Tensor(B, 3, H, W) in "
                f"[0, 1] (steering: reward_kwargs={{'source_images': sources}}), or train from a prompt file "
                f"with an 'image' column."
            )
        source_images = check_images(source_images, "image", name=f"{self.name} source_images")
        if source_images.shape[0] != batch:
            raise InvalidInputError(
                f"{self.name}: got {source_images.shape[0]} source images for {batch} "
                f"edited images; pass one source per edited image."
            )
        source_images = source_images.to(images.device, torch.float32)
        if tuple(source_images.shape[-2:]) != size:
            source_images = torch.nn.functional.interpolate(
                source_images, size=size, mode="bilinear", antialias=True, align_corners=False
            ).clamp(0, 1)
        return source_images

    def preservation_score(self, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """The preservation term alone, (B,)."""
        if self.preservation == "pixel":
            return pixel_similarity(images, sources)
        if self.clip is None:
            raise ConfigError(f"{self.name}: preservation is off (preservation=None or weight 0).")
        both = self.clip.image_features(torch.cat([images, sources]).float())
        a, b = both.chunk(2)
        return (a * b).sum(-1)

    def score_parts(
        self, images: torch.Tensor, prompts: list[str], source_images: Any = None, image: Any = None
    ) -> RewardResult:
        sources = self.sources(images, source_images, image)
        instruction = self.judge.score(images, list(prompts), reference_images=sources).float()
        parts = {"instruction": instruction}
        weights = {"instruction": 1.0}
        if self.preservation is not None:
            parts["preservation"] = self.preservation_score(images, sources).float()
            weights["preservation"] = self.preservation_weight
        components = {k: weights[k] * v for k, v in parts.items()}
        return RewardResult(sum(components.values()), components, parts, weights)

    def score(
        self, images: torch.Tensor, prompts: list[str], source_images: Any = None, image: Any = None
    ) -> torch.Tensor:
        return self.score_parts(images, prompts, source_images, image).total
