"""DiffusionNFT and AWM under a real ``accelerate launch`` with two CPU processes (gloo DDP)."""

import json
import os

import pytest
import torch

from tests.distributed import assert_ranks_trained_alike, launch_two_processes

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_online_script.py")


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_two_process_forward_process_training(tmp_path, algorithm):
    launch_two_processes(SCRIPT, str(tmp_path), algorithm)

    ranks = [json.load(open(tmp_path / f"rewards-rank{r}.json")) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    # Each rank drew different prompts and noise ...
    assert ranks[0]["rewards"][0] != ranks[1]["rewards"][0]
    # ... and both ended with the same weights (DDP averaged the gradients; the old policy or EMA
    # anchor, updated from identical weights, stays identical too), which training moved.
    assert_ranks_trained_alike(tmp_path)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(logged) == 2
    for step, row in enumerate(logged):
        gathered = torch.tensor(ranks[0]["rewards"][step] + ranks[1]["rewards"][step])
        assert row["reward_mean"] == pytest.approx(float(gathered.mean()), rel=1e-5, abs=1e-7)
        assert row["reward_std"] == pytest.approx(float(gathered.std(unbiased=False)), rel=1e-5, abs=1e-7)
