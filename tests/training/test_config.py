"""Dataclass configs: defaults, YAML round trip, override coercion, unknown keys, validation, subclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from visalign.errors import ConfigError
from visalign.training.config import ConfigBase, TrainConfig, config_field, parse_overrides


@dataclass
class AlgoConfig(TrainConfig):
    """A trainer's config: TrainConfig plus fields of every supported type."""

    group_size: int = config_field(4, "Samples per prompt.")
    weights: dict[str, float] = config_field({"clip": 1.0}, "Reward weights.")
    window: tuple[int, int] = config_field((0, 4), "SDE window.")
    steps: list[int] = config_field([1, 2], "Some step indices.")
    noise: Literal["flow", "dance", "cps"] = config_field("flow", "Noise schedule.")
    tag: str | None = config_field(None, "A free-form tag.")

    def validate(self):
        super().validate()
        self._check(self.group_size >= 2, "group_size", ">= 2", "A group needs two members.")


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults and output
def test_defaults_and_help():
    cfg = TrainConfig()
    assert (cfg.learning_rate, cfg.trackers, cfg.lr_scheduler, cfg.lora_alpha) == (1e-4, ["jsonl"], "constant", None)
    assert TrainConfig().trackers is not cfg.trackers  # mutable defaults are per instance
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help", "").endswith("."), f"{f.name} lacks a help sentence"
    assert "gradient" in TrainConfig.field_help("max_grad_norm")
    text = cfg.describe(with_help=True)
    assert text.startswith("TrainConfig:") and "learning_rate" in text and "Peak AdamW" in text
    with pytest.raises(ConfigError, match="Did you mean 'seed'"):
        TrainConfig.field_help("sed")


def test_yaml_round_trip(tmp_path):
    cfg = AlgoConfig(
        learning_rate=3e-5,
        ema_decay=0.99,
        lora_target_modules=["to_q", "to_v"],
        weights={"clip": 1.0, "aesthetic": 0.5},
        window=(1, 3),
        tag="x",
    )
    cfg.to_yaml(tmp_path / "sub" / "config.yaml")
    back = AlgoConfig.from_yaml(tmp_path / "sub" / "config.yaml")
    assert back == cfg
    assert back.window == (1, 3) and cfg.to_dict()["window"] == [1, 3]  # plain YAML types out, tuple back


# ---------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("learning_rate=1e-4", "learning_rate", 1e-4),
        ("learning_rate=2", "learning_rate", 2.0),
        ("--max_steps=7", "max_steps", 7),
        ("max_steps=1e3", "max_steps", 1000),
        ("use_lora=no", "use_lora", False),
        ("gradient_checkpointing=True", "gradient_checkpointing", True),
        ("gradient_checkpointing=1", "gradient_checkpointing", True),
        ("output_dir=runs/a=b", "output_dir", "runs/a=b"),
        ("lora_alpha=none", "lora_alpha", None),
        ("lora_alpha=16", "lora_alpha", 16.0),
        ("resume=latest", "resume", "latest"),
        ("resume=null", "resume", None),
        ("trackers=[jsonl,tensorboard]", "trackers", ["jsonl", "tensorboard"]),
        ("trackers=jsonl, wandb", "trackers", ["jsonl", "wandb"]),
        ("trackers=", "trackers", []),
        ("sample_prompts=[a cat, 'a dog, running']", "sample_prompts", ["a cat", "a dog, running"]),
        ("mixed_precision=bf16", "mixed_precision", "bf16"),
        ("steps=[3, 1e1]", "steps", [3, 10]),
        ("window=4,8", "window", (4, 8)),
        ("weights={clip: 1, aesthetic: 0.5}", "weights", {"clip": 1.0, "aesthetic": 0.5}),
        ("weights=clip: 2", "weights", {"clip": 2.0}),
        ("noise=dance", "noise", "dance"),
        ("tag=none", "tag", None),
    ],
)
def test_override_coercion(override, key, expected):
    cfg = AlgoConfig().with_overrides([override])
    value = getattr(cfg, key)
    assert value == expected and type(value) is type(expected)


def test_with_overrides_returns_new_config_and_later_wins():
    cfg = TrainConfig()
    new = cfg.with_overrides(["seed=1", "seed=2"])
    assert (cfg.seed, new.seed) == (0, 2)
    assert parse_overrides(["--a=1", "b= x "]) == {"a": "1", "b": "x"}


@pytest.mark.parametrize(
    "override, match",
    [
        ("lr_scheduler=cosin", r"one of 'constant', 'constant_with_warmup', 'linear', 'cosine'.*Did you mean 'cosine'"),
        ("max_steps=2.5", r"'max_steps' expects int"),
        ("learning_rate=fast", r"'learning_rate' expects float.*1e-4"),
        ("use_lora=maybe", r"'use_lora' expects bool"),
        ("max_steps=none", r"'max_steps' expects int"),
        ("window=1,2,3", r"exactly 2 items"),
        ("weights=[1, 2]", r"'weights' expects"),
        ("trackers=[jsonl", r"'trackers' expects"),
        ("learning_rate", r"not of the form key=value"),
    ],
)
def test_bad_override_values(override, match):
    with pytest.raises(ConfigError, match=match):
        AlgoConfig().with_overrides([override])


def test_replace_coerces_and_validates():
    cfg = TrainConfig().replace(learning_rate=1, trackers=("jsonl",))
    assert cfg.learning_rate == 1.0 and cfg.trackers == ["jsonl"]
    with pytest.raises(ConfigError, match="Did you mean 'keep_last'"):
        cfg.replace(keep_lst=3)


# ---------------------------------------------------------------- YAML specifics
def test_yaml_values_coerced_and_algorithm_ignored(tmp_path):
    path = write(tmp_path, "algorithm: grpo\nlearning_rate: 1e-4\nmixed_precision: no\nlora_alpha: 4\nmax_steps: 3\n")
    cfg = TrainConfig.from_yaml(path, ["max_steps=5"])
    # YAML 1.1 reads 1e-4 as a string and a bare `no` as False; both arrive as meant.
    assert (cfg.learning_rate, cfg.mixed_precision, cfg.lora_alpha, cfg.max_steps) == (1e-4, "no", 4.0, 5)


def test_empty_yaml_gives_defaults(tmp_path):
    assert TrainConfig.from_yaml(write(tmp_path, "")) == TrainConfig()


def test_unknown_keys_suggest_closest(tmp_path):
    path = write(tmp_path, "learning_rat: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"Unknown config key 'learning_rat' in .*cfg.yaml\. Did you mean 'learning_rate'\? Valid keys",
    ):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=r"'lora_rnk' in overrides\. Did you mean 'lora_rank'"):
        TrainConfig.from_yaml(write(tmp_path, "seed: 1\n", "ok.yaml"), ["lora_rnk=4"])
    with pytest.raises(ConfigError, match=r"'grup_size'.*Did you mean 'group_size'"):
        AlgoConfig.from_dict({"grup_size": 4})


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        TrainConfig.from_yaml(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(write(tmp_path, "a: [1\n"))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": 0}, r"'learning_rate' must be > 0"),
        ({"keep_last": 0}, r"'keep_last' must be >= 1"),
        ({"ema_decay": 1.0}, r"'ema_decay' must be in \(0, 1\)"),
        ({"lora_rank": 0}, r"'lora_rank' must be >= 1"),
        ({"trackers": ["jsonl", "mlflow"]}, r"'trackers'.*Unknown: 'mlflow'"),
        ({"max_grad_norm": -1}, r"max_grad_norm=none"),
        ({"lr_warmup_steps": 10}, r"lr_scheduler=constant_with_warmup"),
        ({"height": 0}, r"'height' must be >= 1 or None"),
        ({"max_steps": 0}, r"'max_steps' must be >= 1"),
        ({"lora_target_modules": []}, r"non-empty list"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_subclass_validation_and_missing_required():
    with pytest.raises(ConfigError, match="'group_size' must be >= 2.*two members"):
        AlgoConfig().with_overrides(["group_size=1"])

    @dataclass
    class Required(ConfigBase):
        name: str = dataclasses.field(metadata={"help": "A required name."})

    with pytest.raises(ConfigError, match="needs a value for 'name'"):
        Required.from_dict({})
    assert Required.from_dict({"name": 3}).name == "3"


def test_future_annotations_subclass_round_trip(tmp_path):
    # This module uses `from __future__ import annotations`: every hint is a string.
    path = write(tmp_path, "algorithm: grpo\ngroup_size: 8\nnoise: cps\nweights: {clip: 1e-1}\n")
    cfg = AlgoConfig.from_yaml(path, ["window=[2, 6]"])
    assert (cfg.group_size, cfg.noise, cfg.weights, cfg.window) == (8, "cps", {"clip": 0.1}, (2, 6))
    assert cfg.learning_rate == 1e-4  # inherited defaults still there
    cfg.to_yaml(tmp_path / "out.yaml")
    assert AlgoConfig.from_yaml(tmp_path / "out.yaml") == cfg
