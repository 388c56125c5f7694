"""A training process killed with SIGKILL at random moments (mid-step, mid-checkpoint) and resumed
with ``resume=latest`` ends bit-identical to an uninterrupted run, on one process and on two (gloo DDP).

The run is ``visalign train configs/tiny_grpo.yaml`` (GRPO, tiny SD3, full fine-tuning) with a
checkpoint after every step. Kills are timed from what the run has written: a "mid-checkpoint" kill
fires as soon as a fresh ``checkpoints/.tmp-step-N`` folder appears (save_checkpoint writes there
and renames only when complete), a "mid-step" kill a seeded random delay after a new checkpoint.
After each kill the test records which one it was by looking at the folder the process left.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visalign.training.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent.parent
RECIPE = str(ROOT / "configs" / "tiny_grpo.yaml")
WEIGHTS = Path("model") / "transformer" / "diffusion_pytorch_model.safetensors"
LAUNCH_2 = [
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
]


def _env():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out: Path, max_steps: int, processes: int) -> list[str]:
    launch = [*LAUNCH_2, "--main_process_port", str(_free_port())] if processes == 2 else []
    return [
        sys.executable,
        *launch,
        "-m",
        "visalign",
        "train",
        RECIPE,
        f"max_steps={max_steps}",
        "checkpoint_every=1",
        "keep_last=2",
        f"output_dir={out}",
        "resume=latest",
        "trackers=[jsonl]",
    ]


def _start(out: Path, max_steps: int, processes: int, log) -> subprocess.Popen:
    # Its own session, so that pytest's own signals (Ctrl-C) do not reach the run.
    return subprocess.Popen(
        _command(out, max_steps, processes),
        cwd=ROOT,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc (accelerate's ranks run in sessions of their own,
    so a signal to the launcher's process group would not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            tree.append(child)
            stack.append(child)
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILLs every process of the run at once (launcher and ranks), as a crash or an OOM kill would."""
    tree = _process_tree(proc.pid)
    for pid in reversed(tree):  # the ranks first, then the launcher
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in tree):
        assert time.monotonic() < deadline, "the killed run's processes did not exit"
        time.sleep(0.05)


def _latest(out: Path) -> int:
    found = list_checkpoints(str(out))
    return found[-1][0] if found else 0


def _fresh_tmp(out: Path) -> list[str]:
    """Temporary checkpoint folders newer than the newest complete checkpoint (one being written)."""
    root, latest = out / "checkpoints", _latest(out)
    if not root.is_dir():
        return []
    return [n for n in os.listdir(root) if n.startswith(".tmp-step-") and int(n.rsplit("-", 1)[1]) > latest]


def _wait_for(predicate, proc, timeout, poll=0.02) -> bool:
    """Polls ``predicate`` until it holds (True) or the process ends or times out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _killed_run(out: Path, max_steps: int, processes: int, seed: int, kills: int, log) -> list[str]:
    """Runs to the end, killing it ``kills`` times or more until both kinds of kill happened.

    Returns what each kill interrupted: "checkpoint" or "step".
    """
    rng = random.Random(seed)
    done = []
    for _ in range(kills + 4):
        if len(done) >= kills and {"checkpoint", "step"} <= set(done):
            break
        want = "checkpoint" if "checkpoint" not in done or ("step" in done and rng.random() < 0.5) else "step"
        start = _latest(out)
        proc = _start(out, max_steps, processes, log)
        # First the run must be past its start-up and resume: a new checkpoint has been completed.
        if not _wait_for(lambda start=start: _latest(out) > start, proc, timeout=240):
            break  # it ended on its own (nothing left to train)
        if want == "checkpoint":
            if _wait_for(lambda: bool(_fresh_tmp(out)), proc, timeout=120, poll=0.0005):
                time.sleep(rng.uniform(0, 0.003))
        else:
            _wait_for(lambda: False, proc, timeout=rng.uniform(0.05, 0.6))  # a random moment of the next step
        if proc.poll() is not None:
            break
        _kill(proc)
        if _latest(out) >= max_steps:
            break
        done.append("checkpoint" if _fresh_tmp(out) else "step")
    # The last run finishes the training.
    proc = _start(out, max_steps, processes, log)
    assert proc.wait(timeout=400) == 0, f"the resumed run failed; see {log.name}"
    return done


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # Training changed the model, so identical weights are a real check.
    from visalign.testing import tiny_pipeline

    start = tiny_pipeline("sd3").transformer.state_dict()
    assert any(not torch.equal(start[k], wa[k]) for k in wa)


def _check(tmp_path: Path, processes: int, max_steps: int, kills: int, seed: int) -> None:
    ref, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    with open(tmp_path / "uninterrupted.log", "w") as ref_log, open(tmp_path / "killed.log", "w") as log:
        reference = _start(ref, max_steps, processes, ref_log)  # runs alongside the killed one
        try:
            done = _killed_run(killed, max_steps, processes, seed, kills, log)
            (tmp_path / "kills.txt").write_text(" ".join(done) + "\n")
        finally:
            returncode = reference.wait(timeout=600)
    assert returncode == 0, open(tmp_path / "uninterrupted.log").read()[-3000:]
    assert "checkpoint" in done and "step" in done, f"kills: {done}; the run was too quick to interrupt"
    assert _latest(killed) == max_steps
    # Every kill ended the whole run (no orphaned rank went on training), and each restart resumed
    # from a checkpoint instead of starting over (step 1 was trained once).
    assert open(tmp_path / "killed.log", errors="replace").read().count("Done: ") == 1
    logged = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert logged.count(1) == 1 and logged[-1] == max_steps, logged
    _assert_identical(ref, killed)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    _check(tmp_path, processes=1, max_steps=12, kills=4, seed=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_a_two_process_run_then_resume_is_bit_identical(tmp_path):
    _check(tmp_path, processes=2, max_steps=10, kills=2, seed=1)
