"""Run by tests/algorithms/test_forward_process_distributed.py under ``accelerate launch`` with 2 CPU processes.

Trains tiny SD3 with DiffusionNFT or AWM (``sys.argv[2]``) for 2 iterations, then each rank writes
its trainable weights and the rewards it computed, so the test can compare the ranks and recompute
the logged reward statistics from both ranks' rewards.
"""

import json
import os
import sys

import torch

import visalign as va
from tests.distributed import save_rank_weights
from visalign.testing import brightness as mean_pixel
from visalign.testing import tiny_pipeline

torch.set_num_threads(1)
out, algorithm = sys.argv[1], sys.argv[2]
seen = []


def brightness(images, prompts):
    r = mean_pixel(images, prompts)
    seen.append(r.tolist())
    return r


common = dict(
    output_dir=out,
    max_steps=2,
    num_steps=4,
    group_size=2,
    prompts_per_step=2,
    height=32,
    width=32,
    guidance_scale=3.0,
    lora_rank=4,
    learning_rate=1e-2,
    advantage_std="global",
    trackers=["jsonl"],
)
if algorithm == "nft":
    config, trainer_class = va.NFTConfig(**common), va.NFTTrainer
else:
    config, trainer_class = va.AWMConfig(**common, ema_anchor_beta=0.5), va.AWMTrainer
trainer = trainer_class(
    tiny_pipeline("sd3"),
    brightness,
    ["a red circle", "a blue square", "a green triangle", "a yellow circle", "an orange square"],
    config,
)
trainer.train()
rank = trainer.accelerator.process_index
save_rank_weights(trainer, out)
with open(os.path.join(out, f"rewards-rank{rank}.json"), "w") as f:
    json.dump({"rewards": seen, "world_size": trainer.accelerator.num_processes}, f)
