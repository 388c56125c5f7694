"""A Qwen2-VL with special reward tokens and a head read at those tokens (HPSv3, VideoAlign).

Both HPSv3 (Ma et al. 2025, arXiv 2508.03789) and VideoAlign's VideoReward (Liu et al. 2025, arXiv
2501.13918) fine-tune a Qwen2-VL with extra tokens in its vocabulary (``<|Reward|>``; or
``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``), put them in the prompt, run the model,
and apply a small head to the last hidden state **at those tokens**. This module holds that
pattern once:

- :class:`QwenRewardHeadModel`: the backbone (transformers' ``Qwen2VLModel``; a
  ``Qwen2VLForConditionalGeneration`` is accepted and its LM head dropped), the head, the reward
  token ids, and :meth:`~QwenRewardHeadModel.read`, which applies the head at the reward tokens only.
  It loads the upstream checkpoints strictly (:meth:`~QwenRewardHeadModel.load_checkpoint`) after
  remapping their keys from the transformers < 4.52 layout (:func:`remap_qwen2vl_keys`), and merges
  PEFT LoRA adapters into its weights (:func:`merge_lora`).
- :class:`QwenInputBuilder`: the prompt (chat template with the generation prompt, right padding,
  the image/video placeholder expanded to one token per merged patch) and the pixels, in torch:
  :func:`smart_resize` to multiples of 28, bicubic antialiased resize, CLIP normalisation and
  :func:`patchify` into ``pixel_values`` / ``pixel_values_videos`` in Qwen2-VL's layout (equal to
  transformers' ``Qwen2VLImageProcessorPil`` for single images, with no torchvision), so the
  rewards are differentiable with respect to the pixels.

Frames of a video are sampled as qwen-vl-utils does (:func:`sample_frame_indices`): ``n = T / fps_video
* 2``, clamped to [4, 768] and to the clip, rounded to an even count, taken at
``linspace(0, T-1, n).round()``.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from visalign.errors import CheckpointError, ConfigError, InvalidInputError
from visalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize

__all__ = [
    "QwenRewardHeadModel",
    "QwenInputBuilder",
    "smart_resize",
    "patchify",
    "sample_frame_indices",
    "remap_qwen2vl_keys",
    "to_legacy_qwen2vl_keys",
    "merge_lora",
    "add_reward_tokens",
    "QWEN2VL_CHAT_TEMPLATE_FALLBACK",
    "TINY_QWEN2VL_CHAT_TEMPLATE",
    "tiny_qwen2vl",
]

IMAGE_FACTOR = 28
FRAME_FACTOR = 2

# What Qwen2-VL-Instruct's chat template renders for one user turn holding one image (or video)
# followed by text, with the generation prompt; used when the tokenizer has no chat template.
QWEN2VL_CHAT_TEMPLATE_FALLBACK = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{placeholder}<|vision_end|>{text}<|im_end|>\n"
    "<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- geometry
def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """The (height, width) qwen-vl-utils resizes to: multiples of ``factor``, the pixel count in
    [``min_pixels``, ``max_pixels``], the aspect ratio kept as closely as possible.

    Raises:
        InvalidInputError: the aspect ratio exceeds 200.
    """
    if max(height, width) / min(height, width) > 200:
        raise InvalidInputError(f"Qwen2-VL needs an aspect ratio below 200; got {height}x{width}.")
    h = max(factor, _round_by(height, factor))
    w = max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = _floor_by(height / beta, factor)
        w = _floor_by(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = _ceil_by(height * beta, factor)
        w = _ceil_by(width * beta, factor)
    return h, w


def sample_frame_indices(total_frames: int, *, video_fps: float | None = None, fps: float = 2.0,
                         num_frames: int | None = None, min_frames: int = 4,
                         max_frames: int = 768) -> torch.Tensor:
    """Which frames a Qwen2-VL video reward looks at (qwen-vl-utils' uniform sampling).

    With ``num_frames`` the count is that, rounded to even; otherwise ``n = total / video_fps * fps``
    clamped to [``min_frames``, ``min(max_frames, total)``] (bounds made even) and rounded to
    even. ``n`` never exceeds ``total_frames``; a single frame gives ``[0]`` (the patchifier then
    repeats it to fill the temporal patch). The frames are ``linspace(0, total - 1, n).round()``.

    Returns:
        `torch.LongTensor`: (n,) frame indices.
    """
    if total_frames < 1:
        raise InvalidInputError(f"a video needs at least one frame; got {total_frames}.")
    if num_frames is not None:
        n = _round_by(num_frames, FRAME_FACTOR)
    else:
        if video_fps is None or video_fps <= 0:
            raise ConfigError(f"sampling at {fps} fps needs the clip's frame rate video_fps > 0; "
                              f"got {video_fps}.")
        lo = _ceil_by(min_frames, FRAME_FACTOR)
        hi = _floor_by(min(max_frames, total_frames), FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = _round_by(min(max(n, lo), hi), FRAME_FACTOR)
    n = min(n, total_frames)
    if n < FRAME_FACTOR:
        return torch.zeros(1, dtype=torch.long)
    return torch.linspace(0, total_frames - 1, n).round().long()


def patchify(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL's flat patch layout of normalised frames, in torch (differentiable).

    Args:
        frames: (T, C, H, W), already normalised, H and W multiples of ``patch_size * merge_size``.
            T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (one
            image becomes two identical frames, as the image processor does).

    Returns:
        ``(patches, (t, h, w))``: patches (t*h*w, C*temporal_patch_size*patch_size**2) ordered by
        merge window (row-major), then position inside the window; each patch flattened as
        (C, temporal, patch row, patch column). ``(t, h, w)`` is the grid (``*_grid_thw``).
    """
    t, c, height, width = frames.shape
    step = patch_size * merge_size
    if height % step or width % step:
        raise InvalidInputError(f"frames of {height}x{width} are not multiples of {step}; resize "
                                "them with smart_resize first.")
    pad = (-t) % temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, height // patch_size, width // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


# ----------------------------------------------------------------------------- checkpoint keys
_PEFT_PREFIX = "base_model.model."


def remap_qwen2vl_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames Qwen2-VL keys from the transformers < 4.52 layout to the current one.

    ``visual.*`` -> ``model.visual.*`` and ``model.*`` -> ``model.language_model.*``; keys already in
    the new layout, ``lm_head.*`` and the reward head stay. A PEFT ``base_model.model.`` prefix is
    kept in front of the renamed key.
    """
    out = {}
    for key, value in state_dict.items():
        prefix = _PEFT_PREFIX if key.startswith(_PEFT_PREFIX) else ""
        rest = key[len(prefix):]
        if rest.startswith("visual."):
            rest = "model." + rest
        elif rest.startswith("model.") and not rest.startswith(("model.language_model.",
                                                                 "model.visual.")):
            rest = "model.language_model." + rest[len("model."):]
        out[prefix + rest] = value
    return out


def to_legacy_qwen2vl_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`remap_qwen2vl_keys`: current layout -> transformers < 4.52 layout."""
    out = {}
    for key, value in state_dict.items():
        prefix = _PEFT_PREFIX if key.startswith(_PEFT_PREFIX) else ""
        rest = key[len(prefix):]
        if rest.startswith("model.visual."):
            rest = rest[len("model."):]
        elif rest.startswith("model.language_model."):
            rest = "model." + rest[len("model.language_model."):]
        out[prefix + rest] = value
    return out


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.weight)?$")


def _is_lora_key(key: str) -> bool:
    return bool(_LORA_KEY.match(key)) and ".lora_" in key


def merge_lora(module: nn.Module, lora_state_dict: Mapping[str, torch.Tensor], *,
               alpha: float | None = None, rank: int | None = None, use_rslora: bool = False,
               prefix: str = "") -> list[str]:
    """Merges a PEFT LoRA adapter into ``module``'s weights: ``W += scale * B @ A``.

    ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` the rank of each pair
    (the rows of A) unless ``rank`` is given. Linear layers take ``lora_A.weight`` (r, in) and
    ``lora_B.weight`` (out, r); embeddings take ``lora_embedding_A`` (r, vocab) and
    ``lora_embedding_B`` (dim, r) and get ``(B @ A).T``. Keys may carry an adapter name
    (``lora_A.default.weight``). The merge is computed in float32 and cast to each weight's dtype.

    Args:
        module: the model to update in place.
        lora_state_dict: the adapter's tensors, keyed by module path (after any renaming) plus the
            ``lora_*`` suffix.
        alpha: LoRA's alpha (required).
        rank, use_rslora: as in PEFT's ``LoraConfig``.
        prefix: stripped from each module path before looking it up in ``module``.

    Returns:
        `list[str]`: the module paths that were merged.

    Raises:
        CheckpointError: a key is not a LoRA key, a pair is incomplete, a target is missing or is
            not a Linear/Embedding, or shapes do not fit (the message lists a few).
    """
    if alpha is None:
        raise ConfigError("merge_lora needs the adapter's lora_alpha (adapter_config.json).")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in lora_state_dict.items():
        m = _LORA_KEY.match(key)
        if not m:
            bad.append(key)
            continue
        path = m.group("module")
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        pairs.setdefault(path, {})[m.group("kind")] = value
    if bad:
        raise CheckpointError(f"{len(bad)} key(s) of the LoRA state dict are not LoRA weights, e.g. "
                              f"{bad[:5]}.")
    modules = dict(module.named_modules())
    problems = []
    merged = []
    for path, parts in sorted(pairs.items()):
        target = modules.get(path)
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if emb else "lora_A")
        b = parts.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None:
            problems.append(f"{path}: incomplete pair {sorted(parts)}")
            continue
        if target is None or not isinstance(getattr(target, "weight", None), torch.Tensor):
            problems.append(f"{path}: no such layer in the model")
            continue
        w = target.weight
        r = int(rank) if rank is not None else int(a.shape[0])
        scale = float(alpha) / (math.sqrt(r) if use_rslora else r)
        delta = b.float() @ a.float()                   # linear: (out, in); embedding: (dim, vocab)
        if emb:
            delta = delta.T
        if tuple(delta.shape) != tuple(w.shape):
            problems.append(f"{path}: delta {tuple(delta.shape)} vs weight {tuple(w.shape)}")
            continue
        with torch.no_grad():
            w.copy_((w.float() + scale * delta.to(w.device)).to(w.dtype))
        merged.append(path)
    if problems:
        raise CheckpointError(f"the LoRA adapter does not fit the model ({len(problems)} problem(s)), "
                              f"e.g. {problems[:5]}.")
    return merged


# ----------------------------------------------------------------------------- the model
class QwenRewardHeadModel(nn.Module):
    """A Qwen2-VL backbone, reward tokens, and a head applied at those tokens.

    Args:
        backbone: transformers' ``Qwen2VLModel`` (or a ``Qwen2VLForConditionalGeneration``, whose
            ``.model`` is kept and LM head dropped: a reward never needs the logits).
        head: maps hidden states (..., hidden) to (..., out); run in float32.
        reward_token_ids: the id of each reward token, in reading order; each must occur exactly
            once in every prompt.
        head_prefix: the head's key prefix in the upstream checkpoints (``"rm_head"``).

    :meth:`forward` returns the head at each reward token, (B, K, out) in float32.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, reward_token_ids: Sequence[int], *,
                 head_prefix: str = "rm_head"):
        super().__init__()
        if hasattr(backbone, "lm_head") and hasattr(backbone, "model"):
            backbone = backbone.model
        if not (hasattr(backbone, "visual") and hasattr(backbone, "language_model")):
            raise ConfigError(f"the backbone must be a transformers Qwen2VLModel (with .visual and "
                              f".language_model); got {type(backbone).__name__}.")
        self.backbone = backbone
        self.head = head.float()
        self.reward_token_ids = [int(t) for t in reward_token_ids]
        if not self.reward_token_ids:
            raise ConfigError("a reward head needs at least one reward token.")
        self.head_prefix = head_prefix
        try:
            self._takes_mm_types = "mm_token_type_ids" in inspect.signature(backbone.forward).parameters
        except (TypeError, ValueError):
            self._takes_mm_types = False

    @property
    def config(self) -> Any:
        return self.backbone.config

    @property
    def visual_dtype(self) -> torch.dtype:
        return next(self.backbone.visual.parameters()).dtype

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **vision: Any) -> torch.Tensor:
        """The backbone's last hidden states (B, L, hidden) for token ids plus pixel inputs
        (``pixel_values`` + ``image_grid_thw`` and/or ``pixel_values_videos`` + ``video_grid_thw``).
        """
        kwargs = {k: v for k, v in vision.items() if v is not None}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in kwargs:
                kwargs[key] = kwargs[key].to(self.visual_dtype)
        if self._takes_mm_types and ("image_grid_thw" in kwargs or "video_grid_thw" in kwargs):
            types = torch.zeros_like(input_ids, dtype=torch.int32)
            types[input_ids == int(self.config.image_token_id)] = 1
            types[input_ids == int(self.config.video_token_id)] = 2
            kwargs["mm_token_type_ids"] = types
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **kwargs)
        return out.last_hidden_state

    def token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, K) positions of the reward tokens, in ``reward_token_ids`` order.

        Raises:
            InvalidInputError: a token is absent or repeated in some row (e.g. the prompt was
                truncated, or the tokenizer lacks the token).
        """
        cols = []
        for tid in self.reward_token_ids:
            hits = input_ids == tid
            counts = hits.sum(1)
            if not bool((counts == 1).all()):
                raise InvalidInputError(
                    f"reward token id {tid} occurs {counts.tolist()} times in the rows; it must "
                    "occur exactly once per prompt (is it in the prompt, and in the tokenizer as a "
                    "special token?).")
            cols.append(hits.long().argmax(1))
        return torch.stack(cols, dim=1)

    def read(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The head at the reward tokens: (B, K, out) float32. Other positions are never read."""
        pos = self.token_positions(input_ids).to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        return self.head(hidden[rows, pos].float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **vision: Any) -> torch.Tensor:
        return self.read(self.hidden_states(input_ids, attention_mask, **vision), input_ids)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_state_dict(self, *, legacy: bool = True, lm_head: torch.Tensor | None = None
                              ) -> dict[str, torch.Tensor]:
        """This model's weights in the upstream naming: ``model.*``/``visual.*`` (``legacy``, as
        the released checkpoints) or ``model.language_model.*``/``model.visual.*``, plus
        ``<head_prefix>.*`` (and ``lm_head.weight`` when given).
        """
        sd = {"model." + k: v for k, v in self.backbone.state_dict().items()}
        sd.update({f"{self.head_prefix}.{k}": v for k, v in self.head.state_dict().items()})
        if lm_head is not None:
            sd["lm_head.weight"] = lm_head
        return to_legacy_qwen2vl_keys(sd) if legacy else sd

    def _split(self, state_dict: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
        """(backbone tensors, head tensors, unknown keys) of a full or partial upstream state dict
        (any layout, with or without PEFT's prefix); ``lm_head.*`` is dropped.
        """
        backbone, head, unknown = {}, {}, []
        for key, value in remap_qwen2vl_keys(state_dict).items():
            key = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if key.startswith("lm_head."):
                continue
            if key.startswith(self.head_prefix + "."):
                head[key[len(self.head_prefix) + 1:]] = value
            elif key.startswith("model."):
                backbone[key[len("model."):]] = value
            else:
                unknown.append(key)
        return backbone, head, unknown

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor], *, partial: bool = False
                        ) -> None:
        """Loads an upstream checkpoint (old or new key layout) into the backbone and head.

        ``lm_head.weight`` is dropped. Every other key must land on a parameter of matching shape;
        unless ``partial``, every parameter must be filled (a full checkpoint, like HPSv3's).
        Parameters on the meta device (a model built empty) are replaced by the checkpoint's tensors.

        Raises:
            CheckpointError: listing a few unexpected, missing or mis-shaped keys.
        """
        backbone, head, unknown = self._split(state_dict)
        own_b = self.backbone.state_dict()
        own_h = self.head.state_dict()
        unexpected = unknown + [f"model.{k}" for k in backbone if k not in own_b] + \
            [f"{self.head_prefix}.{k}" for k in head if k not in own_h]
        missing = [] if partial else (
            [f"model.{k}" for k in own_b if k not in backbone and not _is_buffer(self.backbone, k)]
            + [f"{self.head_prefix}.{k}" for k in own_h if k not in head])
        shapes = [f"model.{k}: {tuple(v.shape)} vs {tuple(own_b[k].shape)}" for k, v in backbone.items()
                  if k in own_b and tuple(v.shape) != tuple(own_b[k].shape)]
        shapes += [f"{self.head_prefix}.{k}: {tuple(v.shape)} vs {tuple(own_h[k].shape)}"
                   for k, v in head.items() if k in own_h and tuple(v.shape) != tuple(own_h[k].shape)]
        if unexpected or missing or shapes:
            parts = []
            if unexpected:
                parts.append(f"{len(unexpected)} key(s) map to no parameter, e.g. {unexpected[:5]}")
            if missing:
                parts.append(f"{len(missing)} parameter(s) are not in the checkpoint, e.g. "
                             f"{missing[:5]}")
            if shapes:
                parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
            raise CheckpointError(
                "the checkpoint does not match the Qwen2-VL reward model (keys are compared after "
                "renaming visual.* -> model.visual.*, model.* -> model.language_model.*): "
                + "; ".join(parts) + ".")
        _assign(self.backbone, backbone)
        _assign(self.head, {k: v.float() for k, v in head.items()})
        self.head.float()

    def apply_peft(self, adapter: Mapping[str, torch.Tensor],
                   non_lora: Mapping[str, torch.Tensor] | None = None, *, alpha: float,
                   rank: int | None = None, use_rslora: bool = False,
                   require_head: bool = True) -> list[str]:
        """Applies a PEFT checkpoint (keys ``base_model.model.*``, old or new layout): its full
        tensors (``non_lora``, and ``*.base_layer.weight`` saved with the adapter) replace the
        weights, then its LoRA pairs are merged, ``W += alpha / r * B @ A`` (:func:`merge_lora`).

        LoRA pairs on ``lm_head`` are dropped (a reward never reads the logits). With
        ``require_head``, the checkpoint must hold every parameter of the head.

        Returns:
            `list[str]`: the merged backbone layers.

        Raises:
            CheckpointError: a key fits nowhere, a pair is incomplete, or the head is missing.
        """
        plain, lora = {}, {}
        for source in (non_lora or {}, adapter):
            for key, value in remap_qwen2vl_keys(source).items():
                key = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
                if _is_lora_key(key):
                    lora[key] = value
                else:
                    plain[key.replace(".base_layer.", ".")] = value
        if require_head:
            have = {k[len(self.head_prefix) + 1:] for k in plain if k.startswith(self.head_prefix + ".")}
            absent = [f"{self.head_prefix}.{k}" for k in self.head.state_dict() if k not in have]
            if absent:
                raise CheckpointError(f"the checkpoint has no reward head: {absent[:5]} missing "
                                      "(VideoAlign keeps it in non_lora_state_dict.pth).")
        self.load_checkpoint(plain, partial=True)
        backbone_lora, unknown = {}, []
        for key, value in lora.items():
            if key.startswith("model."):
                backbone_lora[key[len("model."):]] = value
            elif not key.startswith("lm_head."):
                unknown.append(key)
        if unknown:
            raise CheckpointError(f"{len(unknown)} LoRA key(s) target no layer of the backbone, e.g. "
                                  f"{unknown[:5]}.")
        return merge_lora(self.backbone, backbone_lora, alpha=alpha, rank=rank,
                          use_rslora=use_rslora)


def _is_buffer(module: nn.Module, key: str) -> bool:
    return key in dict(module.named_buffers())


def _assign(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copies tensors into ``module`` (assigning where its parameters are still on meta)."""
    if not tensors:
        return
    meta = any(p.is_meta for p in module.parameters())
    if meta:
        module.load_state_dict(dict(tensors), strict=False, assign=True)
        return
    own = module.state_dict()
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))


# ----------------------------------------------------------------------------- inputs
class QwenInputBuilder:
    """Builds Qwen2-VL inputs from [0, 1] pixels and prompt texts, in torch.

    Args:
        tokenizer: the model's tokenizer, with the reward tokens and ``<|image_pad|>`` /
            ``<|video_pad|>`` as (special) tokens.
        config: the model config (``image_token_id``, ``video_token_id``, the vision patch sizes).
        chat_template: a Jinja chat template; defaults to the tokenizer's, else the Qwen2-VL
            format of :data:`QWEN2VL_CHAT_TEMPLATE_FALLBACK`.
        min_pixels, max_pixels: the resize bounds of :func:`smart_resize` per image or frame.
        mean, std: the normalisation (OpenAI CLIP's, as Qwen2-VL).
    """

    def __init__(self, tokenizer: Any, config: Any, *, chat_template: str | None = None,
                 min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.tokenizer = tokenizer
        vcfg = getattr(config, "vision_config", config)
        self.patch_size = int(getattr(vcfg, "patch_size", 14))
        self.temporal_patch_size = int(getattr(vcfg, "temporal_patch_size", 2))
        self.merge_size = int(getattr(vcfg, "spatial_merge_size", 2))
        self.factor = self.patch_size * self.merge_size
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        for token, tid in (("<|image_pad|>", self.image_token_id), ("<|video_pad|>", self.video_token_id)):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != tid:
                raise ConfigError(f"the tokenizer maps {token} to {got} but the model expects "
                                  f"{tid}; pass the tokenizer the model was trained with.")
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.mean, self.std = tuple(mean), tuple(std)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise ConfigError("the tokenizer has no pad token; Qwen2-VL's is <|endoftext|>.")
        self.pad_token_id = int(pad)

    # -- text -----------------------------------------------------------------------------------
    def render(self, text: str, kind: str = "image") -> str:
        """One user turn (the image or video, then ``text``) with the generation prompt."""
        if self.chat_template:
            messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                      add_generation_prompt=True, tokenize=False)
        placeholder = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        return QWEN2VL_CHAT_TEMPLATE_FALLBACK.format(placeholder=placeholder, text=text)

    def tokenize(self, texts: Sequence[str], tokens_per_sample: Sequence[int], kind: str,
                 device: torch.device) -> dict[str, torch.Tensor]:
        """Token ids with each placeholder expanded to its vision token count, right-padded."""
        placeholder = self.image_token_id if kind == "image" else self.video_token_id
        rows = []
        for text, n in zip(texts, tokens_per_sample):
            ids = list(self.tokenizer(text)["input_ids"])
            at = [i for i, t in enumerate(ids) if t == placeholder]
            if len(at) != 1:
                raise ConfigError(f"the rendered prompt holds {len(at)} {kind} placeholders; the "
                                  "chat template must emit exactly one (<|vision_start|><|"
                                  f"{kind}_pad|><|vision_end|>).")
            i = at[0]
            rows.append(ids[:i] + [placeholder] * int(n) + ids[i + 1:])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    # -- pixels ---------------------------------------------------------------------------------
    def pixels(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(T, 3, H, W) [0, 1] frames -> (patches, grid): resized to :func:`smart_resize`'s size
        (bicubic, antialiased), normalised, patchified. Differentiable.
        """
        h, w = smart_resize(frames.shape[-2], frames.shape[-1], self.factor, self.min_pixels,
                            self.max_pixels)
        x = resize(frames.float(), (h, w), mode="bicubic", antialias=True)
        x = normalize(x, self.mean, self.std)
        return patchify(x, self.patch_size, self.temporal_patch_size, self.merge_size)

    def build(self, clips: Sequence[torch.Tensor], texts: Sequence[str], kind: str = "image"
              ) -> dict[str, torch.Tensor]:
        """Model inputs for one clip (T, 3, H, W) per text: an image is a 1-frame clip.

        Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` + ``image_grid_thw``
        (``kind="image"``) or ``pixel_values_videos`` + ``video_grid_thw`` (``kind="video"``).
        """
        if kind not in ("image", "video"):
            raise ConfigError(f"kind must be 'image' or 'video'; got {kind!r}.")
        patches, grids = [], []
        for clip in clips:
            p, g = self.pixels(clip)
            patches.append(p)
            grids.append(g)
        device = clips[0].device
        merge = self.merge_size ** 2
        counts = [t * h * w // merge for t, h, w in grids]
        out = self.tokenize([self.render(t, kind) for t in texts], counts, kind, device)
        grid = torch.tensor(grids, dtype=torch.long, device=device)
        if kind == "image":
            out.update(pixel_values=torch.cat(patches), image_grid_thw=grid)
        else:
            out.update(pixel_values_videos=torch.cat(patches), video_grid_thw=grid)
        return out


# ----------------------------------------------------------------------------- loading helpers
def add_reward_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Adds the reward tokens as special tokens (when absent) and returns their ids, as upstream
    does with ``add_special_tokens({"additional_special_tokens": tokens})``.
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": list(new)})
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def load_tokenizer(source: Any) -> Any:
    """A tokenizer object from a hub id / folder (``AutoTokenizer``), or the object itself."""
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from visalign.rewards.loading import from_pretrained

        return from_pretrained(AutoTokenizer, source, what="Qwen2-VL tokenizer")
    return source


def empty_backbone(config: Any, vocab_size: int | None = None) -> nn.Module:
    """A ``Qwen2VLModel`` of ``config`` with parameters on the meta device (no random init), to be
    filled by a strict :meth:`QwenRewardHeadModel.load_checkpoint`.
    """
    from accelerate import init_empty_weights
    from transformers import Qwen2VLModel

    if vocab_size is not None:
        getattr(config, "text_config", config).vocab_size = int(vocab_size)
    with init_empty_weights():
        return Qwen2VLModel(config)


# ----------------------------------------------------------------------------- tiny model
TINY_QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen2vl(seed: int = 0, *, hidden_size: int = 32, layers: int = 2,
                 extra_words: Sequence[str] = ()) -> tuple[nn.Module, Any]:
    """A tiny random ``Qwen2VLForConditionalGeneration`` and a word-level tokenizer, offline.

    For tests, notebooks and benchmarks. The tokenizer knows Qwen2-VL's special tokens
    (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...) and a minimal chat template
    in Qwen2-VL's format; callers add their reward tokens. Vision: 1 block of width 32, patch 14,
    merge 2; text: ``layers`` layers of width ``hidden_size``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    words = ["[UNK]", "system", "user", "assistant", "you", "are", "a", "helpful", "photo", "of",
             "red", "green", "blue", "cat", "dog", "cube", "please", "provide", "the", "overall",
             "ratings", "this", "image", "video", "end", "rate", "textual", "prompt", "visual",
             "quality", "motion", "text", "alignment", "number", ":", "-", ".", ",", "\n"] + \
        [str(i) for i in range(10)] + list(extra_words)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words + specials))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                        pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = TINY_QWEN2VL_CHAT_TEMPLATE
    head_dim = hidden_size // 4
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab) + 8, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": section},
                         pad_token_id=vocab["<|endoftext|>"], bos_token_id=None,
                         eos_token_id=vocab["<|im_end|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    return model, tokenizer
