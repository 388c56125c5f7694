"""Toy world: how much does each training algorithm raise the exact evaluator's accuracy, and at what cost?

    python benchmarks/toy_algorithms.py                         # configs/toy_{grpo,dpo,prdp,draft}.yaml
    python benchmarks/toy_algorithms.py --only dpo,prdp --max-steps 5 --eval-prompts 48

Each recipe ``configs/toy_<algorithm>.yaml`` (the shipped toy T2I ``toy:t2i``, the toy CLIP reward
``toy_clip``, the world's 90 captions) runs as written, in its own process (so the peak RSS is its
own), with ``--max-steps N`` overriding its ``max_steps`` when given. Before and after training the
policy is measured with :func:`visalign.toy.policy_eval.evaluate_policy` on the fixed
:func:`~visalign.toy.policy_eval.eval_set` (``--eval-prompts`` captions, one fixed seed each; ODE,
the recipe's ``num_steps`` and ``guidance_scale``): the evaluator's all-correct and per-attribute
accuracy, and the mean toy-CLIP reward. A recipe that does not exist is skipped with a note.

Columns: iterations; samples seen (images generated for training: prompts × group for GRPO/PRDP and
online DPO, samples per step for DRaFT, times iterations); wall time of ``trainer.train()`` (the
evaluations excluded); the mean iteration time from ``metrics.jsonl``; the process's peak RSS
(model, reward, Python and torch included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ALGORITHMS = ("grpo", "dpo", "prdp", "draft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_path(algorithm: str) -> str:
    return os.path.join(ROOT, "configs", f"toy_{algorithm}.yaml")


def samples_per_iteration(algorithm: str, config) -> int:
    """Images generated for training per iteration (per rank)."""
    if algorithm in ("grpo", "prdp"):
        return config.prompts_per_step * config.group_size
    if algorithm == "dpo":
        return config.prompts_per_step * config.group_size if config.mode == "online" else 2 * config.prompts_per_step
    return config.prompts_per_step


def measure(policy, reward, config, num_prompts: int) -> dict:
    from visalign.toy.policy_eval import eval_set, evaluate_policy

    prompts, seeds = eval_set(num_prompts)
    result = evaluate_policy(
        policy, prompts, seeds, num_steps=config.num_steps, guidance_scale=config.guidance_scale, reward=reward
    )
    return {"all_correct": result["all_correct"], "accuracy": result["accuracy"], "reward": result["reward"]}


def run_one(algorithm: str, max_steps: int | None, eval_prompts: int) -> dict:
    """Runs one recipe in this process; returns its measurements."""
    from visalign.recipes import load_recipe

    with tempfile.TemporaryDirectory() as out:
        overrides = [f"output_dir={out}", "trackers=[jsonl]", "sample_every=0", "checkpoint_every=0"]
        if max_steps is not None:
            overrides.append(f"max_steps={max_steps}")
        cls, policy, reward, prompts, config = load_recipe(recipe_path(algorithm), overrides)
        if getattr(policy, "max_sequence_length", 1) != 1:  # the toy T2I is trained for T5 length 1 (MODELS.md)
            policy.max_sequence_length = 1
        before = measure(policy, reward, config, eval_prompts)
        trainer = cls(policy, reward, prompts, config)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        after = measure(trainer.policy, reward, config, eval_prompts)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    steps = [r["time_step"] for r in rows if "time_step" in r]
    return {
        "algorithm": algorithm,
        "iterations": config.max_steps,
        "samples": samples_per_iteration(algorithm, config) * config.max_steps,
        "wall_s": wall,
        "step_s": sum(steps) / max(len(steps), 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "before": before,
        "after": after,
    }


def row(r: dict) -> str:
    b, a = r["before"], r["after"]
    attrs = " / ".join(f"{a['accuracy'][k]:.0%}" for k in ("color", "shape", "position"))
    return (
        f"| {r['algorithm']} | {r['iterations']} | {r['samples']} | {r['wall_s']:.0f} s | {r['step_s']:.2f} s | "
        f"{r['peak_rss_mib']:.0f} | {b['all_correct']:.1%} → {a['all_correct']:.1%} "
        f"({100 * (a['all_correct'] - b['all_correct']):+.1f} pts) | {attrs} | "
        f"{b['reward']:.4f} → {a['reward']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", default=",".join(ALGORITHMS), help="comma-separated subset of " + ",".join(ALGORITHMS)
    )
    parser.add_argument("--max-steps", type=int, default=None, help="override every recipe's max_steps")
    parser.add_argument("--eval-prompts", type=int, default=96, help="size of the fixed evaluation set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="run the one algorithm in --only; print JSON")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)}")
    torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(run_one(names[0], args.max_steps, args.eval_prompts)))
        return
    steps = f"max_steps {args.max_steps}" if args.max_steps is not None else "the recipes' max_steps"
    print(
        f"toy:t2i + toy_clip, eval_set({args.eval_prompts}) (ODE, one fixed seed per prompt), "
        f"torch {torch.__version__}, threads {args.threads}, {steps}"
    )
    results = []
    for name in names:
        if not os.path.isfile(recipe_path(name)):
            print(f"note: {os.path.relpath(recipe_path(name), ROOT)} does not exist; skipping {name}.", flush=True)
            continue
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--json",
            "--only",
            name,
            "--eval-prompts",
            str(args.eval_prompts),
            "--threads",
            str(args.threads),
        ]
        if args.max_steps is not None:
            cmd += ["--max-steps", str(args.max_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(f"note: {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done: {name} ({results[-1]['wall_s']:.0f} s training)", flush=True)
    print()
    print(
        "| algorithm | iterations | samples seen | wall time | mean step | peak RSS MiB "
        "| all-correct before → after | colour / shape / position after | toy-CLIP reward before → after |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
