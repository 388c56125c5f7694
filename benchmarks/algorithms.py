"""Iteration time and peak memory of every training algorithm on one tiny model, GRPO included.

    python benchmarks/algorithms.py                              # tiny SD3, 32×32, CPU
    python benchmarks/algorithms.py --family flux --size 64 --iterations 6
    python benchmarks/algorithms.py --only draft-full draft-full-nockpt --size 128

Each configuration runs ``--iterations`` iterations (the first is a warm-up; the rest are averaged)
in its own process, so its memory figure is its own: on CPU the growth of the process's peak RSS
during training over the peak before it (the model, optimizer and Python are excluded), on a GPU
``torch.cuda.max_memory_allocated`` during training. The reward is the mean brightness (cheap and
differentiable), so the figures measure the algorithms' own cost.

Configurations (``--only`` picks some):

- ``grpo``: 2 prompts × 4 samples, SDE sampling, 60% of the steps trained, one update.
- ``prdp``: 2 prompts × 4 samples, all C(4,2) pairs, all SDE steps trained, one gradient step.
- ``dpo-offline``: 8 image pairs per iteration (VAE-encoded each time, no cache), one update.
- ``dpo-online``: 2 prompts × 4 ODE samples, best vs worst → 2 pairs, one update.
- ``draft-full`` / ``draft-full-nockpt``: 4 samples, gradient through the whole chain, with and
  without per-step gradient checkpointing.
- ``draft-k1``: DRaFT-1; ``draft-lv``: DRaFT-LV with 2 re-noisings; ``refl``: one late step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

CONFIGS = (
    "grpo",
    "prdp",
    "dpo-offline",
    "dpo-online",
    "draft-full",
    "draft-full-nockpt",
    "draft-k1",
    "draft-lv",
    "refl",
)


def brightness(images, prompts):
    return images.float().flatten(1).mean(1)


def _pairs_file(folder: str, size: int, count: int = 16) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    rows = []
    for i in range(count):
        for tag, level in (("w", 0.7), ("l", 0.3)):
            pixels = np.clip(level + 0.1 * rng.randn(size, size, 3), 0, 1)
            Image.fromarray((pixels * 255).astype("uint8")).save(os.path.join(folder, f"{tag}{i}.png"))
        rows.append({"prompt": f"prompt {i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def build(name: str, args, out: str):
    """The trainer of configuration ``name``."""
    import visalign as va
    from visalign.testing import tiny_pipeline

    frames = 5 if args.family.startswith("wan") else None
    common = dict(
        output_dir=os.path.join(out, "run"),
        max_steps=args.iterations,
        height=args.size,
        width=args.size,
        num_frames=frames,
        guidance_scale=args.guidance_scale,
        lora_rank=8,
        trackers=["jsonl"],
        gradient_checkpointing=False,
    )
    prompts = [f"prompt {i}" for i in range(16)]
    pipe = tiny_pipeline(args.family)
    steps = args.steps
    if name == "grpo":
        cfg = va.GRPOConfig(num_steps=steps, group_size=4, prompts_per_step=2, **common)
        return va.GRPOTrainer(pipe, brightness, prompts, cfg)
    if name == "prdp":
        cfg = va.PRDPConfig(num_steps=steps, group_size=4, prompts_per_step=2, **common)
        return va.PRDPTrainer(pipe, brightness, prompts, cfg)
    if name == "dpo-offline":
        cfg = va.DPOConfig(prompts_per_step=8, **common)
        return va.DPOTrainer(pipe, None, _pairs_file(out, args.size), cfg)
    if name == "dpo-online":
        cfg = va.DPOConfig(mode="online", num_steps=steps, group_size=4, prompts_per_step=2, **common)
        return va.DPOTrainer(pipe, brightness, prompts, cfg)
    draft = {
        "draft-full": dict(),
        "draft-full-nockpt": dict(checkpoint_steps=False),
        "draft-k1": dict(truncation=1),
        "draft-lv": dict(variant="lv", lv_samples=2),
        "refl": dict(variant="refl"),
    }[name]
    cfg = va.DRaFTConfig(num_steps=steps, prompts_per_step=4, **draft, **common)
    return va.DRaFTTrainer(pipe, brightness, prompts, cfg)


def run_one(name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = build(name, args, out)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer.train()
        if cuda:
            peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        rows = [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))][1:]
    step_time = sum(r["time_step"] for r in rows) / len(rows)
    return {"name": name, "step_s": step_time, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd3")
    parser.add_argument("--size", type=int, default=32, help="height = width in pixels")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per rollout")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--json", action="store_true", help="run the one configuration in --only; print JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(run_one(args.only[0], args)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"{args.family} {args.size}×{args.size}, {args.steps} steps, CFG {args.guidance_scale}, LoRA r8, fp32, "
        f"{device}, torch {torch.__version__}, threads {args.threads}; mean of {args.iterations - 1} iterations "
        f"after a warm-up; memory: growth of the peak during training"
    )
    print(f"{'configuration':18s} {'step s':>8s} {'peak MiB':>9s}")
    flags = [
        "--family",
        args.family,
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
        "--iterations",
        str(args.iterations),
        "--guidance-scale",
        str(args.guidance_scale),
        "--threads",
        str(args.threads),
    ]
    for name in args.only:
        out = subprocess.run(
            [sys.executable, __file__, "--json", "--only", name, *flags], capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{name:18s} {r['step_s']:8.3f} {r['peak_mib']:9.1f}")


if __name__ == "__main__":
    main()
