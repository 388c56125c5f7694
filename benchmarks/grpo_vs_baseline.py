"""GRPO iterations per second: ``va.GRPOTrainer`` against the DanceGRPO-structured loop, in one run.

    python benchmarks/grpo_vs_baseline.py --family sd3 --size 64 --depth 2 --device cpu
    python benchmarks/grpo_vs_baseline.py --family flux --size 512 --device cuda --dtype bfloat16 --checkpointing

Both loops train the real architecture (``visalign.architectures``: SD3.5-Medium, FLUX.1-dev or Wan
2.1 1.3B at real width; ``--depth`` keeps fewer blocks) with random weights and tiny text encoders
widened to the real widths, at equal settings: the same prompts, group size, sampling steps, CFG,
SDE noise, trained steps per sample, LoRA, learning rate and one optimizer step per iteration. Each
loop has its own copy of the model built from the same seed. Iterations alternate between the two
(so load drifts hit both alike); the first of each is a warm-up, the rest are timed, and the ratio
of median iteration times is printed. The reward is the mean brightness (the baseline scores it after
a PNG round trip, as its structure does). See benchmarks/baselines/dancegrpo_loop.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILY_ARCHITECTURE = {"sd3": "sd35-medium", "flux": "flux1-dev", "wan": "wan21-t2v-1.3b"}


def brightness(images, prompts):
    return images.float().flatten(1).mean(1)


def build_policy(args, seed: int = 0):
    import visalign as va
    from visalign import architectures as arch

    pipe = arch.build_pipeline(
        FAMILY_ARCHITECTURE[args.family],
        depth=args.depth,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        seed=seed,
    )
    return va.wrap(pipe, max_sequence_length=args.text_length)


def settings(args) -> dict:
    frames = args.frames if args.family == "wan" else None
    return dict(
        num_steps=args.steps,
        group_size=args.group_size,
        prompts_per_step=args.prompts,
        guidance_scale=args.guidance_scale,
        noise="flow",
        eta=0.7,
        timestep_fraction=args.fraction,
        clip_range=1e-4,
        learning_rate=1e-4,
        lora_rank=args.lora_rank,
        height=args.size,
        width=args.size,
        num_frames=frames,
        gradient_checkpointing=args.checkpointing,
    )


def make_loops(args, out_dir: str, policies=None):
    """``(visalign trainer, baseline loop, expected counts)`` at equal settings; ``policies``: two prebuilt ones."""
    import visalign as va
    from benchmarks.baselines.dancegrpo_loop import BaselineConfig, DanceGRPOLoop

    common, prompts = settings(args), [f"prompt {i}" for i in range(16)]
    mixed = "bf16" if args.dtype == "bfloat16" and args.device != "cpu" else "no"
    config = va.GRPOConfig(
        **common,
        sampler="sde",
        advantage_std="group",
        kl_beta=0.0,
        max_steps=10**6,
        micro_batch_size=args.micro_batch,
        mixed_precision=mixed,
        output_dir=out_dir,
        trackers=["jsonl"],
        updates_per_rollout=1,
        seed=0,
    )
    ours, theirs = policies or (build_policy(args, seed=0), build_policy(args, seed=0))
    trainer = va.GRPOTrainer(ours, brightness, prompts, config)
    baseline = DanceGRPOLoop(theirs, brightness, prompts, BaselineConfig(**common, mixed_precision=mixed))
    samples = args.prompts * args.group_size
    k = max(1, round(args.fraction * (args.steps - 1)))
    return trainer, baseline, {"samples": samples, "trained_transitions": samples * k, "optimizer_steps": 1}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def compare(args, policies=None) -> dict:
    """Runs both loops alternately; returns their median iteration times, phases, GPU peaks and the ratio."""
    with tempfile.TemporaryDirectory() as out:
        trainer, baseline, expected = make_loops(args, out, policies)
        times = {"visalign": [], "baseline": []}
        phases = {"visalign": [], "baseline": []}
        peaks = {"visalign": 0.0, "baseline": 0.0}
        for it in range(args.iterations):
            _reset_peak(args.device)
            start = time.perf_counter()
            trainer._seed_step(it)
            ours = trainer.train_step(it)
            _sync(args.device)
            times["visalign"].append(time.perf_counter() - start)
            peaks["visalign"] = max(peaks["visalign"], _peak(args.device) or 0.0)
            _reset_peak(args.device)
            start = time.perf_counter()
            theirs = baseline.iteration(it)
            _sync(args.device)
            times["baseline"].append(time.perf_counter() - start)
            peaks["baseline"] = max(peaks["baseline"], _peak(args.device) or 0.0)
            if it:
                keys = ("time_sampling", "time_reward", "time_training")
                phases["visalign"].append({k: ours.get(k, 0.0) for k in keys})
                phases["baseline"].append({k: theirs[k] for k in keys})
        counts = {k: theirs[k] for k in expected}
        if counts != expected:
            raise AssertionError(f"the baseline did a different update: {counts} != visalign's {expected}")
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    mean_phase = {
        name: {k: statistics.mean(p[k] for p in rows) for k in rows[0]} if rows else {} for name, rows in phases.items()
    }
    return {
        "family": args.family,
        "architecture": FAMILY_ARCHITECTURE[args.family],
        "depth": args.depth,
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
        "visalign_s": med["visalign"],
        "baseline_s": med["baseline"],
        "visalign_it_per_s": 1 / med["visalign"],
        "baseline_it_per_s": 1 / med["baseline"],
        "ratio": med["baseline"] / med["visalign"],
        "phases": mean_phase,
        "counts": counts,
        "peak_gib": peaks if args.device.startswith("cuda") else None,
        "first_step_ratio_error": theirs["first_step_ratio_error"],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILY_ARCHITECTURE), default="sd3")
    p.add_argument("--size", type=int, default=64, help="height = width in pixels (default: 64)")
    p.add_argument("--depth", type=int, default=2, help="denoiser blocks kept, at real width; 0 = all (default: 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=6, help="sampling steps (default: 6)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="prompts per iteration (default: 2)")
    p.add_argument("--fraction", type=float, default=0.6, help="share of the SDE steps trained (default: 0.6)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the family's (FLUX: embedded)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None, help="visalign's samples per forward/backward")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both loops")
    p.add_argument("--text-length", type=int, default=32, help="T5 tokens per prompt in both loops (default: 32)")
    p.add_argument("--frames", type=int, default=5, help="Wan frames (default: 5)")
    p.add_argument("--iterations", type=int, default=4, help="per loop, the first a warm-up (default: 4)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.depth = args.depth or None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.guidance_scale is None:
        args.guidance_scale = {"sd3": 4.5, "flux": 3.5, "wan": 4.5}[args.family]
    result = compare(args)
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(
        f"{result['architecture']} depth {args.depth or 'full'} at real width, {args.size}px, {args.dtype}, "
        f"{device}, torch {torch.__version__}; {args.prompts} prompts x {args.group_size}, {args.steps} steps, "
        f"{result['counts']['trained_transitions']} trained transitions, LoRA r{args.lora_rank}; "
        f"median of {args.iterations - 1} iterations after a warm-up"
    )
    print(f"{'loop':10s} {'it/s':>8s} {'s/it':>8s} {'sampling':>9s} {'reward':>8s} {'training':>9s}")
    for name in ("visalign", "baseline"):
        ph = result["phases"].get(name) or {}
        print(
            f"{name:10s} {result[name + '_it_per_s']:8.4f} {result[name + '_s']:8.2f} "
            f"{ph.get('time_sampling', float('nan')):9.2f} {ph.get('time_reward', float('nan')):8.3f} "
            f"{ph.get('time_training', float('nan')):9.2f}"
        )
    print(
        f"visalign / baseline throughput: {result['ratio']:.2f}x  (same update: {result['counts']}; baseline's "
        f"first-step |ratio - 1| = {result['first_step_ratio_error']:.1e})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
