"""Fast checks of benchmarks/fk_toy.py on a tiny configuration: exactness invariants and row fields."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4


def _load():
    spec = importlib.util.spec_from_file_location("fk_toy_bench", os.path.join(ROOT, "benchmarks", "fk_toy.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def toy(bench):
    return bench.load_toy()


@pytest.fixture(scope="module")
def tiny(bench):
    prompts, seeds = bench.captions(3)
    return prompts, seeds, bench.sampling_kwargs(num_steps=STEPS)


def test_one_particle_fk_is_plain_sampling(bench, toy, tiny):
    prompts, seeds, kw = tiny
    plain = bench.plain_run(toy, prompts, seeds, 0, 1, **kw)
    config = bench.FKConfig("toy_clip", particles=1, lam=100.0, every=1)
    fk = bench.fk_run(toy, prompts, seeds, 0, config, **kw)
    assert torch.equal(fk.latents, plain.latents)
    assert torch.equal(fk.final.toy_clip, plain.final.toy_clip)
    assert fk.pick.tolist() == [0, 0, 0] and fk.ancestors.tolist() == [1, 1, 1]


def test_fk_without_resampling_is_best_of_n(bench, toy, tiny):
    prompts, seeds, kw = tiny
    plain = bench.plain_run(toy, prompts, seeds, 0, 2, keep_x0=True, **kw)
    for reward in bench.REWARDS:
        config = bench.FKConfig(reward, particles=2, lam=10.0, every=None)
        fk = bench.fk_run(toy, prompts, seeds, 0, config, **kw)
        assert torch.equal(fk.latents, plain.latents)
        common = {"steps": STEPS, "cfg": 3.0, "eta": 0.7, "sampler": "sde"}
        row = bench.fk_row(fk, config, 0, len(prompts), common)
        bon = {(r["reward"], r["particles"]): r for r in bench.bon_rows(plain, 0, len(prompts), [1, 2], common)}
        assert row["per_caption_all_correct"] == bon[(reward, 2)]["per_caption_all_correct"]
        assert row["toy_clip"] == pytest.approx(bon[(reward, 2)]["toy_clip"])
        assert row["model_evals_per_caption"] == bon[(reward, 2)]["model_evals_per_caption"] == 2 * STEPS
        assert row["reward_evals_per_caption"] == 2 and row["distinct_ancestors"] == 2.0
        for key in ("all_correct", "all_correct_final_resample", "eval_score", "acc_shape", "weighted_all_correct"):
            assert 0.0 <= row[key] <= 1.0, key
    # The pool's x̂0 diagnosis: one value per step, correlations in [-1, 1] where defined.
    diag = bench.diagnose(plain)
    assert diag["step"] == list(range(STEPS))
    for key in ("clip_spearman", "clip_within", "agree", "decided", "agree_shape", "clip_sd_within"):
        assert len(diag[key]) == STEPS
        assert all(math.isnan(v) or -1.0 <= v <= 1.0 for v in diag[key]), key
    assert diag["decided"][-1] <= diag["agree"][-1]


def test_sweep_rows_resume_and_report(bench, toy, tmp_path):
    results = tmp_path / "fk_toy.jsonl"
    argv = [
        "fk",
        "--captions",
        "2",
        "--steps",
        "3",
        "--particles",
        "2",
        "--lams",
        "10",
        "--every",
        "1",
        "--results",
        str(results),
    ]
    args = bench.build_parser().parse_args(argv)
    done = set()
    bench.cmd_fk(toy, args, done)
    bench.cmd_fk(toy, args, {bench.row_key(r) for r in bench.load_rows(results)})  # resumes: nothing new
    rows = bench.load_rows(results)
    assert len(rows) == 1 and rows[0]["kind"] == "fk" and rows[0]["captions"] == 2
    assert json.loads(bench.row_key(rows[0]))["every"] == 1
    args = bench.build_parser().parse_args(
        ["bon", "--captions", "2", "--steps", "3", "--pool", "2", "--results", str(results)]
    )
    bench.cmd_bon(toy, args, set())
    rows = bench.load_rows(results)
    assert sorted((r["kind"], r["particles"]) for r in rows) == [("bon", 1)] * 2 + [("bon", 2)] * 2 + [("fk", 2)]
    import io

    buf = io.StringIO()
    bench.report(rows, out=buf)
    assert "FK against best-of-N" in buf.getvalue() and "fk2 λ10 max every1" in buf.getvalue()
