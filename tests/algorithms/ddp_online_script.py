"""Run under ``accelerate launch`` with 2 CPU processes by tests/algorithms/test_grpo_distributed.py
and test_forward_process_distributed.py.

Trains tiny SD3 for 2 iterations with GRPO, DiffusionNFT or AWM (``sys.argv[2]``, default grpo),
then each rank writes its trainable weights and the rewards it computed, so the test can compare
the ranks and recompute the logged statistics from both ranks' rewards.
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
out = sys.argv[1]
algorithm = sys.argv[2] if len(sys.argv) > 2 else "grpo"
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
config_class, trainer_class, extra = {
    "grpo": (va.GRPOConfig, va.GRPOTrainer, {}),
    "nft": (va.NFTConfig, va.NFTTrainer, {}),
    "awm": (va.AWMConfig, va.AWMTrainer, {"ema_anchor_beta": 0.5}),
}[algorithm]
trainer = trainer_class(
    tiny_pipeline("sd3"),
    brightness,
    ["a red circle", "a blue square", "a green triangle", "a yellow circle", "an orange square"],
    config_class(**common, **extra),
)
trainer.train()
rank = trainer.accelerator.process_index
save_rank_weights(trainer, out)
with open(os.path.join(out, f"rewards-rank{rank}.json"), "w") as f:
    json.dump({"rewards": seen, "world_size": trainer.accelerator.num_processes}, f)
