"""Online DPO under a real ``accelerate launch`` with two CPU processes (gloo DDP)."""

import json
import os
import subprocess
import sys

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_dpo_script.py")


def test_two_process_online_dpo_with_gradient_steps(tmp_path):
    """Each rank samples its own pairs; 2 gradient steps per rollout over micro-batches keep DDP in step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --multi_gpu without --cpu is what gives two real CPU processes (--cpu silently runs one).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    info = [json.load(open(tmp_path / f"info-rank{r}.json")) for r in range(2)]
    assert all(i["world_size"] == 2 and i["optimizer_steps"] == 4 for i in info), info
    w0, w1 = (torch.load(tmp_path / f"weights-rank{r}.pt") for r in range(2))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(v.abs().sum() > 0 for k, v in w0.items() if "lora_B" in k)  # training moved the weights
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(logged) == 2 and all("implicit_acc" in row and "reward_gap" in row for row in logged)
