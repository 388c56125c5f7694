"""Atomic, resumable checkpoints on top of ``accelerator.save_state``.

A checkpoint is written into ``<output_dir>/checkpoints/.tmp-step-N`` and renamed to
``step-N`` only once every process has finished writing, so a crash mid-write never leaves a
checkpoint that looks complete. Only the last ``keep_last`` are kept. ``accelerate`` stores the
model, optimizer, LR scheduler, per-process RNG states and every object registered with
``accelerator.register_for_checkpointing`` (works for DDP, FSDP and DeepSpeed alike).
"""

from __future__ import annotations

import os
import re
import shutil

from visalign.errors import CheckpointError

_STEP = re.compile(r"^step-(\d+)$")
COMPLETE_MARKER = "visalign_complete"


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``output_dir``, as (step, path) sorted by step."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP.match(name)
        path = os.path.join(root, name)
        if match and os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """Maps ``resume`` ("latest", a path, or None) to a checkpoint folder, or None to start fresh."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)  # a fresh run when there is none yet
    if not os.path.exists(os.path.join(resume, COMPLETE_MARKER)):
        raise CheckpointError(
            f"resume={resume!r} is not a complete visalign checkpoint (no '{COMPLETE_MARKER}' file). "
            f"Pass resume='latest' or a folder like {checkpoint_root(output_dir)}/step-100."
        )
    return resume


def save_checkpoint(accelerator, output_dir: str, step: int, keep_last: int) -> str:
    """Writes a checkpoint atomically on all processes and prunes old ones; returns its path."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            f.write(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
