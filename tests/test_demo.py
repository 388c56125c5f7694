"""`make demo`: GRPO on the toy world with a self-contained report."""

import json
import os
import re

import pytest

from visalign.cli import main
from visalign.demo import DEMO_CONFIG, run_demo
from visalign.recipes import parse_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_demo_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-steps", "1", "--eval-every", "1", "--eval-prompts", "4"]) == 0
    path = str(out / "report.html")
    assert f"Report: {path}" in capsys.readouterr().out
    html = open(path).read()
    for heading in ("Result", "Before: the base model", "After GRPO", "Curves", "Timings", "Config"):
        assert heading in html
    # Self-contained: every image is embedded, nothing is fetched.
    sources = re.findall(r"src=['\"]([^'\"]+)", html)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "learning_rate" in html and "mean iteration (s)" in html
    summary = json.load(open(tmp_path / "demo" / "summary.json"))
    assert [c["step"] for c in summary["curve"]] == [0, 1]
    for side in ("before", "after"):
        assert 0 <= summary[side]["all_correct"] <= 1
        assert set(summary[side]["accuracy"]) == {"color", "shape", "position"}
    assert os.path.exists(tmp_path / "demo" / "lora" / "pytorch_lora_weights.safetensors")


def test_toy_grpo_recipe_is_the_demo():
    """`visalign train configs/toy_grpo.yaml` runs exactly the demo's GRPO settings."""
    _, recipe, config = parse_recipe(os.path.join(ROOT, "configs", "toy_grpo.yaml"))
    assert recipe["model"] == "toy:t2i"
    assert recipe["reward"] in ("toy_clip", {"type": "toy_clip"})
    assert {k: getattr(config, k) for k in DEMO_CONFIG} == DEMO_CONFIG


@pytest.mark.slow
def test_demo_raises_evaluator_accuracy(tmp_path):
    """The full demo, seeded: the exact evaluator's accuracy and the reward rise by stated margins.

    Measured on 2026-11-22 (2-core CPU, fresh clone, 1 and 2 threads alike): all-correct 50.0% →
    68.8%, shape 64.6% → 79.2%, toy-CLIP reward 0.685 → 0.721 on the 48 fixed prompts. The margins
    are about half of that (one eval sample is 2.1 points); seed 1 gains only +8.3 points, so a
    float-level change of trajectory on another CPU can land below them.
    """
    run_demo(str(tmp_path / "demo"), seed=0)
    summary = json.load(open(tmp_path / "demo" / "summary.json"))
    before, after = summary["before"], summary["after"]
    assert after["all_correct"] - before["all_correct"] >= 0.10, summary["curve"]
    assert after["accuracy"]["shape"] - before["accuracy"]["shape"] >= 0.05, summary
    assert after["reward"] - before["reward"] >= 0.02, summary
