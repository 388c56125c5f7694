"""The ``visalign`` command line and the YAML recipes, end to end on tiny and toy models."""

import csv
import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.distributed import launch_two_processes
from visalign.cli import build_parser, main
from visalign.errors import ConfigError
from visalign.recipes import build_reward, parse_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_PROMPTS = ["a red circle on the left", "a blue square on the right"]
# Overrides that make any toy recipe take seconds; each is applied only where the recipe's config has the field.
FAST_OVERRIDES = {"max_steps": 1, "group_size": 2, "prompts_per_step": 1, "num_steps": 4}


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_recipe_parses(recipe):
    """Real-model recipes validate without downloading anything (config fields, reward types, prompts)."""
    trainer_class, fields, config = parse_recipe(recipe)
    assert fields["model"] and config.max_steps > 0
    prompts = fields["prompts"]
    assert isinstance(prompts, list) or os.path.exists(prompts), prompts


def test_help_explains_every_option():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"demo", "train", "score", "sample", "steer", "serve-reward", "plan"}
    for command, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, (command, action.dest)
    steer_options = {o for a in commands["steer"]._actions for o in a.option_strings}
    assert {
        "--method",
        "--reward",
        "--particles",
        "--potential",
        "--lam",
        "--resample-every",
        "--ess-threshold",
        "--grad-scale",
        "--steps",
        "--guidance-scale",
        "--seed",
        "--height",
        "--width",
        "--num-frames",
        "--out",
    } <= steer_options
    out = subprocess.run([sys.executable, "-m", "visalign", "--help"], capture_output=True, text=True, check=True)
    assert all(c in out.stdout for c in ("train", "steer", "sample", "score", "demo"))


def test_train_with_overrides(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                os.path.join(ROOT, "configs", "tiny_grpo.yaml"),
                "max_steps=2",
                f"output_dir={out}",
                "model=tiny:flux",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 2 and (out / "model" / "model_index.json").exists()
    assert "FluxPipeline" in open(out / "model" / "model_index.json").read()


def test_recipe_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: grpo\nmodel: tiny:sd3\nreward: brightness\ngrup_size: 4\n")
    with pytest.raises(ConfigError, match="group_size"):
        parse_recipe(str(recipe))
    recipe.write_text("algorithm: ppo\nmodel: tiny:sd3\n")
    with pytest.raises(ConfigError, match="grpo"):
        parse_recipe(str(recipe))
    recipe.write_text("algorithm: grpo\nmodel: tiny:sd3\nreward: ImageReward9000\n")
    with pytest.raises(ConfigError, match="Unknown reward type"):
        parse_recipe(str(recipe))


def test_sample_then_score(tmp_path):
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "tiny:sd3",
                "-p",
                "a red circle",
                "-p",
                "a blue square",
                "--steps",
                "3",
                "--height",
                "32",
                "--width",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "grid.png").exists()
    # score a folder of single images with a prompts.csv
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(250, 250, 250), (10, 10, 10)]):
        Image.new("RGB", (16, 16), color).save(folder / f"img{i}.png")
    with open(folder / "prompts.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "prompt"], ["img0.png", "white"], ["img1.png", "black"]])
    assert main(["score", str(folder), "--reward", "brightness"]) == 0
    rows = list(csv.DictReader(open(folder / "rewards.csv")))
    assert [r["file"] for r in rows] == ["img0.png", "img1.png"]
    assert float(rows[0]["reward"]) > 0.9 > 0.1 > float(rows[1]["reward"])


def test_combined_reward_spec():
    reward = build_reward({"a": {"type": "brightness", "weight": 2.0}, "b": "brightness"})
    assert reward.weights == {"a": 2.0, "b": 1.0}


def _fast_overrides(recipe: str) -> list[str]:
    trainer_class, _, config = parse_recipe(recipe)
    fields = {f.name for f in dataclasses.fields(trainer_class.config_class)}
    overrides = [f"{k}={v}" for k, v in FAST_OVERRIDES.items() if k in fields]
    if getattr(config, "sde_window_size", None):  # the recipe's window, shrunk to the fast run's steps
        overrides += ["sde_window_size=1", f"sde_window_range=[0,{FAST_OVERRIDES['num_steps'] // 2}]"]
    return overrides


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(ROOT, "configs", "toy_*.yaml"))), ids=os.path.basename)
def test_train_every_toy_recipe(recipe, tmp_path):
    """Every toy recipe trains end to end (one fast iteration) and saves its LoRA or model."""
    out = tmp_path / "run"
    assert main(["train", recipe, f"output_dir={out}", *_fast_overrides(recipe)]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 1
    _, fields, config = parse_recipe(recipe)
    if config.use_lora:  # the saved LoRA loads back for sampling
        assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
        assert (
            main(
                [
                    "sample",
                    str(fields["model"]),
                    "--lora",
                    str(out / "lora"),
                    "-p",
                    "a red circle on the left",
                    "--steps",
                    "2",
                    "--out",
                    str(tmp_path / "after"),
                ]
            )
            == 0
        )
        assert (tmp_path / "after" / "grid.png").exists()
    else:
        assert (out / "model" / "model_index.json").exists()


def test_toy_recipe_prompts_are_the_toy_captions():
    from visalign.toy import all_captions
    from visalign.training.prompts import PromptSource

    _, fields, _ = parse_recipe(os.path.join(ROOT, "configs", "toy_grpo.yaml"))
    assert PromptSource.from_any(fields["prompts"]).prompts == all_captions()


def test_toy_t2i_loads_with_short_text():
    from visalign.recipes import load_policy

    assert load_policy("toy:t2i").max_sequence_length == 1


def test_sample_toy_then_score(tmp_path, capsys):
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "toy:t2i",
                "-p",
                TOY_PROMPTS[0],
                "-p",
                TOY_PROMPTS[1],
                "--num",
                "2",
                "--steps",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "grid.png").exists() and (out / "prompts.json").exists()
    assert sorted(p.name for p in out.glob("sample_*.png")) == [f"sample_{i:03d}.png" for i in range(4)]
    assert main(["score", str(out), "--reward", "toy_clip"]) == 0
    assert "Skipping 1 file(s)" in capsys.readouterr().out  # grid.png has no prompt
    rows = list(csv.DictReader(open(out / "rewards.csv")))
    assert [r["file"] for r in rows] == [f"sample_{i:03d}.png" for i in range(4)]
    assert [r["prompt"] for r in rows] == [TOY_PROMPTS[0]] * 2 + [TOY_PROMPTS[1]] * 2
    assert all(-1 <= float(r["reward"]) <= 1 for r in rows)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("fk", ["--particles", "3", "--resample-every", "2", "--potential", "diff", "--lambda", "5"]),
        ("best-of-n", ["--particles", "3"]),
        ("guidance", ["--particles", "2", "--grad-scale", "0.5", "--guidance-steps", "1", "4"]),
    ],
)
def test_steer_toy(method, extra, tmp_path, capsys):
    """Each steering method end to end on the toy T2I with the toy CLIP reward; ``score`` agrees with it."""
    out = tmp_path / method
    assert (
        main(
            [
                "steer",
                "toy:t2i",
                "-p",
                TOY_PROMPTS[0],
                "-p",
                TOY_PROMPTS[1],
                "--method",
                method,
                "--reward",
                "toy_clip",
                "--steps",
                "4",
                "--guidance-scale",
                "1.0",
                "--out",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out
    assert f"with {method}" in summary and "mean reward" in summary
    record = json.load(open(out / "steer.json"))
    n = int(extra[1])
    assert record["prompts"] == TOY_PROMPTS and record["particles"] == n
    assert len(record["all_rewards"]) == 2 and all(len(r) == n for r in record["all_rewards"])
    # the chosen sample of each prompt is its best one
    assert record["rewards"] == pytest.approx([max(r) for r in record["all_rewards"]])
    assert f"{record['mean_reward']:.4f}" in summary
    assert (out / "grid.png").exists()
    rows = list(csv.DictReader(open(out / "steer.csv")))
    assert [r["file"] for r in rows] == ["sample_000.png", "sample_001.png"]
    # re-scoring the written PNGs gives the same rewards up to 8-bit rounding
    assert main(["score", str(out), "--reward", "toy_clip"]) == 0
    scored = [float(r["reward"]) for r in csv.DictReader(open(out / "rewards.csv"))]
    assert scored == pytest.approx(record["rewards"], abs=0.02)


def test_cli_errors_speak_to_users(tmp_path, capsys, monkeypatch):
    """A bad option ends with the library's message on stderr and exit status 1, not a traceback."""
    args = [
        "steer",
        "tiny:sd3",
        "-p",
        "a red circle",
        "--reward",
        "brightness",
        "--sampler",
        "ode",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.delenv("VISALIGN_TRACEBACK", raising=False)
    assert main(args) == 1
    assert "stochastic sampler" in capsys.readouterr().err
    assert main(["score", str(tmp_path), "--reward", "brightness"]) == 1
    assert "no images or videos" in capsys.readouterr().err
    monkeypatch.setenv("VISALIGN_TRACEBACK", "1")
    from visalign.errors import SamplerError

    with pytest.raises(SamplerError):
        main(args)


def test_train_under_accelerate_launch(tmp_path):
    """`accelerate launch -m visalign train` runs the recipe on two real CPU processes (gloo)."""
    out = tmp_path / "run"
    result = launch_two_processes(
        "-m",
        "visalign",
        "train",
        os.path.join(ROOT, "configs", "tiny_grpo.yaml"),
        "max_steps=2",
        "num_steps=3",
        f"output_dir={out}",
    )
    assert result.stdout.count("Done:") == 1  # the main process reports, once
    assert "processes: 2" in result.stdout
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["step"] for row in logged] == [1, 2]
    assert (out / "model").is_dir()


def test_score_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VISALIGN_TRACEBACK", raising=False)
    assert main(["score", str(tmp_path / "nowhere"), "--reward", "brightness"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["score", str(tmp_path / "a.png"), "--reward", "brightness"]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


def test_sampling_flags_come_from_sampling_options():
    """Every SamplingOptions field not marked cli=False is a flag of sample and steer, with its help and choices."""
    from visalign.sampling import SamplingOptions

    commands = build_parser()._subparsers._group_actions[0].choices
    fields = [f for f in dataclasses.fields(SamplingOptions) if f.metadata.get("cli", True) is not False]
    assert {"num_steps", "guidance_scale", "sampler", "noise", "eta"} <= {f.name for f in fields}
    for command, sampler in (("sample", "ode"), ("steer", "sde")):
        actions = {a.dest: a for a in commands[command]._actions}
        for f in fields:
            assert f.metadata["help"] in actions[f.name].help, (command, f.name)
        assert actions["num_steps"].option_strings == ["--steps", "--num-steps"]
        assert actions["num_steps"].default == 20 and actions["num_steps"].type is int
        assert actions["sampler"].default == sampler and actions["sampler"].choices == ["ode", "sde", "cps", "ddim"]
        assert actions["eta"].type is float and actions["eta"].default is None
        required = ["--reward", "brightness"] if command == "steer" else []
        args = commands[command].parse_args(["m", "--num-steps", "7", "--eta", "0.5", "--noise", "dance", *required])
        assert (args.num_steps, args.eta, args.noise) == (7, 0.5, "dance")


def test_sample_of_a_missing_local_model_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VISALIGN_TRACEBACK", raising=False)
    missing = str(tmp_path / "no_such_model")
    assert main(["sample", missing, "-p", "a red circle", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "does not exist; pass a local folder written by save_pretrained or a hub id" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
