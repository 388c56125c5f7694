"""Online DPO under a real ``accelerate launch`` with two CPU processes (gloo DDP)."""

import json
import os

from tests.distributed import assert_ranks_trained_alike, launch_two_processes

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_dpo_script.py")


def test_two_process_online_dpo_with_gradient_steps(tmp_path):
    """Each rank samples its own pairs; 2 gradient steps per rollout over micro-batches keep DDP in step."""
    launch_two_processes(SCRIPT, str(tmp_path))

    info = [json.load(open(tmp_path / f"info-rank{r}.json")) for r in range(2)]
    assert all(i["world_size"] == 2 and i["optimizer_steps"] == 4 for i in info), info
    assert_ranks_trained_alike(tmp_path)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(logged) == 2 and all("implicit_acc" in row and "reward_gap" in row for row in logged)
