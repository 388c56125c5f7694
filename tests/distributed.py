"""Runs a command under a real ``accelerate launch`` with two CPU processes (gloo DDP), for the tests."""

import os
import subprocess
import sys


def launch_two_processes(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` on two CPU processes with ``args`` (a script and its arguments, or ``-m module ...``).

    Asserts that it exits 0 (showing the end of stderr otherwise) and returns the finished process.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --multi_gpu without --cpu is what gives two real CPU processes (--cpu silently runs one).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
