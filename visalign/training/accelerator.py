"""The run's ``accelerate.Accelerator``: how a training config becomes processes, precision and trackers."""

from __future__ import annotations

import os

import torch

from visalign.errors import require
from visalign.training.fsdp import enable_cpu_fsdp, fsdp_plugin_from_launch, fsdp_requested

__all__ = ["build_accelerator", "flat_config"]


def build_accelerator(config):
    """The ``accelerate.Accelerator`` of a run: mixed precision, trackers, the project folder, CPU multi-process.

    Under an FSDP launch the FSDP plugin is checked first, and on CPU-only machines accelerate is
    switched to FSDP over gloo (:mod:`visalign.training.fsdp`).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [t for t in config.trackers if t != "jsonl"]
    for name in trackers:
        require({"tensorboard": "tensorboard", "wandb": "wandb"}[name], name, f"The {name} tracker")
    # accelerate only treats a multi-process launch without GPUs as multi-CPU (gloo) when told
    # to use the CPU; without this, each process would silently train alone.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    allow_new_precision(config.mixed_precision)
    fsdp_plugin = None
    if fsdp_requested():  # read and checked here, so that a bad FSDP setting fails before any work
        fsdp_plugin = fsdp_plugin_from_launch(config.use_lora)
    accelerator = Accelerator(
        cpu=cpu_processes,
        fsdp_plugin=fsdp_plugin,
        mixed_precision=config.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        # One LR-scheduler step per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
    )
    if fsdp_plugin is not None and cpu_processes:
        enable_cpu_fsdp(accelerator, fsdp_plugin, config.mixed_precision)
    return accelerator


def allow_new_precision(mixed_precision: str) -> None:
    """Lets one single-process session (a notebook, a test run) build trainers of different precisions.

    accelerate keeps its state in a process-wide singleton that refuses a second mixed-precision
    setting; in a single process nothing else depends on it, so it is reset. Launched
    multi-process runs are left alone.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") not in (None, mixed_precision)
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
    ):
        AcceleratorState._reset_state()


def flat_config(d: dict, prefix: str = "") -> dict:
    """Trackers take flat scalars: lists and dicts become strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
