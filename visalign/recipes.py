"""YAML recipes: one file says which model, reward, prompts and algorithm a run uses.

A recipe is the algorithm's config plus four keys the config does not hold::

    algorithm: grpo                     # grpo | dpo | prdp | draft
    model: stabilityai/stable-diffusion-3.5-medium   # hub id, local folder, tiny:FAMILY or toy:NAME
    torch_dtype: bfloat16               # optional, for from_pretrained
    prompts: prompts.txt                # a list, or a .txt / .csv / .jsonl path (relative to the recipe)
    reward:                             # one reward, or several (weighted, combined)
      pickscore: {type: PickScore, weight: 1.0}
    group_size: 24                      # ...every other key is a field of the algorithm's config

``visalign train recipe.yaml key=value ...`` overrides any of them (``model=...`` and
``prompts=...`` too). Reward ``type`` is a class of :mod:`visalign.rewards` (its other keys are
passed to it), or ``toy_clip`` / ``toy_evaluator`` / ``brightness`` / ``ocr`` / ``remote`` (with ``url``) /
``geneval`` (``detector: owlv2|grounding_dino|toy``, ``model``) / ``unified_reward``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

import yaml

from visalign.errors import ConfigError

ALGORITHMS = {
    "grpo": ("visalign.algorithms.grpo", "GRPOTrainer"),
    "dpo": ("visalign.algorithms.dpo", "DPOTrainer"),
    "prdp": ("visalign.algorithms.prdp", "PRDPTrainer"),
    "draft": ("visalign.algorithms.draft", "DRaFTTrainer"),
    "nft": ("visalign.algorithms.nft", "NFTTrainer"),
    "awm": ("visalign.algorithms.awm", "AWMTrainer"),
}
RECIPE_KEYS = ("algorithm", "model", "torch_dtype", "prompts", "reward", "architecture")


def trainer_class(algorithm: str) -> type:
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"Unknown algorithm {algorithm!r}; a recipe's `algorithm:` is one of {sorted(ALGORITHMS)}.")
    module, name = ALGORITHMS[algorithm]
    return getattr(importlib.import_module(module), name)


# Adapter options each shipped toy model loads with by default. The toy T2I was trained for any T5
# length, so length 1 matches the stock 256 within tolerance and is several times faster on CPU
# (visalign/toy/MODELS.md).
TOY_POLICY_KWARGS = {"t2i": {"max_sequence_length": 1}}


def load_policy(model: str, torch_dtype: str | None = None, policy_kwargs: dict | None = None):
    """A Policy from a hub id or folder, ``tiny:FAMILY`` (random tiny pipeline) or ``toy:NAME`` (shipped toy model).

    Args:
        model: a hub id, a local pipeline folder, ``tiny:FAMILY`` or ``toy:NAME``.
        torch_dtype: a torch dtype name for ``from_pretrained``, e.g. ``"bfloat16"``.
        policy_kwargs: adapter options (see :func:`visalign.wrap`); for ``toy:t2i`` they default
            to ``{"max_sequence_length": 1}`` (:data:`TOY_POLICY_KWARGS`).
    """
    import torch

    import visalign as va

    policy_kwargs = dict(policy_kwargs or {})
    if model.startswith("tiny:"):
        # Tiny random pipelines are a testing facility that the CLI offers too (``tiny:FAMILY``), so
        # visalign.testing is imported here, when one is asked for, never at module level.
        from visalign.testing import tiny_pipeline

        return va.wrap(tiny_pipeline(model.split(":", 1)[1]), **policy_kwargs)
    if model.startswith("toy:"):
        name = model.split(":", 1)[1]
        policy_kwargs = {**TOY_POLICY_KWARGS.get(name, {}), **policy_kwargs}
        model = toy_model_path(name)
    kwargs = {"torch_dtype": getattr(torch, torch_dtype)} if torch_dtype else {}
    if os.path.isdir(model):
        kwargs["local_files_only"] = True
    return va.load(model, policy_kwargs=policy_kwargs or None, **kwargs)


def toy_model_path(name: str) -> str:
    """The folder of a model shipped inside the package (``visalign/toy/models/<name>``)."""
    import visalign.toy

    path = os.path.join(os.path.dirname(visalign.toy.__file__), "models", name)
    if not os.path.isdir(path):
        shipped = sorted(os.listdir(os.path.dirname(path))) if os.path.isdir(os.path.dirname(path)) else []
        raise ConfigError(f"No shipped toy model {name!r}; available: {shipped}.")
    return path


def _one_reward(spec: Any):
    from visalign import rewards

    if isinstance(spec, str):
        spec = {"type": spec}
    spec = dict(spec)
    kind = spec.pop("type", None)
    spec.pop("weight", None)
    if kind == "brightness":
        from visalign.rewards.simple import brightness

        return brightness
    if kind == "toy_clip":
        return rewards.CLIPScore(model=toy_model_path("clip"), **{"variant": "cosine", **spec})
    if kind == "toy_evaluator":
        from visalign.toy import ToyEvaluatorReward

        return ToyEvaluatorReward(**spec)
    if kind == "ocr":
        return rewards.OCRReward(**spec)
    if kind == "edit":  # instruction editing: VLM yes-token + preservation (visalign/rewards/edit.py)
        return rewards.EditReward(**spec)
    if kind == "toy_edit":  # the toy world's exact edit check (visalign/toy/edit.py)
        from visalign.toy.edit import ToyEditReward

        return ToyEditReward(**spec)
    if kind == "geneval":  # GenEval rules on detections: {detector: owlv2|grounding_dino|toy, model: ...}
        return rewards.GenEvalReward(spec.pop("detector", "owlv2"), **spec)
    if kind == "unified_reward":  # a VLM judge: {model, processor} or {base_url, model, api_key_env}
        return rewards.UnifiedReward(**spec)
    if kind in ("image_reward", "hpsv3", "videoalign"):  # visalign/rewards/{image_reward,hpsv3,video_align}.py
        import torch

        if isinstance(spec.get("torch_dtype"), str):
            spec["torch_dtype"] = getattr(torch, spec["torch_dtype"])
        cls = {"image_reward": "ImageReward", "hpsv3": "HPSv3", "videoalign": "VideoAlignReward"}[kind]
        return getattr(rewards, cls)(**spec)
    if kind == "remote":
        if "url" not in spec:
            raise ConfigError(
                "Reward type 'remote' needs a url, e.g. {type: remote, url: 'http://127.0.0.1:8765'} "
                "(the address `visalign serve-reward` prints)."
            )
        return rewards.RemoteReward(**spec)
    if kind is None or not hasattr(rewards, kind) or kind.startswith("_"):
        names = [n for n in rewards.__all__ if n[0].isupper() and n not in ("Reward", "RewardResult", "RunningNorm")]
        raise ConfigError(f"Unknown reward type {kind!r}; use one of {names} or {', '.join(BUILTIN_REWARDS)}.")
    if kind == "SegmentalVideoReward":
        spec["image_reward"] = _one_reward(spec.pop("image_reward"))
    return getattr(rewards, kind)(**spec)


BUILTIN_REWARDS = (
    "brightness",
    "toy_clip",
    "toy_evaluator",
    "ocr",
    "remote",
    "edit",
    "toy_edit",
    "geneval",
    "unified_reward",
    "image_reward",
    "hpsv3",
    "videoalign",
)


def reward_types(spec: Any) -> list[str]:
    """The reward type names a ``reward:`` entry uses (nested image rewards included)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, dict) and "type" not in spec:
        return [t for s in spec.values() for t in reward_types(s)]
    return [spec.get("type")] + reward_types(spec.get("image_reward"))


def check_reward_spec(spec: Any) -> None:
    """Raises a ConfigError naming any reward type that does not exist, without building anything."""
    from visalign import rewards

    for kind in reward_types(spec):
        if kind not in BUILTIN_REWARDS and (not isinstance(kind, str) or not hasattr(rewards, kind)):
            raise ConfigError(
                f"Unknown reward type {kind!r}; use a class of visalign.rewards "
                f"(e.g. CLIPScore, PickScore, Aesthetic, HPSv2) or one of {BUILTIN_REWARDS}."
            )


def build_reward(spec: Any):
    """A reward from a recipe's ``reward:`` entry: a type name, one spec dict, or named specs."""
    from visalign.rewards import Combined

    if isinstance(spec, dict) and "type" not in spec:
        if len(spec) == 1:
            return _one_reward(next(iter(spec.values())))
        parts = {
            name: (_one_reward(s), float(s.get("weight", 1.0)) if isinstance(s, dict) else 1.0)
            for name, s in spec.items()
        }
        return Combined(parts)
    return _one_reward(spec)


def parse_recipe(path: str, overrides: Sequence[str] = ()):
    """Reads and validates a recipe without loading any model.

    Returns:
        ``(trainer_class, recipe, config)``: ``recipe`` holds the non-config keys (model, reward, ...).
    """
    from visalign.training.config import load_yaml, parse_overrides

    recipe = load_yaml(path) or {}
    pairs = parse_overrides(overrides)
    for key in RECIPE_KEYS:
        if key in pairs:
            recipe[key] = yaml.safe_load(pairs.pop(key))
    cls = trainer_class(str(recipe.get("algorithm", "grpo")))
    if "model" not in recipe:
        raise ConfigError(f"{path} has no `model:`; name a hub id, a local folder, tiny:FAMILY or toy:NAME.")
    prompts = recipe.get("prompts")
    if isinstance(prompts, str) and not os.path.isabs(prompts):
        candidate = os.path.join(os.path.dirname(os.path.abspath(path)), prompts)
        recipe["prompts"] = candidate if os.path.exists(candidate) else prompts
    check_reward_spec(recipe.get("reward"))
    config_dict = {k: v for k, v in recipe.items() if k not in RECIPE_KEYS}
    config = cls.config_class.from_dict(config_dict).with_overrides([f"{k}={v}" for k, v in pairs.items()])
    return cls, {k: recipe.get(k) for k in RECIPE_KEYS}, config


def load_recipe(path: str, overrides: Sequence[str] = ()):
    """Reads a recipe and builds everything a run needs.

    Returns:
        ``(trainer_class, policy, reward, prompts, config)``.
    """
    cls, recipe, config = parse_recipe(path, overrides)
    policy = load_policy(str(recipe["model"]), recipe.get("torch_dtype"))
    reward = build_reward(recipe["reward"]) if recipe.get("reward") is not None else None
    return cls, policy, reward, recipe["prompts"], config
