"""Runs a command under a real ``accelerate launch`` with two CPU processes (gloo DDP), for the tests,
and checks that the ranks ended in step."""

import os
import subprocess
import sys
from pathlib import Path


def launch_two_processes(*args: str, config_file: str | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` on two CPU processes with ``args`` (a script and its arguments, or ``-m module ...``).

    ``config_file`` launches with that accelerate config instead (it must ask for 2 processes), e.g.
    ``configs/accelerate/fsdp_cpu_2proc.yaml`` for FSDP. Asserts that it exits 0 (showing the end
    of stderr otherwise) and returns the finished process.
    """
    # The repository root on the path lets a launched script import the tests' helpers (this module).
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    # --multi_gpu without --cpu is what gives two real CPU processes (--cpu silently runs one).
    if config_file is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, *args]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return result
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *args,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def save_rank_weights(trainer, out: str) -> None:
    """In a launched script: writes this rank's trainable denoiser weights to ``out/weights-rank{r}.pt``."""
    import torch

    state = {n: p.detach().cpu() for n, p in trainer.policy.denoiser.named_parameters() if p.requires_grad}
    torch.save(state, os.path.join(out, f"weights-rank{trainer.accelerator.process_index}.pt"))


def assert_ranks_trained_alike(out) -> None:
    """Both ranks' saved LoRA weights are identical, and training moved them (some LoRA B is non-zero)."""
    import torch

    w0, w1 = (torch.load(Path(out) / f"weights-rank{r}.pt") for r in range(2))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(v.abs().sum() > 0 for k, v in w0.items() if "lora_B" in k)  # training moved the weights
