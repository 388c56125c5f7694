"""ImageReward (Xu et al. 2023, arXiv 2304.05977): a BLIP image-text encoder with a preference head.

The model (THUDM's release, Apache-2.0) is BLIP's ViT-L/16 image encoder at 224 px and a BERT-base
text encoder that cross-attends to the image patches. The text is encoded together with the image
and the hidden state of its first token ([CLS]) goes through an MLP 768 -> 1024 -> 128 -> 64 -> 16
-> 1 (its ReLUs are commented out upstream, so in eval it is linear; the dropouts are off). The
score is that output standardised with the constants of the release::

    score = (mlp(h_cls) - 0.16717362830052426) / 1.0333394966054072

Here BLIP is built from transformers (``BlipVisionModel`` and ``BlipTextModel(add_pooling_layer=False)``
with cross-attention), and the released ``ImageReward.pt`` is loaded through a strict key map
(:func:`map_released_key`): every key of the file must land on a parameter and every parameter must
be filled, otherwise :class:`~visalign.errors.CheckpointError` lists the offending keys.

Preprocessing is in torch, hence differentiable: bicubic resize of the shorter side to 224
(antialiased, as PIL resizes), centre crop (torchvision's rounding), CLIP mean/std. Prompts are
tokenised with BERT's tokenizer extended by ``[DEC]`` (bos) and ``[ENC]`` (as BLIP's
``init_tokenizer`` does, giving the 30524-token vocabulary), padded to 35 tokens; the first token
stays ``[CLS]``, as in the release's ``score``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from visalign.errors import CheckpointError, ConfigError
from visalign.rewards.aesthetic import AestheticMLP
from visalign.rewards.base import Reward, freeze
from visalign.rewards.loading import from_pretrained, load_state_dict
from visalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_shortest_side

__all__ = [
    "ImageReward",
    "ImageRewardModel",
    "IMAGE_REWARD_REPO",
    "IMAGE_REWARD_FILE",
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_STD",
    "map_released_key",
    "blip_reward_configs",
]

IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_FILE = "ImageReward.pt"
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35

# Released keys that the reward does not use: the contrastive projections of BLIP's pre-training.
_DROPPED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")

# BLIP's timm-style ViT names -> transformers' BlipVisionModel names (after "blip.visual_encoder.").
_VISION_RULES = [
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"post_layernorm.\1"),
]


def map_released_key(key: str) -> str | None:
    """The :class:`ImageRewardModel` parameter a key of ``ImageReward.pt`` loads into.

    Returns ``None`` for keys the reward drops on purpose (``blip.vision_proj``, ``blip.text_proj``,
    ``position_ids`` buffers) and raises ``KeyError`` for keys it does not know.
    """
    if key.startswith(_DROPPED_PREFIXES) or key.endswith("position_ids"):
        return None
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder.") :]
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder.") :]
        for pattern, target in _VISION_RULES:
            if pattern.match(rest):
                return "vision." + pattern.sub(target, rest)
        raise KeyError(key)
    if key.startswith("mlp.layers."):
        return key
    raise KeyError(key)


def _inverse_key(name: str) -> str:
    """The released name of an :class:`ImageRewardModel` parameter (inverse of the map)."""
    if name.startswith("text."):
        return "blip.text_encoder." + name[len("text.") :]
    if name.startswith("mlp."):
        return name
    rest = name[len("vision.") :]
    inverse = [
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.(weight|bias)$", r"patch_embed.proj.\1"),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
        (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
        (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
        (r"^post_layernorm\.(weight|bias)$", r"norm.\1"),
    ]
    for pattern, target in inverse:
        if re.match(pattern, rest):
            return "blip.visual_encoder." + re.sub(pattern, target, rest)
    raise KeyError(name)


def blip_reward_configs(**overrides) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) of the released model: ViT-L/16 at 224 (24 layers, width
    1024, 16 heads, LayerNorm eps 1e-6) and BERT-base (12 layers, width 768, vocab 30524) with
    cross-attention to 1024-wide image tokens. ``overrides`` = ``vision={...}``, ``text={...}``.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
    )
    text = dict(
        vocab_size=30524,
        hidden_size=768,
        encoder_hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        is_decoder=True,
    )
    vision.update(overrides.get("vision", {}))
    text.update(overrides.get("text", {}))
    return BlipVisionConfig(**vision), BlipTextConfig(**text)


class ImageRewardModel(nn.Module):
    """BLIP image encoder + cross-attending text encoder + the ImageReward MLP head.

    Args:
        vision: a ``BlipVisionModel``.
        text: a ``BlipTextModel`` built with ``add_pooling_layer=False`` and a config with
            ``is_decoder=True`` (which gives its layers cross-attention) and
            ``encoder_hidden_size`` = the vision width.
        mlp: the head, :class:`~visalign.rewards.AestheticMLP` layout (``layers.{0,2,4,6,7}``);
            defaults to a fresh one sized for the text width.
    """

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: nn.Module | None = None):
        super().__init__()
        if getattr(text, "pooler", None) is not None:
            raise ConfigError(
                "ImageReward's text encoder has no pooler: build it with "
                "BlipTextModel(config, add_pooling_layer=False)."
            )
        tcfg, vcfg = text.config, vision.config
        if not getattr(tcfg, "is_decoder", False):
            raise ConfigError(
                "ImageReward's text encoder needs cross-attention layers: build its "
                "BlipTextConfig with is_decoder=True (the default)."
            )
        if int(tcfg.encoder_hidden_size) != int(vcfg.hidden_size):
            raise ConfigError(
                f"text encoder_hidden_size ({tcfg.encoder_hidden_size}) must equal "
                f"the vision width ({vcfg.hidden_size})."
            )
        self.vision, self.text = vision, text
        self.mlp = mlp if mlp is not None else AestheticMLP(int(tcfg.hidden_size))

    @classmethod
    def from_configs(
        cls, vision_config: Any = None, text_config: Any = None, *, empty: bool = False
    ) -> ImageRewardModel:
        """Builds the model from BLIP configs (default: the released sizes), randomly initialised,
        or with parameters on the meta device when ``empty`` (to be filled by a strict load).
        """
        from transformers import BlipTextModel, BlipVisionModel

        if vision_config is None or text_config is None:
            dv, dt = blip_reward_configs()
            vision_config, text_config = vision_config or dv, text_config or dt
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights():
                return cls(BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False))
        return cls(BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False))

    @property
    def image_size(self) -> int:
        size = self.vision.config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The text encoder's first-token hidden state, (B, text width), with cross-attention to
        the image tokens of ``pixel_values`` (already preprocessed).
        """
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        return out.last_hidden_state[:, 0]

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The raw MLP output, (B,) float32 (not yet standardised)."""
        h = self.features(pixel_values, input_ids, attention_mask)
        return self.mlp(h.float())

    # -- checkpoints -----------------------------------------------------------------------------
    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the names of the released ``ImageReward.pt``."""
        return {_inverse_key(k): v for k, v in self.state_dict().items() if not k.endswith("position_ids")}

    def load_released(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Loads a state dict in the released naming, strictly.

        Raises:
            CheckpointError: a key maps nowhere, a parameter is left unfilled, or a shape differs;
                the message lists the first offending keys.
        """
        mapped, unknown = {}, []
        for key, value in state_dict.items():
            try:
                target = map_released_key(key)
            except KeyError:
                unknown.append(key)
                continue
            if target is not None:
                mapped[target] = value
        own = {k: v for k, v in self.state_dict().items() if not k.endswith("position_ids")}
        unexpected = unknown + sorted(set(mapped) - set(own))
        missing = sorted(set(own) - set(mapped))
        shapes = [
            f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(mapped))
            if tuple(mapped[k].shape) != tuple(own[k].shape)
        ]
        if unexpected or missing or shapes:
            parts = []
            if unexpected:
                parts.append(f"{len(unexpected)} key(s) of the checkpoint map to no parameter, e.g. {unexpected[:5]}")
            if missing:
                parts.append(
                    f"{len(missing)} parameter(s) are not in the checkpoint, e.g. "
                    f"{[_safe_inverse(k) for k in missing[:5]]}"
                )
            if shapes:
                parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
            raise CheckpointError(
                "the ImageReward checkpoint does not match the BLIP + MLP model: "
                + "; ".join(parts)
                + ". Expected the released ImageReward.pt naming (blip.visual_encoder.*, "
                "blip.text_encoder.*, mlp.layers.*) and the configs of blip_reward_configs()."
            )
        meta = any(p.is_meta for p in self.parameters())
        ref = next(self.parameters())
        dtype = None if meta else ref.dtype
        mapped = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in mapped.items()}
        self.load_state_dict(mapped, strict=False, assign=meta)


def _safe_inverse(name: str) -> str:
    try:
        return _inverse_key(name)
    except KeyError:
        return name


def _bert_tokenizer(source: Any) -> Any:
    """BERT's tokenizer with BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens added when absent."""
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoTokenizer

        source = from_pretrained(AutoTokenizer, source, what="BERT tokenizer")
    vocab = source.get_vocab()
    if "[DEC]" not in vocab:
        source.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in source.get_vocab():
        source.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return source


def _crop_center(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop with torchvision's offsets, ``round((H - size) / 2)`` (Python rounding)."""
    h, w = images.shape[-2:]
    if h < size or w < size:  # only after an odd resize; pad like torchvision would
        from visalign.rewards.preprocess import pad_to_size

        images = pad_to_size(images, (max(h, size), max(w, size)))
        h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


class ImageReward(Reward):
    r"""ImageReward: human preference for text-to-image generations (Xu et al., arXiv 2304.05977).

    ``score = (MLP(BLIP(image, prompt)[CLS]) - 0.1672) / 1.0333``; about 0 for an average
    generation, higher is better (typically -2 to 2).

    Args:
        checkpoint: the released weights: a local ``ImageReward.pt`` (read with
            ``torch.load(weights_only=True)``) or ``.safetensors`` file, a state dict in the
            released naming, a URL, or a hub repo id (``filename`` is taken from it). Defaults to
            :data:`IMAGE_REWARD_REPO` when ``model`` is ``None``, and to no loading otherwise.
        model: an :class:`ImageRewardModel` already built (tests pass tiny ones); ``checkpoint``,
            when given, is loaded into it strictly. When ``None``, the released architecture is
            built (without random initialisation) and ``checkpoint`` loaded into it.
        tokenizer: BERT's tokenizer (hub id, folder or object; default ``"bert-base-uncased"``);
            ``[DEC]`` and ``[ENC]`` are added when missing.
        filename: the file inside a hub repo or folder (default ``"ImageReward.pt"``).
        max_length: the text length (padded and truncated), 35 as released.
        batch_size, torch_dtype, name, differentiable: as for every :class:`Reward` (defaults 16,
            fp32, ``"image_reward"``, True).

    Raises:
        CheckpointError: the checkpoint's keys do not match (lists a few of them).

    Example::

        reward = ImageReward()                 # downloads THUDM/ImageReward and bert-base-uncased
        reward(images, prompts)                # (B,) float32
    """

    default_name = "image_reward"

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        model: ImageRewardModel | None = None,
        tokenizer: Any = "bert-base-uncased",
        filename: str = IMAGE_REWARD_FILE,
        max_length: int = TEXT_MAX_LENGTH,
        batch_size: int | None = 16,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = True,
    ):
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        if model is not None and not isinstance(model, ImageRewardModel):
            raise ConfigError(f"model must be an ImageRewardModel; got {type(model).__name__}.")
        if model is None and checkpoint is None:
            checkpoint = IMAGE_REWARD_REPO
        if checkpoint is not None:
            sd = load_state_dict(checkpoint, filename if isinstance(checkpoint, (str, os.PathLike)) else None)
            if model is None:
                model = ImageRewardModel.from_configs(*_configs_for(sd), empty=True)
            model.load_released(sd)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        model.mlp.float()  # the head runs in fp32
        self.model = freeze(model)
        self.tokenizer = _bert_tokenizer(tokenizer)
        vocab = int(model.text.config.vocab_size)
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the text encoder "
                f"only {vocab}; pass the tokenizer the model was trained with."
            )
        self.max_length = int(max_length)
        self.mean, self.std = IMAGE_REWARD_MEAN, IMAGE_REWARD_STD

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W) -> normalised pixels at the model's size, differentiably:
        shorter side to 224 (bicubic, antialiased), centre crop, CLIP mean/std.
        """
        size = self.model.image_size
        x = resize_shortest_side(images.float(), size, mode="bicubic", antialias=True)
        x = _crop_center(x, size)
        return normalize(x, CLIP_MEAN, CLIP_STD)

    def tokenize(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Token ids and mask, padded to ``max_length`` (35) and truncated."""
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.model.vision.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        tokens = self.tokenize(prompts, images.device)
        raw = self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        return (raw - self.mean) / self.std


def _configs_for(state_dict: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
    """The BLIP configs of the released architecture, with the vocabulary and depths the
    checkpoint implies (so that a mismatch shows as named keys, not as a size error).
    """
    vision_layers = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k))
    }
    text_layers = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"blip\.text_encoder\.encoder\.layer\.(\d+)\.", k))
    }
    word = state_dict.get("blip.text_encoder.embeddings.word_embeddings.weight")
    text = {}
    if word is not None:
        text["vocab_size"] = int(word.shape[0])
    if text_layers:
        text["num_hidden_layers"] = max(text_layers) + 1
    vision = {"num_hidden_layers": max(vision_layers) + 1} if vision_layers else {}
    return blip_reward_configs(vision=vision, text=text)
