"""Smoke test of benchmarks/efficiency.py: one short run on the toy model, its JSONL rows and the summary."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("efficiency_bench", os.path.join(ROOT, "benchmarks", "efficiency.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_and_sample_counts():
    from visalign.recipes import parse_recipe

    eff = _load()
    expected = {"grpo": 32, "grpo_fast": 32, "grpo_guard": 32, "dpo": 32, "prdp": 64, "draft": 8, "nft": 32, "awm": 32}
    for algorithm in eff.ALGORITHMS:
        path, _ = eff.recipe_for(algorithm)
        _, _, config = parse_recipe(path, eff.run_overrides(algorithm, 3, 1, "unused"))
        assert eff.samples_per_iteration(algorithm, config) == expected[algorithm], algorithm
        assert config.seed == 3 and config.true_metric_every == 0 and config.checkpoint_every == 0

    def config(algorithm):
        return parse_recipe(eff.recipe_for(algorithm)[0], eff.run_overrides(algorithm, 0, 1, "unused"))[2]

    fast, guard, grpo = config("grpo_fast"), config("grpo_guard"), config("grpo")
    assert fast.sde_window_size == 3 and fast.sde_window_mode == "random" and tuple(fast.sde_window_range) == (0, 5)
    # The GRPO options are the GRPO recipe plus the option (and their tuned updates_per_rollout).
    same = ("learning_rate", "clip_range", "eta", "group_size", "prompts_per_step", "timestep_fraction", "lora_rank")
    for variant in (fast, guard):
        assert {k: getattr(variant, k) for k in same} == {k: getattr(grpo, k) for k in same}
    assert guard.ratio == "guard"


def test_tuning_specs_add_overrides_to_the_recipe():
    import argparse

    from visalign.recipes import parse_recipe

    eff = _load()
    spec = "grpo_fast@learning_rate=3e-3@updates_per_rollout=4"
    assert eff.check_spec(spec) == spec
    path, overrides = eff.recipe_for(spec)
    assert path.endswith("toy_grpo_fast.yaml") and overrides == ["learning_rate=3e-3", "updates_per_rollout=4"]
    _, _, config = parse_recipe(path, eff.run_overrides(spec, 0, 1, "unused"))
    assert config.learning_rate == 3e-3 and config.updates_per_rollout == 4 and config.sde_window_size == 3
    assert eff.samples_per_iteration("draft@learning_rate=3e-4", config) == config.prompts_per_step
    for bad in ("nope", "nft@learning_rate"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected one of"):
            eff.check_spec(bad)
    # Every algorithm gets the same number of alternatives.
    assert set(eff.TUNING_GRID) == set(eff.ALGORITHMS) and {len(v) for v in eff.TUNING_GRID.values()} == {2}


# Two DiffusionNFT iterations (64 samples) and three small evaluations: 60-70 s on the shared 2-core
# sandbox at load average 7-8 (about 30 s per iteration), so over the ~60 s a fast test may take.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_run_rows_resume_and_summary(tmp_path, capsys):
    eff = _load()
    out = str(tmp_path / "eff.jsonl")
    rows = eff.run_one("nft", 0, [32, 64], eval_captions=4, out=out, threads=1, with_base=True)
    written = [json.loads(line) for line in open(out)]
    assert written == rows
    assert [(r["algorithm"], r["budget"]) for r in rows] == [("base", 0), ("nft", 32), ("nft", 64)]
    for r in rows[1:]:
        assert r["samples"] == r["budget"] and r["iterations"] == r["budget"] // 32
        assert 0.0 <= r["all_correct"] <= 1.0 and set(r["accuracy"]) == {"color", "shape", "position"}
        assert r["reward"] > 0 and r["train_wall_s"] > 0 and r["peak_rss_mib"] > 100
        assert 0 < r["train_cpu_s"]
        assert r["eval_captions"] == 4 and r["seed"] == 0
    assert rows[2]["train_wall_s"] > rows[1]["train_wall_s"]
    # The finished run is skipped by the queue (no subprocess is started).
    eff.main(["--algorithms", "nft", "--seeds", "0", "--budgets", "32", "64", "--eval-captions", "4", "--out", out])
    assert "skip: nft seed 0 (complete" in capsys.readouterr().out
    assert len(open(out).readlines()) == 3
    # Summary: a second, fake seed gives a mean ± sd.
    eff.append_row(out, {**rows[2], "seed": 1, "all_correct": rows[2]["all_correct"] + 0.5})
    plot_path = str(tmp_path / "eff.png")
    eff.main(["--summarize", "--out", out, "--eval-captions", "4", "--plot", plot_path])
    table = capsys.readouterr().out
    assert "| base (`toy:t2i`) | 0 |" in table
    assert "| DiffusionNFT | 32 | 1 (0) |" in table
    line64 = next(line for line in table.splitlines() if line.startswith("| DiffusionNFT | 64 |"))
    assert "2 (0,1)" in line64 and "±" in line64
    assert os.path.getsize(plot_path) > 1000


@pytest.mark.parametrize("budgets", [["0"], ["-5"]])
def test_bad_budgets(budgets, tmp_path):
    eff = _load()
    with pytest.raises(SystemExit):
        eff.main(["--budgets", *budgets, "--out", str(tmp_path / "x.jsonl")])
