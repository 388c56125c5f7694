"""Run by tests/algorithms/test_dpo_distributed.py under ``accelerate launch`` with 2 CPU processes.

Trains tiny SD3 with online DPO (2 gradient steps per rollout, micro-batches of 1 pair) for 2
iterations, then each rank writes its trainable weights and its optimizer step count.
"""

import json
import os
import sys

import torch

import visalign as va
from tests.distributed import save_rank_weights
from visalign.testing import brightness, tiny_pipeline

torch.set_num_threads(1)
out = sys.argv[1]


cfg = va.DPOConfig(
    output_dir=out,
    mode="online",
    max_steps=2,
    num_steps=4,
    group_size=3,
    prompts_per_step=2,
    updates_per_rollout=2,
    micro_batch_size=1,
    height=32,
    width=32,
    guidance_scale=1.0,
    lora_rank=4,
    learning_rate=1e-2,
    beta=500.0,
    trackers=["jsonl"],
)
trainer = va.DPOTrainer(
    tiny_pipeline("sd3"),
    brightness,
    ["a red circle", "a blue square", "a green triangle", "a yellow circle", "an orange square"],
    cfg,
)
trainer.train()
rank = trainer.accelerator.process_index
save_rank_weights(trainer, out)
steps = int(trainer.optimizer.state[trainer.trainable_parameters[0]]["step"])
with open(os.path.join(out, f"info-rank{rank}.json"), "w") as f:
    json.dump({"world_size": trainer.accelerator.num_processes, "optimizer_steps": steps}, f)
