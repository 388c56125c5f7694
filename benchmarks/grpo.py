"""GRPO iteration time, split into sampling, reward and training, plus peak memory.

    python benchmarks/grpo.py                                  # tiny models of every family, CPU
    python benchmarks/grpo.py --families sd3 flux --iterations 6 --group-size 8

Each family runs ``--iterations`` GRPO iterations with a brightness reward; the first is a warm-up
and the rest are averaged. Each family runs in its own process, so peak memory (the process's
peak RSS on CPU, or ``torch.cuda.max_memory_allocated`` on a GPU) is that family's alone.
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


def brightness(images, prompts):
    return images.float().flatten(1).mean(1)


def bench_family(family: str, args) -> dict:
    import visalign as va
    from visalign.testing import tiny_pipeline
    from visalign.testing.pipelines import DEFAULT_SIZES

    size = DEFAULT_SIZES[family]
    with tempfile.TemporaryDirectory() as out:
        cfg = va.GRPOConfig(
            output_dir=out,
            max_steps=args.iterations,
            num_steps=args.steps,
            group_size=args.group_size,
            prompts_per_step=args.prompts,
            height=size["height"],
            width=size["width"],
            num_frames=size.get("num_frames"),
            guidance_scale=args.guidance_scale,
            gradient_checkpointing=args.gradient_checkpointing,
            trackers=["jsonl"],
        )
        prompts = [f"prompt {i}" for i in range(8)]
        if family == "wan-i2v":
            from PIL import Image

            for i in range(8):
                Image.new("RGB", (size["width"], size["height"]), (30 * i, 80, 160)).save(os.path.join(out, f"{i}.png"))
            prompts = [{"prompt": f"prompt {i}", "image": os.path.join(out, f"{i}.png")} for i in range(8)]
        trainer = va.GRPOTrainer(tiny_pipeline(family), brightness, prompts, cfg)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "family": family,
        "sampling": mean("time_sampling"),
        "reward": mean("time_reward"),
        "training": mean("time_training"),
        "total": mean("time_step"),
        "peak_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd", "sdxl", "sd3", "flux", "wan-t2v", "wan-i2v"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="run one family and print its result as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(bench_family(args.families[0], args)))
        return
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps, "
        f"{args.prompts} prompts × group {args.group_size}, CFG {args.guidance_scale}, LoRA r8, "
        f"mean of {args.iterations - 1} iterations after a warm-up"
    )
    print(f"{'family':9s} {'sampling s':>10s} {'reward s':>9s} {'training s':>10s} {'total s':>8s} {'peak MiB':>9s}")
    passthrough = _passthrough(args)
    for family in args.families:
        out = subprocess.run(
            [sys.executable, __file__, "--json", "--families", family, *passthrough],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{family:9s} {r['sampling']:10.3f} {r['reward']:9.4f} {r['training']:10.3f} {r['total']:8.3f} "
            f"{r['peak_mib']:9.0f}"
        )


def _passthrough(args) -> list[str]:
    flags = [
        "--iterations",
        str(args.iterations),
        "--steps",
        str(args.steps),
        "--group-size",
        str(args.group_size),
        "--prompts",
        str(args.prompts),
        "--guidance-scale",
        str(args.guidance_scale),
        "--threads",
        str(args.threads),
    ]
    return flags + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


if __name__ == "__main__":
    main()
