"""Atomic, resumable checkpoints on top of ``accelerator.save_state``.

A checkpoint is written into ``<output_dir>/checkpoints/.tmp-step-N`` and renamed to
``step-N`` only once every process has finished writing, so a crash mid-write never leaves a
checkpoint that looks complete. Only the last ``keep_last`` are kept. ``accelerate`` stores the
model, optimizer, LR scheduler, per-process RNG states and every object registered with
``accelerator.register_for_checkpointing`` (works for DDP, FSDP and DeepSpeed alike).

Resuming (:func:`load_latest_complete`) checks a checkpoint's files before loading it. With
``resume="latest"``, a newest checkpoint whose files are truncated or missing (a full disk, a
copy cut short, a machine that lost power before its writes reached the disk) is skipped with a
warning, and the run resumes from the newest one that loads. Nothing is ever deleted on resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
import zipfile

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


def _check_files(path: str) -> None:
    """Raises ``CheckpointError`` naming the first file of checkpoint ``path`` that is visibly broken:
    a safetensors file shorter than its header says, or a torch/pickle file that is empty or a
    truncated zip archive. Reads headers only, so it is cheap even for large checkpoints.
    """
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file) or name == COMPLETE_MARKER:
            continue
        size = os.path.getsize(file)
        problem = None
        if name.endswith(".safetensors"):
            with open(file, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                try:
                    header = json.loads(f.read(n)) if n is not None and 8 + n <= size else None
                except ValueError:
                    header = None
            try:
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (AttributeError, KeyError, TypeError, IndexError):
                end = None
            if header is None or end is None:
                problem = "its header is truncated or unreadable"
            elif size < 8 + n + end:
                problem = f"it is truncated ({size} bytes; its header says {8 + n + end})"
        elif name.endswith((".bin", ".pkl", ".pt", ".pth")):
            with open(file, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format (accelerate writes all of these so)
            if size == 0:
                problem = "it is empty"
            elif is_zip:
                try:  # the archive's index sits at its end: a cut-off file has none
                    zipfile.ZipFile(file).close()
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    problem = f"it is a truncated or corrupt torch.save archive ({exc})"
        if problem:
            raise CheckpointError(f"{file}: {problem}")


def _load_one(accelerator, path: str, strict: bool) -> None:
    """Loads checkpoint ``path`` into everything registered with ``accelerator``, or raises
    ``CheckpointError`` saying which file failed.
    """
    _check_files(path)
    try:
        accelerator.load_state(path, **({} if strict else {"strict": False}))
    except Exception as exc:  # a missing file, a corrupt tensor, a mismatched model, ...
        raise CheckpointError(f"{path}: accelerator.load_state failed with {type(exc).__name__}: {exc}") from exc


def _all_ranks_agree(accelerator, ok: bool) -> bool:
    """Whether ``ok`` holds on every process (so that all ranks resume from the same checkpoint)."""
    if accelerator.num_processes == 1:
        return ok
    import torch

    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def load_latest_complete(accelerator, resume: str | None, output_dir: str, strict: bool = True) -> str | None:
    """Resumes: loads the checkpoint ``resume`` names into the accelerator's registered objects.

    Args:
        accelerator: the run's ``Accelerator`` (models, optimizer, scheduler and custom objects
            already prepared/registered).
        resume: ``None`` (start fresh), ``"latest"`` (the newest complete checkpoint of
            ``output_dir`` that loads; broken newer ones are skipped with a warning, never deleted)
            or the path of one checkpoint (which must load).
        output_dir: the run folder.
        strict: ``False`` for LoRA runs, whose checkpoints hold the adapter only.

    Returns:
        The loaded checkpoint's path, or ``None`` when the run starts fresh.

    Raises:
        CheckpointError: no checkpoint could be loaded; the message names the broken files.
    """
    if resume is None:
        return None
    if resume != "latest":
        path = resolve_resume(resume, output_dir)
        try:
            ok, error = True, None
            _load_one(accelerator, path, strict)
        except CheckpointError as exc:
            ok, error = False, exc
        if not _all_ranks_agree(accelerator, ok):
            raise CheckpointError(
                f"Could not resume from {path}: {error or 'it failed to load on another process'}. "
                f"Pass resume='latest' to use the newest checkpoint that loads, or start fresh with "
                f"resume=None (use a new output_dir to keep this run's files)."
            ) from error
        return path
    candidates = [path for _, path in reversed(list_checkpoints(output_dir))]
    if not candidates:
        return None  # a fresh run: there is no checkpoint yet
    failures = []
    for path in candidates:
        try:
            ok, error = True, None
            _load_one(accelerator, path, strict)
        except CheckpointError as exc:
            ok, error = False, exc
        if _all_ranks_agree(accelerator, ok):
            if failures and accelerator.is_main_process:
                warnings.warn(
                    f"Resumed from {path}, not from the newest checkpoint, which could not be loaded: "
                    + "; ".join(failures)
                    + ". The broken checkpoint folders were left in place (training overwrites them when "
                    "it reaches their step again); delete them when you no longer need them.",
                    UserWarning,
                    stacklevel=2,
                )
            return path
        failures.append(str(error) if error else f"{path}: it failed to load on another process")
    listing = "; ".join(failures)
    raise CheckpointError(
        f"resume='latest' found {len(failures)} checkpoint(s) in {checkpoint_root(output_dir)}, and none of "
        f"them could be loaded: {listing}. If files are damaged, delete the broken checkpoint folders (or move "
        f"them away) and resume from an earlier one; if the run's config changed (model, LoRA rank, optimizer), "
        f"resume with the config they were written with. Or start fresh with resume=None (use a new output_dir "
        f"to keep this run's files)."
    )


def _fsync_tree(path: str) -> None:
    """Flushes every file under ``path`` (and the folder itself) to disk before the checkpoint is
    marked complete, so that a power loss cannot leave a "complete" checkpoint with missing data.
    """
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
    _fsync_path(path)


def _fsync_path(path: str) -> None:
    """Flushes a file or folder to disk; quietly does nothing where the OS cannot (e.g. folders on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        _fsync_tree(tmp)
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        # Re-saving a step (after a fallback): move the old copy aside first, so that a crash between
        # the two renames still leaves one complete checkpoint of this step on disk.
        stale = None
        if os.path.exists(final):
            stale = f"{final}.old-{os.getpid()}"
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_path(root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
