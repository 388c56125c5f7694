"""The LAION aesthetic predictor ("improved aesthetic predictor", C. Schuhmann, 2022).

An MLP on the L2-normalised CLIP ViT-L/14 image embedding, trained on SAC + LAION-Logos + AVA
ratings; scores run roughly from 1 to 10. The released checkpoint
``sac+logos+ava1-l14-linearMSE.pth`` is a plain state dict of the layers below (768 -> 1024 ->
128 -> 64 -> 16 -> 1, dropouts 0.2 / 0.2 / 0.1, no activations), which :class:`AestheticMLP`
loads as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visalign.errors import CheckpointError
from visalign.rewards.base import Reward, freeze
from visalign.rewards.clip import CLIPEmbedder
from visalign.rewards.loading import load_state_dict

__all__ = ["Aesthetic", "AestheticMLP", "AESTHETIC_URL"]

AESTHETIC_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)


class AestheticMLP(nn.Module):
    """The predictor head: ``Linear(d, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64)
    Dropout Linear(64, 16) Linear(16, 1)``, parameter names as in the released checkpoint.

    Args:
        input_dim: the CLIP embedding size (768 for ViT-L/14) (default 768).
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Maps (B, input_dim) normalised embeddings to (B,) scores."""
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> AestheticMLP:
        """Builds the MLP with the input size the weights imply and loads them strictly."""
        if "layers.0.weight" not in state_dict:
            raise CheckpointError(
                f"not an aesthetic-predictor state dict: no 'layers.0.weight' among keys {sorted(state_dict)[:6]}..."
            )
        mlp = cls(int(state_dict["layers.0.weight"].shape[1]))
        try:
            mlp.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"aesthetic predictor weights do not fit: {exc}") from exc
        return mlp


class Aesthetic(Reward):
    """LAION aesthetic score: ``MLP(e / ||e||)`` with ``e`` the CLIP image embedding.

    Prompts are ignored (pass them or ``None``).

    Args:
        predictor: an
            :class:`AestheticMLP`, a state dict, a local ``.pth``/``.pt`` (read with
            ``torch.load(weights_only=True)``) or ``.safetensors`` file, a URL, or a hub repo id
            together with ``predictor_filename``.
        clip_model: hub id / folder (its vision
            tower is loaded with ``CLIPVisionModelWithProjection``) or a built CLIP model.
        processor (*optional*): a ``CLIPProcessor`` or image processor whose settings define the
            preprocessing; defaults to ``clip_model`` when that is a string.
        predictor_filename: the file inside a hub repo or folder.
        batch_size, torch_dtype, name, differentiable: as for every :class:`Reward` (defaults 32, fp32,
            the class name, True).
    """

    default_name = "aesthetic"
    needs_prompts = False

    def __init__(
        self,
        predictor: Any = AESTHETIC_URL,
        clip_model: Any = "openai/clip-vit-large-patch14",
        processor: Any = None,
        *,
        predictor_filename: str | None = None,
        batch_size: int | None = 32,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = True,
    ):
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        self.clip = CLIPEmbedder(clip_model, processor, torch_dtype=torch_dtype, vision_only=True)
        if not isinstance(predictor, nn.Module):
            predictor = AestheticMLP.from_state_dict(load_state_dict(predictor, predictor_filename))
        self.mlp = freeze(predictor.float())

    def score(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        return self.mlp(self.clip.image_features(images, normalize=True).float())
