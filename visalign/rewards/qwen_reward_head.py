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
- :class:`~visalign.rewards.qwen_inputs.QwenInputBuilder` (in :mod:`.qwen_inputs`): the prompt (chat template with the generation prompt, right padding,
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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from visalign.errors import CheckpointError, ConfigError, InvalidInputError
from visalign.rewards.qwen_checkpoint import (
    _PEFT_PREFIX,
    _is_lora_key,
    merge_lora,
    remap_qwen2vl_keys,
    to_legacy_qwen2vl_keys,
)

__all__ = ["QwenRewardHeadModel", "TINY_QWEN2VL_CHAT_TEMPLATE", "empty_backbone", "tiny_qwen2vl"]


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

    def __init__(
        self, backbone: nn.Module, head: nn.Module, reward_token_ids: Sequence[int], *, head_prefix: str = "rm_head"
    ):
        super().__init__()
        if hasattr(backbone, "lm_head") and hasattr(backbone, "model"):
            backbone = backbone.model
        if not (hasattr(backbone, "visual") and hasattr(backbone, "language_model")):
            raise ConfigError(
                f"the backbone must be a transformers Qwen2VLModel (with .visual and "
                f".language_model); got {type(backbone).__name__}."
            )
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

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **vision: Any
    ) -> torch.Tensor:
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
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
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
                    "special token?)."
                )
            cols.append(hits.long().argmax(1))
        return torch.stack(cols, dim=1)

    def read(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The head at the reward tokens: (B, K, out) float32. Other positions are never read."""
        pos = self.token_positions(input_ids).to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        return self.head(hidden[rows, pos].float())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **vision: Any
    ) -> torch.Tensor:
        return self.read(self.hidden_states(input_ids, attention_mask, **vision), input_ids)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_state_dict(
        self, *, legacy: bool = True, lm_head: torch.Tensor | None = None
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

    def _split(
        self, state_dict: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
        """(backbone tensors, head tensors, unknown keys) of a full or partial upstream state dict
        (any layout, with or without PEFT's prefix); ``lm_head.*`` is dropped.
        """
        backbone, head, unknown = {}, {}, []
        for key, value in remap_qwen2vl_keys(state_dict).items():
            key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
            if key.startswith("lm_head."):
                continue
            if key.startswith(self.head_prefix + "."):
                head[key[len(self.head_prefix) + 1 :]] = value
            elif key.startswith("model."):
                backbone[key[len("model.") :]] = value
            else:
                unknown.append(key)
        return backbone, head, unknown

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor], *, partial: bool = False) -> None:
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
        unexpected = (
            unknown
            + [f"model.{k}" for k in backbone if k not in own_b]
            + [f"{self.head_prefix}.{k}" for k in head if k not in own_h]
        )
        missing = (
            []
            if partial
            else (
                [f"model.{k}" for k in own_b if k not in backbone and not _is_buffer(self.backbone, k)]
                + [f"{self.head_prefix}.{k}" for k in own_h if k not in head]
            )
        )
        shapes = [
            f"model.{k}: {tuple(v.shape)} vs {tuple(own_b[k].shape)}"
            for k, v in backbone.items()
            if k in own_b and tuple(v.shape) != tuple(own_b[k].shape)
        ]
        shapes += [
            f"{self.head_prefix}.{k}: {tuple(v.shape)} vs {tuple(own_h[k].shape)}"
            for k, v in head.items()
            if k in own_h and tuple(v.shape) != tuple(own_h[k].shape)
        ]
        if unexpected or missing or shapes:
            parts = []
            if unexpected:
                parts.append(f"{len(unexpected)} key(s) map to no parameter, e.g. {unexpected[:5]}")
            if missing:
                parts.append(f"{len(missing)} parameter(s) are not in the checkpoint, e.g. {missing[:5]}")
            if shapes:
                parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
            raise CheckpointError(
                "the checkpoint does not match the Qwen2-VL reward model (keys are compared after "
                "renaming visual.* -> model.visual.*, model.* -> model.language_model.*): " + "; ".join(parts) + "."
            )
        _assign(self.backbone, backbone)
        _assign(self.head, {k: v.float() for k, v in head.items()})
        self.head.float()

    def apply_peft(
        self,
        adapter: Mapping[str, torch.Tensor],
        non_lora: Mapping[str, torch.Tensor] | None = None,
        *,
        alpha: float,
        rank: int | None = None,
        use_rslora: bool = False,
        require_head: bool = True,
    ) -> list[str]:
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
                key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
                if _is_lora_key(key):
                    lora[key] = value
                else:
                    plain[key.replace(".base_layer.", ".")] = value
        if require_head:
            have = {k[len(self.head_prefix) + 1 :] for k in plain if k.startswith(self.head_prefix + ".")}
            absent = [f"{self.head_prefix}.{k}" for k in self.head.state_dict() if k not in have]
            if absent:
                raise CheckpointError(
                    f"the checkpoint has no reward head: {absent[:5]} missing "
                    "(VideoAlign keeps it in non_lora_state_dict.pth)."
                )
        self.load_checkpoint(plain, partial=True)
        backbone_lora, unknown = {}, []
        for key, value in lora.items():
            if key.startswith("model."):
                backbone_lora[key[len("model.") :]] = value
            elif not key.startswith("lm_head."):
                unknown.append(key)
        if unknown:
            raise CheckpointError(f"{len(unknown)} LoRA key(s) target no layer of the backbone, e.g. {unknown[:5]}.")
        return merge_lora(self.backbone, backbone_lora, alpha=alpha, rank=rank, use_rslora=use_rslora)


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
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen2vl(
    seed: int = 0, *, hidden_size: int = 32, layers: int = 2, extra_words: Sequence[str] = ()
) -> tuple[nn.Module, Any]:
    """A tiny random ``Qwen2VLForConditionalGeneration`` and a word-level tokenizer, offline.

    For tests, notebooks and benchmarks. The tokenizer knows Qwen2-VL's special tokens
    (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...) and a minimal chat template
    in Qwen2-VL's format; callers add their reward tokens. Vision: 1 block of width 32, patch 14,
    merge 2; text: ``layers`` layers of width ``hidden_size``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    words = (
        [
            "[UNK]",
            "system",
            "user",
            "assistant",
            "you",
            "are",
            "a",
            "helpful",
            "photo",
            "of",
            "red",
            "green",
            "blue",
            "cat",
            "dog",
            "cube",
            "please",
            "provide",
            "the",
            "overall",
            "ratings",
            "this",
            "image",
            "video",
            "end",
            "rate",
            "textual",
            "prompt",
            "visual",
            "quality",
            "motion",
            "text",
            "alignment",
            "number",
            ":",
            "-",
            ".",
            ",",
            "\n",
        ]
        + [str(i) for i in range(10)]
        + list(extra_words)
    )
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words + specials))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = TINY_QWEN2VL_CHAT_TEMPLATE
    head_dim = hidden_size // 4
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(vocab) + 8,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            pad_token_id=vocab["<|endoftext|>"],
            bos_token_id=None,
            eos_token_id=vocab["<|im_end|>"],
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=hidden_size,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    return model, tokenizer
