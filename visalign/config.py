"""Dataclass configs that load from YAML recipes and take ``key=value`` overrides.

:class:`ConfigBase` is the machinery every option set in visalign shares: the sampling options
(:class:`visalign.sampling.options.SamplingOptions`), the training loop's options
(:class:`visalign.training.config.TrainConfig`) and each algorithm's config::

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
A renamed key keeps working under its old name, with a ``FutureWarning`` (``renamed_fields``).

Writing a config for a new trainer::

    @dataclass
    class MyConfig(RolloutConfig):
        beta: float = config_field(1.0, "Strength of the regression; larger trusts the reward more.")

        def validate(self):
            super().validate()
            self._check(self.beta > 0, "beta", "> 0", "Try 1.0.")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import yaml

from visalign.errors import ConfigError

__all__ = ["ConfigBase", "config_field", "load_yaml", "override_default", "parse_overrides"]

# The recipe key the CLI reads to pick the trainer; configs never see it.
ALGORITHM_KEY = "algorithm"

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


def override_default(base: type, name: str, default: Any) -> Any:
    """Redeclares the field ``name`` of the config class ``base`` with another default, keeping its help.

    An algorithm whose papers use another default (GRPO samples 10 steps, DPO samples with the ODE)
    writes ``num_steps: int = override_default(SamplingOptions, "num_steps", 10)``.
    """
    field = next((f for f in dataclasses.fields(base) if f.name == name), None)
    if field is None:
        raise ConfigError(f"{base.__name__} has no field '{name}' to override.")
    return config_field(
        default, field.metadata["help"], metadata={k: v for k, v in field.metadata.items() if k != "help"}
    )


def load_yaml(path: str | os.PathLike) -> dict:
    """Reads a YAML recipe into a dict (an empty file gives ``{}``), with readable errors.

    The CLI uses this to read the ``algorithm`` key before picking a config class.
    """
    if not os.path.isfile(path):
        raise ConfigError(
            f"Config file '{path}' does not exist. Pass the path of a YAML recipe, e.g. configs/toy_grpo.yaml."
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of key: value lines, got a {type(data).__name__}.")
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


@functools.cache
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


class _ConfigMeta(type):
    """Maps renamed keyword arguments to their new names before the dataclass ``__init__`` runs."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **cls._rename(kwargs))


class ConfigBase(metaclass=_ConfigMeta):
    """Mixin for dataclass configs: YAML I/O, ``key=value`` overrides, type coercion, validation, help.

    Subclasses are ``@dataclass``es whose fields are made with :func:`config_field` (or
    ``dataclasses.field(metadata={"help": ...})``). Construction coerces every field to its
    annotated type and then calls :meth:`validate`, which subclasses extend (calling
    ``super().validate()``). A subclass that defines ``__post_init__`` must call
    ``super().__post_init__()``.

    ``renamed_fields`` maps old key names to new ones; the old names keep working everywhere
    (keywords, YAML, overrides, ``replace``) with a ``FutureWarning``.
    """

    renamed_fields: ClassVar[dict[str, str]] = {}

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
    def _rename(cls, kwargs: dict[str, Any], source: str = "") -> dict[str, Any]:
        """``kwargs`` with renamed keys under their new names (warning once per key)."""
        renamed = {k: v for k, v in cls.renamed_fields.items() if k in kwargs}
        if not renamed:
            return kwargs
        kwargs = dict(kwargs)
        for old, new in renamed.items():
            if new in kwargs:
                raise ConfigError(
                    f"Config keys '{old}' and '{new}' were both given; '{old}' is the old name of "
                    f"'{new}': keep only '{new}'."
                )
            warnings.warn(
                f"Config key '{old}' is now called '{new}'{source}; the old name will stop working in a "
                f"future release.",
                FutureWarning,
                stacklevel=4,
            )
            kwargs[new] = kwargs.pop(old)
        return kwargs

    @classmethod
    def _check_keys(cls, keys, source: str) -> None:
        valid = cls.field_names()
        unknown = [k for k in keys if k not in valid and k not in cls.renamed_fields]
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
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.name not in d
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"{cls.__name__} needs a value for {', '.join(map(repr, missing))}; add it to the YAML or as key=value."
            )
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
        return cls.from_dict({**cls._rename(data, f" (in {path})"), **cls._rename(extra, " (in overrides)")})

    def with_overrides(self, overrides: Sequence[str]):
        """Returns a new config with ``key=value`` overrides applied (this one is unchanged)."""
        extra = parse_overrides(overrides)
        type(self)._check_keys(extra, "in overrides")
        current = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        return type(self).from_dict({**current, **type(self)._rename(extra, " (in overrides)")})

    def replace(self, **kwargs):
        """Returns a copy with some fields changed (coerced and validated like any construction)."""
        type(self)._check_keys(kwargs, "in replace()")
        return dataclasses.replace(self, **type(self)._rename(kwargs, " (in replace())"))

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
