"""Run by tests/training/test_fsdp.py under ``accelerate launch`` with an FSDP config and 2 CPU processes:

    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp_cpu_2proc.yaml \\
        tests/training/fsdp_draft_script.py OUT

Full fine-tuning of tiny SD3 with DRaFT (tests/training/fsdp_common.py), three times in one launch
(process start-up dominates the test's time):

- ``OUT/run``: 2 iterations, a checkpoint after each; writes the gathered weights (``weights.pt``),
  a ``save_pretrained`` export (``model/``) and how the parameters were sharded (``sharding-rank{r}.json``);
- ``OUT/crashed``: the same run stopped by a simulated crash right after its step-1 checkpoint,
  then resumed by a new trainer on a fresh pipeline (``resume="latest"``) to iteration 2; writes
  the same weights and export.
"""

import json
import os
import sys

import torch

from tests.algorithms.helpers import train_with_crash
from tests.training import fsdp_common
from visalign.testing import tiny_pipeline

torch.set_num_threads(1)
out = sys.argv[1]


def finish(trainer, run: str) -> None:
    """Writes the gathered weights and the export (both collectives: every rank calls them)."""
    state = trainer.accelerator.get_state_dict(trainer.model)  # the full weights, on rank 0
    if trainer.accelerator.is_main_process:
        torch.save({k: v.clone() for k, v in state.items()}, os.path.join(run, "weights.pt"))
    trainer.save_pretrained(os.path.join(run, "model"))


run = os.path.join(out, "run")
trainer = fsdp_common.trainer(tiny_pipeline("sd3"), run)
trainer.train()
finish(trainer, run)

from torch.distributed.tensor import DTensor  # noqa: E402

acc, params = trainer.accelerator, trainer.trainable_parameters
with open(os.path.join(run, f"sharding-rank{acc.process_index}.json"), "w") as f:
    json.dump(
        {
            "distributed_type": str(acc.distributed_type),
            "world_size": acc.num_processes,
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "optimizer_holds_them": {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            == {id(p) for p in params},
            "local": sum(p.to_local().numel() for p in params),
            "global": sum(p.numel() for p in params),
        },
        f,
    )

crashed = os.path.join(out, "crashed")
train_with_crash(fsdp_common.trainer(tiny_pipeline("sd3"), crashed), crash_at=1)
resumed = fsdp_common.trainer(tiny_pipeline("sd3"), crashed, resume="latest")
resumed.train()
finish(resumed, crashed)
