"""The real-size benchmarks: the DanceGRPO-structured baseline loop, and benchmarks/gpu.py's CPU smoke mode."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import visalign as va
from visalign.testing import tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_baseline_loop_does_the_same_update_as_the_trainer():
    from benchmarks import grpo_vs_baseline as gvb

    args = SimpleNamespace(
        family="sd3",
        size=32,
        depth=None,
        device="cpu",
        dtype="float32",
        steps=4,
        group_size=2,
        prompts=2,
        fraction=0.6,
        lora_rank=4,
        guidance_scale=4.5,
        micro_batch=None,
        checkpointing=False,
        text_length=8,
        frames=None,
        iterations=2,
    )
    policies = tuple(va.wrap(tiny_pipeline("sd3"), max_sequence_length=8) for _ in range(2))
    result = gvb.compare(args, policies=policies)
    # 2 prompts x 2 samples; round(0.6 x 3 SDE steps) = 2 trained steps each; one optimizer step
    assert result["counts"] == {"samples": 4, "trained_transitions": 8, "optimizer_steps": 1}
    # Its log-prob recomputation reproduces the rollout's (the first update is on-policy: ratio 1).
    assert result["first_step_ratio_error"] < 1e-5
    assert result["ratio"] > 0 and set(result["phases"]["baseline"]) == {
        "time_sampling",
        "time_reward",
        "time_training",
    }


def test_baseline_png_round_trip_scores_quantised_pixels():
    from benchmarks.baselines.dancegrpo_loop import BaselineConfig, DanceGRPOLoop

    loop = DanceGRPOLoop(
        va.wrap(tiny_pipeline("flux")),
        lambda images, prompts: images.mean((1, 2, 3)),
        ["a"],
        BaselineConfig(height=32, width=32, num_steps=2, group_size=2, prompts_per_step=1),
    )
    import torch

    image = torch.full((3, 8, 8), 0.3)
    assert loop.png_reward(image, "a") == pytest.approx(round(0.3 * 255) / 255, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gpu_benchmark_smoke_mode_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "gpu.py"),
        "--device",
        "cpu",
        "--depth",
        "1",
        "--size",
        "64",
        "--steps",
        "2",
        "--iterations",
        "2",
        "--group-size",
        "2",
        "--prompts",
        "1",
        "--text-length",
        "8",
        "--repeats",
        "1",
        "--algorithm-iterations",
        "1",
        "--plan-iterations",
        "1",
        "--plan-cases",
        "lora",
        "--plan-methods",
        "allocator",
        "--lora-rank",
        "4",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["device"].startswith("CPU")
    for name in ("sd35-medium", "flux1-dev"):
        r = results["results"][name]
        assert r["sampling"]["ratio"] > 0
        assert r["grpo"]["counts"]["samples"] == 2 and r["grpo"]["ratio"] > 0 and r["grpo"]["train_flops"] > 0
        assert {"dpo-online", "prdp", "draft-full", "draft-full-nockpt"} <= set(r["algorithms"])
        assert abs(r["plan"][0]["error"]) < 0.5
    assert "visalign/stock" in done.stdout and "plan vs measured" in done.stdout
