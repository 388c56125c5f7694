"""Time per GRPO iteration with a slow reward: synchronous rollouts vs rollout_ahead (pipelined scoring).

    python benchmarks/async_scoring.py                        # tiny sd3, a reward that sleeps 0.5 s per call
    python benchmarks/async_scoring.py --reward-seconds 1.0 --iterations 10
    python benchmarks/async_scoring.py --remote               # the same reward behind `serve-reward` (HTTP)

The reward is brightness plus a sleep, standing for a reward that runs elsewhere (a remote server,
another GPU): the trainer's process is idle while it waits. With ``rollout_ahead`` the next rollout
is sampled, and the current one trained on, while the worker thread waits for the reward, so an
iteration costs about max(sampling + training, reward) instead of their sum. The first iteration
(warm-up, nothing to overlap yet) is left out of the means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch

import visalign as va
from visalign.testing import brightness, tiny_pipeline


class SleepyBrightness:
    """Brightness after a sleep of ``seconds`` (the sleep releases the GIL, like waiting on a socket)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.__name__ = "sleepy_brightness"

    def __call__(self, images, prompts=None):
        time.sleep(self.seconds)
        return brightness(images, prompts)


def run(mode: str, reward, args) -> dict:
    cfg = va.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix=f"async-bench-{mode}-"),
        max_steps=args.iterations,
        num_steps=args.num_steps,
        group_size=args.group_size,
        prompts_per_step=args.prompts,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        learning_rate=1e-3,
        trackers=[],
        rollout_ahead=mode == "rollout_ahead",
    )
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), reward, [f"prompt {i}" for i in range(16)], cfg)
    rows = []
    trainer.add_callback(lambda t, step, metrics: rows.append(dict(metrics)))
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        trainer.train()  # quiet: no config dump, no progress bar
    timed = rows[1:]  # the first iteration has nothing to overlap with

    def mean(key):
        values = [r.get(key, 0.0) for r in timed]
        return statistics.mean(values) if values else float("nan")

    return {
        "step": mean("time_step"),
        "sampling": mean("time_sampling"),
        "reward_wait": mean("time_reward"),
        "training": mean("time_training"),
        "skipped": sum(bool(r.get("skipped")) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8, help="GRPO iterations per mode (first is warm-up)")
    parser.add_argument("--reward-seconds", type=float, default=0.5, help="sleep per reward call")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    parser.add_argument("--num-steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--remote", action="store_true", help="score through RemoteReward + a reward server thread")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reward, server = SleepyBrightness(args.reward_seconds), None
    if args.remote:
        from visalign.rewards.server import RewardServer

        server = RewardServer(reward).start()
        reward = va.rewards.RemoteReward(server.url)
    print(
        f"{datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"threads={torch.get_num_threads()}; tiny sd3 GRPO, {args.prompts}x{args.group_size} samples, "
        f"{args.num_steps} steps, 32 px; reward sleeps {args.reward_seconds:g} s/call"
        f"{' behind RemoteReward (HTTP, 127.0.0.1)' if args.remote else ''}; {args.iterations} iterations, "
        "means over iterations 2..N"
    )
    print(f"{'mode':15s} {'s/iteration':>12s} {'sampling':>9s} {'reward wait':>12s} {'training':>9s}")
    results = {}
    try:
        for mode in ("synchronous", "rollout_ahead"):
            r = results[mode] = run(mode, reward, args)
            print(
                f"{mode:15s} {r['step']:12.3f} {r['sampling']:9.3f} {r['reward_wait']:12.3f} {r['training']:9.3f}"
                + (f"  ({r['skipped']} skipped)" if r["skipped"] else ""),
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()
    sync, ahead = results["synchronous"]["step"], results["rollout_ahead"]["step"]
    print(f"saving: {sync - ahead:.3f} s per iteration ({1 - ahead / sync:.0%}); speed-up {sync / ahead:.2f}x")


if __name__ == "__main__":
    main()
