"""Qwen2-VL reward checkpoints: key remapping between the transformers < 4.52 layout and today's, and
merging PEFT LoRA adapters into a module's weights (W += α/r·B·A), written here so no peft is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from visalign.errors import CheckpointError, ConfigError

__all__ = ["merge_lora", "remap_qwen2vl_keys", "to_legacy_qwen2vl_keys"]


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
        rest = key[len(prefix) :]
        if rest.startswith("visual."):
            rest = "model." + rest
        elif rest.startswith("model.") and not rest.startswith(("model.language_model.", "model.visual.")):
            rest = "model.language_model." + rest[len("model.") :]
        out[prefix + rest] = value
    return out


def to_legacy_qwen2vl_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`remap_qwen2vl_keys`: current layout -> transformers < 4.52 layout."""
    out = {}
    for key, value in state_dict.items():
        prefix = _PEFT_PREFIX if key.startswith(_PEFT_PREFIX) else ""
        rest = key[len(prefix) :]
        if rest.startswith("model.visual."):
            rest = rest[len("model.") :]
        elif rest.startswith("model.language_model."):
            rest = "model." + rest[len("model.language_model.") :]
        out[prefix + rest] = value
    return out


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.weight)?$"
)


def _is_lora_key(key: str) -> bool:
    return bool(_LORA_KEY.match(key)) and ".lora_" in key


def merge_lora(
    module: nn.Module,
    lora_state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: float | None = None,
    rank: int | None = None,
    use_rslora: bool = False,
    prefix: str = "",
) -> list[str]:
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
            path = path[len(prefix) :]
        pairs.setdefault(path, {})[m.group("kind")] = value
    if bad:
        raise CheckpointError(f"{len(bad)} key(s) of the LoRA state dict are not LoRA weights, e.g. {bad[:5]}.")
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
        delta = b.float() @ a.float()  # linear: (out, in); embedding: (dim, vocab)
        if emb:
            delta = delta.T
        if tuple(delta.shape) != tuple(w.shape):
            problems.append(f"{path}: delta {tuple(delta.shape)} vs weight {tuple(w.shape)}")
            continue
        with torch.no_grad():
            w.copy_((w.float() + scale * delta.to(w.device)).to(w.dtype))
        merged.append(path)
    if problems:
        raise CheckpointError(
            f"the LoRA adapter does not fit the model ({len(problems)} problem(s)), e.g. {problems[:5]}."
        )
    return merged
