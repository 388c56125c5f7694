"""HPSv2 / HPSv2.1: Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341).

An open_clip ViT-H-14 fine-tuned on HPD v2 human preferences; the score is the plain cosine of the
normalised image and text features (about 0.25-0.35 for typical generations). Images go through
HPSv2's own preprocessing: longest side to 224, zero-pad to a square, CLIP normalisation.

Needs the ``openclip`` extra (``pip install "visalign[openclip]"``). open_clip pulls torchvision,
which only works next to a matching torch build: on CPU-only machines give it its own environment
(``make test-openclip`` builds one).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from visalign.errors import CheckpointError, require
from visalign.rewards.base import Reward, freeze
from visalign.rewards.loading import load_state_dict
from visalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform

__all__ = ["HPSv2", "HPS_REPO", "HPS_FILES"]

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(Reward):
    """HPSv2 / v2.1 preference score: ``cos(image, text)`` under the fine-tuned open_clip model.

    Args:
        checkpoint (*optional*): the fine-tuned weights: a local ``.pt`` (read with
            ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` wrapper is unwrapped) or
            ``.safetensors`` file, a URL, a state dict, or a hub repo id (then the ``version``'s
            file is taken from it). Defaults to ``HPS_REPO`` when ``model`` is an architecture
            name, and to no loading when ``model`` is a module already built.
        version: ``"v2.0"`` or ``"v2.1"``; picks the hub file (default "v2.1").
        model: an open_clip architecture name (built with random
            weights, then ``checkpoint`` is loaded into it) or an open_clip ``CLIP`` module.
        tokenizer (*optional*): an open_clip tokenizer; defaults to the architecture's.
        batch_size (`int`, defaults to 16), torch_dtype, name, differentiable (defaults to `True`).

    Raises:
        MissingDependencyError: open_clip is not installed (names the ``openclip`` extra).
    """

    default_name = "hpsv2"

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        version: str = "v2.1",
        model: Any = "ViT-H-14",
        tokenizer: Any = None,
        batch_size: int | None = 16,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = True,
    ):
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        open_clip = require("open_clip", "openclip", "HPSv2")
        if version not in HPS_FILES:
            raise CheckpointError(f"HPSv2 version must be one of {sorted(HPS_FILES)}; got {version!r}.")
        arch = model if isinstance(model, str) else None
        if arch is not None:
            model = open_clip.create_model(arch, pretrained=None)
            if checkpoint is None:
                checkpoint = HPS_REPO
        if checkpoint is not None:
            filename = HPS_FILES[version]
            sd = load_state_dict(checkpoint, filename if isinstance(checkpoint, (str, os.PathLike)) else None)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise CheckpointError(
                    f"HPSv2 checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
                )
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        self.model = freeze(model)
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(arch) if arch else open_clip.tokenize
        self.tokenizer = tokenizer
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.transform = ImageTransform.hps(int(size), cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = self.transform(images, dtype=dtype)
        tokens = self.tokenizer(prompts).to(images.device)
        img = self.model.encode_image(pixels, normalize=True).float()
        txt = self.model.encode_text(tokens, normalize=True).float()
        return (img * txt).sum(-1)
