"""Dataclass configs that load from YAML recipes and take ``key=value`` overrides.

Every trainer's config is a dataclass deriving from :class:`ConfigBase`; the options the shared
training loop reads live in :class:`TrainConfig`, and each algorithm adds its own fields on top::

    from visalign.training.config import TrainConfig

    cfg = TrainConfig.from_yaml("configs/toy_grpo.yaml", ["learning_rate=3e-4", "trackers=[jsonl,tensorboard]"])
    cfg = cfg.with_overrides(["--max_steps=20"])       # a new config; the old one is unchanged
    print(cfg.describe())                              # every field and its value, for the run log
    cfg.to_yaml("runs/train/config.yaml")              # plain YAML that from_yaml reads back

Override values are strings coerced to the field's annotated type, so the command line needs no
YAML quoting: ``learning_rate=1e-4`` (which YAML 1.1 would read as a string), ``use_lora=no``,
``lora_alpha=none``, ``trackers=jsonl,wandb`` or ``trackers=[jsonl, wandb]``,
``weights={clip: 1, aesthetic: 0.5}``. ``Literal`` fields accept only their listed choices.

Unknown keys raise :class:`~visalign.errors.ConfigError` naming the closest valid key, and
``validate()`` (run on every construction) rejects out-of-range values with a hint on how to fix
them. A recipe's top-level ``algorithm:`` key picks the trainer in the CLI; ``from_yaml`` skips it.

Writing a config for a new trainer::

    @dataclass
    class MyConfig(TrainConfig):
        group_size: int = config_field(8, "Samples generated per prompt; advantages compare within a group.")

        def validate(self):
            super().validate()
            self._check(self.group_size >= 2, "group_size", "at least 2", "GRPO needs a group to compare.")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from visalign.errors import ConfigError

__all__ = ["ConfigBase", "TrainConfig", "config_field", "load_yaml", "parse_overrides"]

# The recipe key the CLI reads to pick the trainer; configs never see it.
ALGORITHM_KEY = "algorithm"
TRACKERS = ("jsonl", "tensorboard", "wandb")

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")
_NONE = ("none", "null", "~")


def config_field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a one-sentence ``help`` (shown by ``describe`` and ``field_help``).

    Mutable defaults (lists, dicts) are copied for each instance, so they can be written inline.

    Args:
        default: the field's default value.
        help: one sentence saying what the field does.
        **kwargs: passed on to :func:`dataclasses.field`.
    """
    metadata = {**kwargs.pop("metadata", {}), "help": help}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def load_yaml(path: str | os.PathLike) -> dict:
    """Reads a YAML recipe into a dict (an empty file gives ``{}``), with readable errors.

    The CLI uses this to read the ``algorithm`` key before picking a config class.
    """
    if not os.path.isfile(path):
        raise ConfigError(
            f"Config file '{path}' does not exist. Pass the path of a YAML recipe, e.g. configs/toy_grpo.yaml.")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file '{path}' must hold a mapping of key: value lines, got a {type(data).__name__}.")
    return data


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """Splits ``["key=value", "--key=value", ...]`` into ``{key: value}`` (values stay strings).

    Later overrides of the same key win, as on a command line.
    """
    if isinstance(overrides, str):  # a lone string would otherwise be split into characters
        overrides = [overrides]
    out = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.strip().removeprefix("--").strip()
        if not sep or not key:
            raise ConfigError(f"Override '{item}' is not of the form key=value, e.g. learning_rate=1e-4.")
        out[key] = value.strip()
    return out


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations, so configs may use `from __future__ import annotations`.
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _closest(key: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def _parse_sequence(value: str) -> Any:
    # YAML flow syntax when bracketed, otherwise a comma-separated list ("" is the empty list).
    text = value.strip()
    if text.startswith(("[", "(")):
        try:
            return yaml.safe_load("[" + text[1:-1] + "]") if text.endswith(("]", ")")) else text
        except yaml.YAMLError:
            return text  # the caller reports it as not a list
    return [part.strip() for part in text.split(",")] if text else []


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts ``value`` (a YAML value or an override string) to the annotated type ``tp``."""

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"Config key '{key}' expects {_type_name(tp)}, got {value!r}.{extra}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        spells_none = value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        if spells_none and len(arms) < len(args):
            return None
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(arms) == 1 else fail()
    if value is None:
        raise fail(" None (null) is not allowed here.")
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads bare `no`/`off` as False: map it back to the choice that was meant.
            words = _TRUE if value else _FALSE
            value = next((a for a in args if isinstance(a, str) and a.lower() in words), value)
        for choice in args:
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        choices = ", ".join(repr(a) for a in args)
        hint = _closest(str(value), [str(a) for a in args])
        raise ConfigError(f"Config key '{key}' must be one of {choices}; got {value!r}.{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise fail(" Use true/false.")
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        try:
            number = float(value)  # accepts 1e3 and 10.0, which are whole numbers
        except (TypeError, ValueError):
            raise fail() from None
        if number.is_integer():
            return int(number)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        try:
            return float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise fail(" Numbers like 1e-4 or 0.5 work.") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail(" Quote the value in YAML if it is meant as text.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        items = _parse_sequence(value) if isinstance(value, str) else value
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
            raise fail(" Write a list as [a, b] or a,b.")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise fail(f" It needs exactly {len(args)} items.")
            return tuple(_coerce(v, a, key) for v, a in zip(items, args))
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, key) for v in items]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin in (dict, Mapping) or tp is dict:
        mapping = value
        if isinstance(value, str):
            text = value.strip()
            try:
                mapping = yaml.safe_load(text if text.startswith("{") else "{" + text + "}")
            except yaml.YAMLError:
                raise fail(" Write a mapping as {a: 1, b: 0.5}.") from None
        if not isinstance(mapping, Mapping):
            raise fail(" Write a mapping as {a: 1, b: 0.5}.")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, key) for k, v in mapping.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def _plain(value: Any) -> Any:
    # Tuples become lists and mappings plain dicts, so yaml.safe_dump can write them.
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ConfigBase:
    """Mixin for dataclass configs: YAML I/O, ``key=value`` overrides, type coercion, validation, help.

    Subclasses are ``@dataclass``es whose fields are made with :func:`config_field` (or
    ``dataclasses.field(metadata={"help": ...})``). Construction coerces every field to its
    annotated type and then calls :meth:`validate`, which subclasses extend (calling
    ``super().validate()``). A subclass that defines ``__post_init__`` must call
    ``super().__post_init__()``.
    """

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in hints:
                setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Checks value ranges; raises :class:`ConfigError` with a fix hint. Types are already checked."""

    def _check(self, ok: bool, key: str, requirement: str, hint: str = "") -> None:
        """Raises a uniform :class:`ConfigError` for ``key`` unless ``ok``.

        Args:
            ok: the condition that must hold.
            key: the offending field, whose current value goes into the message.
            requirement: what the value must be, e.g. ``"> 0"`` or ``"in (0, 1)"``.
            hint: how to fix it, appended to the message.
        """
        if not ok:
            msg = f"Config key '{key}' must be {requirement}, got {getattr(self, key)!r}."
            raise ConfigError(f"{msg} {hint}".rstrip())

    # ------------------------------------------------------------------ keys
    @classmethod
    def field_names(cls) -> list[str]:
        """The config's keys, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _check_keys(cls, keys, source: str) -> None:
        valid = cls.field_names()
        unknown = [k for k in keys if k not in valid]
        if unknown:
            lines = [f"Unknown config key '{k}' {source}.{_closest(k, valid)}" for k in unknown]
            raise ConfigError(" ".join(lines) + f" Valid keys of {cls.__name__}: {', '.join(valid)}.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Builds a config from a mapping; values are coerced to the field types.

        Args:
            d: ``{key: value}``; values may be YAML values or override strings.

        Raises:
            ConfigError: for an unknown key (naming the closest valid one), a missing required key,
                a value of the wrong type or a value that fails :meth:`validate`.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict expects a mapping of key: value, got {type(d).__name__}.")
        cls._check_keys(d, f"for {cls.__name__}")
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.init and f.name not in d
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{cls.__name__} needs a value for {', '.join(map(repr, missing))}; "
                              "add it to the YAML or as key=value.")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()):
        """Loads a YAML recipe, applies ``key=value`` overrides, and validates the result once.

        The recipe's top-level ``algorithm`` key (the CLI's trainer choice) is skipped unless the
        config declares such a field.

        Args:
            path: the YAML file.
            overrides: ``key=value`` or ``--key=value`` strings; they win over the file.
        """
        data = load_yaml(path)
        if ALGORITHM_KEY not in cls.field_names():
            data.pop(ALGORITHM_KEY, None)
        cls._check_keys(data, f"in {path}")
        extra = parse_overrides(overrides)
        cls._check_keys(extra, "in overrides")
        return cls.from_dict({**data, **extra})

    def with_overrides(self, overrides: Sequence[str]):
        """Returns a new config with ``key=value`` overrides applied (this one is unchanged)."""
        extra = parse_overrides(overrides)
        type(self)._check_keys(extra, "in overrides")
        current = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        return type(self).from_dict({**current, **extra})

    def replace(self, **kwargs):
        """Returns a copy with some fields changed (coerced and validated like any construction)."""
        type(self)._check_keys(kwargs, "in replace()")
        return dataclasses.replace(self, **kwargs)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able types (lists, dicts, str, numbers, bools, None)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML that :meth:`from_yaml` reads back to an equal config."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, allow_unicode=True)

    @classmethod
    def field_help(cls, name: str) -> str:
        """The one-sentence help of field ``name``."""
        cls._check_keys([name], f"for {cls.__name__}")
        return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)

    def describe(self, with_help: bool = False) -> str:
        """A readable listing of every field and its value, for the log at the start of a run.

        Args:
            with_help: also print each field's help sentence after its value.
        """
        values = {name: repr(getattr(self, name)) for name in self.field_names()}
        width = max(map(len, values), default=0)
        value_width = max(map(len, values.values()), default=0)
        lines = [f"{type(self).__name__}:"]
        for name, value in values.items():
            line = f"  {name:<{width}} = {value}"
            if with_help and self.field_help(name):
                line = f"{line:<{width + value_width + 5}}  # {self.field_help(name)}"
            lines.append(line)
        return "\n".join(lines)


@dataclass
class TrainConfig(ConfigBase):
    """Options of the shared training loop; every algorithm's config extends this one."""

    # run
    output_dir: str = config_field(
        "runs/train", "Run folder for checkpoints, logs, samples and the config dump.")
    seed: int = config_field(
        0, "Seed of every random stream (data order, noise, dropout); each rank derives its own from it.")
    max_steps: int = config_field(
        100, "Training iterations; for GRPO one iteration is one rollout plus its optimizer updates.")
    # optimizer
    learning_rate: float = config_field(1e-4, "Peak AdamW learning rate.")
    adam_beta1: float = config_field(0.9, "AdamW beta1, the decay of the gradient's running mean.")
    adam_beta2: float = config_field(0.999, "AdamW beta2, the decay of the squared gradient's running mean.")
    adam_weight_decay: float = config_field(1e-4, "AdamW decoupled weight decay.")
    adam_epsilon: float = config_field(1e-8, "AdamW epsilon added to the denominator for numerical stability.")
    max_grad_norm: float | None = config_field(
        1.0, "Clip the gradient's global norm to this value; None disables clipping.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = config_field(
        "constant", "Learning-rate schedule over max_steps: constant, constant_with_warmup, linear or cosine.")
    lr_warmup_steps: int = config_field(
        0, "Steps of linear warmup from 0 to learning_rate (needs a scheduler other than 'constant').")
    # precision and memory
    mixed_precision: Literal["no", "fp16", "bf16"] = config_field(
        "no", "Autocast dtype of the forward pass: no (fp32), fp16 (trainable weights kept in fp32) or bf16.")
    gradient_checkpointing: bool = config_field(
        False, "Recompute the denoiser's activations in backward to save memory.")
    # LoRA and EMA
    use_lora: bool = config_field(
        True, "Train LoRA adapters on the denoiser; false fine-tunes all of its weights.")
    lora_rank: int = config_field(8, "Rank of the LoRA update matrices.")
    lora_alpha: float | None = config_field(
        None, "LoRA scaling numerator (the update is scaled by alpha/rank); None uses the rank, i.e. scale 1.")
    lora_target_modules: list[str] | None = config_field(
        None, "Module names that get LoRA adapters; None uses the model family's defaults.")
    lora_dropout: float = config_field(0.0, "Dropout on the LoRA input during training.")
    ema_decay: float | None = config_field(
        None, "Decay of an EMA of the trainable weights, in (0, 1); None disables EMA.")
    # checkpoints
    checkpoint_every: int = config_field(
        0, "Write a checkpoint every N steps; 0 disables periodic checkpoints.")
    keep_last: int = config_field(2, "How many of the newest checkpoints to keep; older ones are deleted.")
    resume: str | None = config_field(
        None, "Resume from 'latest' (the newest checkpoint in output_dir) or a checkpoint path; None starts fresh.")
    # logging and samples
    log_every: int = config_field(1, "Log metrics every N steps.")
    trackers: list[str] = config_field(
        ["jsonl"], "Metric sinks: any of jsonl (metrics.jsonl in output_dir), tensorboard, wandb.")
    sample_every: int = config_field(
        0, "Save sample images or videos with their prompts and rewards every N steps; 0 disables.")
    sample_prompts: list[str] | None = config_field(
        None, "Prompts for the saved samples; None takes the first few prompts of the training source.")
    max_bad_steps: int = config_field(
        5, "Consecutive skipped steps (rewards of the wrong shape, or NaN) after which training stops "
           "with an error and a checkpoint.")
    # generation size
    height: int | None = config_field(None, "Generated height in pixels; None uses the model family's default.")
    width: int | None = config_field(None, "Generated width in pixels; None uses the model family's default.")
    num_frames: int | None = config_field(
        None, "Frames per generated video; None uses the model family's default (ignored for images).")

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.seed >= 0, "seed", ">= 0")
        c(self.max_steps >= 1, "max_steps", ">= 1")
        c(self.learning_rate > 0, "learning_rate", "> 0", "Typical LoRA values are 1e-5 to 3e-4.")
        c(0 <= self.adam_beta1 < 1, "adam_beta1", "in [0, 1)")
        c(0 <= self.adam_beta2 < 1, "adam_beta2", "in [0, 1)")
        c(self.adam_weight_decay >= 0, "adam_weight_decay", ">= 0")
        c(self.adam_epsilon > 0, "adam_epsilon", "> 0")
        c(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or None",
          "Use max_grad_norm=none to disable clipping.")
        c(self.lr_warmup_steps >= 0, "lr_warmup_steps", ">= 0")
        c(self.lr_warmup_steps == 0 or self.lr_scheduler != "constant", "lr_warmup_steps",
          "0 with lr_scheduler='constant'", "Set lr_scheduler=constant_with_warmup (or linear/cosine) to warm up.")
        c(self.lora_rank >= 1, "lora_rank", ">= 1")
        c(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "> 0 or None", "None uses the rank.")
        c(self.lora_target_modules is None or len(self.lora_target_modules) > 0, "lora_target_modules",
          "a non-empty list or None", "Use lora_target_modules=none for the family's defaults.")
        c(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        c(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "in (0, 1) or None",
          "Typical values are 0.99 to 0.9999; ema_decay=none disables EMA.")
        c(self.checkpoint_every >= 0, "checkpoint_every", ">= 0", "0 disables periodic checkpoints.")
        c(self.keep_last >= 1, "keep_last", ">= 1")
        c(self.log_every >= 1, "log_every", ">= 1")
        bad = [t for t in self.trackers if t not in TRACKERS]
        c(not bad, "trackers", f"a list of {', '.join(TRACKERS)}", f"Unknown: {', '.join(map(repr, bad))}.")
        c(len(set(self.trackers)) == len(self.trackers), "trackers", "free of duplicates")
        c(self.sample_every >= 0, "sample_every", ">= 0", "0 disables samples.")
        c(self.sample_prompts is None or len(self.sample_prompts) > 0, "sample_prompts", "a non-empty list or None")
        c(self.max_bad_steps >= 1, "max_bad_steps", ">= 1")
        for key in ("height", "width", "num_frames"):
            value = getattr(self, key)
            c(value is None or value >= 1, key, ">= 1 or None", "None uses the family default.")
