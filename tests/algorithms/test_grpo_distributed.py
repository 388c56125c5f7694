"""GRPO under a real ``accelerate launch`` with two CPU processes (gloo DDP)."""

import json
import os

import torch

from tests.distributed import assert_ranks_trained_alike, launch_two_processes
from visalign.algorithms.grpo import group_advantages

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_online_script.py")


def test_two_process_grpo(tmp_path):
    launch_two_processes(SCRIPT, str(tmp_path))

    ranks = [json.load(open(tmp_path / f"rewards-rank{r}.json")) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    # Each rank drew different prompts and noise.
    assert ranks[0]["rewards"][0] != ranks[1]["rewards"][0]

    assert_ranks_trained_alike(tmp_path)

    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(logged) == 2
    for step, row in enumerate(logged):
        gathered = torch.tensor(ranks[0]["rewards"][step] + ranks[1]["rewards"][step])
        assert row["reward_mean"] == pytest_approx(float(gathered.mean()))
        assert row["reward_std"] == pytest_approx(float(gathered.std(unbiased=False)))
        adv, zero = group_advantages(gathered, 2, "global", 5.0)
        assert row["zero_std_ratio"] == pytest_approx(float(zero.float().mean()))
        assert row["advantage_abs_mean"] == pytest_approx(float(adv.abs().mean()))


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5, abs=1e-7)
