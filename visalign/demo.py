"""``make demo`` / ``visalign demo``: real alignment on a laptop, offline, in minutes.

GRPO fine-tunes the shipped toy text-to-image model (a rectified-flow SD3-style pipeline trained on
the toy world, deliberately imperfect) with the shipped toy CLIP as the reward. Because the toy
world has an exact evaluator, "did the model get better?" has an exact answer: the report shows
the evaluator's accuracy (GenEval-style, per attribute) before, during and after training, next
to the reward, so reward hacking would be visible as reward up and accuracy flat.

Writes ``<out>/report.html`` (self-contained: grids, curves, config, timings), ``summary.json``,
``metrics.jsonl`` and the trained LoRA (``lora/``, loads with ``pipe.load_lora_weights``).

Example::

    from visalign.demo import run_demo
    report = run_demo("runs/demo", max_steps=10)     # a shorter run
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import torch

from visalign.media import image_grid
from visalign.report import line_plot, write_html_report

# The demo's GRPO settings; configs/toy_grpo.yaml holds the same recipe for `visalign train`.
# lr 1e-3 for 60 iterations: BENCHMARKS.md ("Toy world: GRPO settings for make demo") has the runs
# behind it; 2e-3 peaks earlier and then degrades, 3e-3 gains a third as much in 30 iterations.
DEMO_CONFIG = dict(
    max_steps=60, num_steps=10, guidance_scale=3.0, sampler="sde", noise="flow", eta=0.7,
    group_size=8, prompts_per_step=4, height=32, width=32, advantage_std="group", clip_range=1e-3,
    timestep_fraction=0.6, learning_rate=1e-3, use_lora=True, lora_rank=16, lora_alpha=16, max_grad_norm=1.0,
)
GRID_SIZE = 16


def _grid(images: torch.Tensor):
    """16 samples as two rows of eight, upscaled 4× (nearest) so 32 px shapes are visible."""
    grid = image_grid(images[:GRID_SIZE].float().cpu(), nrow=8)
    return grid.resize((grid.width * 4, grid.height * 4), 0)


def run_demo(out_dir: str = "runs/demo", seed: int = 0, max_steps: int | None = None, eval_every: int = 15,
             num_eval_prompts: int = 48, overrides: Sequence[str] = ()) -> str:
    """Runs GRPO on the toy world and writes the report.

    Args:
        out_dir: where the report, metrics, samples and LoRA go.
        seed: the run's seed (the evaluation prompts and seeds are fixed regardless).
        max_steps: GRPO iterations (default: ``DEMO_CONFIG["max_steps"]``).
        eval_every: evaluate the fixed prompts every this many iterations (for the curves).
        num_eval_prompts: fixed evaluation prompts, one seed each.
        overrides: ``key=value`` overrides of the GRPO config, as on the command line.

    Returns:
        The path of ``report.html``.
    """
    import visalign as va
    from visalign.recipes import toy_model_path
    from visalign.toy import all_captions
    from visalign.toy.policy_eval import eval_set, evaluate_policy

    # Length 1 instead of the stock 256 zero T5 rows is the same model (toy/MODELS.md), ~5x faster.
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    policy = va.load(toy_model_path("t2i"), local_files_only=True, policy_kwargs={"max_sequence_length": 1})
    reward = va.rewards.CLIPScore(model=toy_model_path("clip"), variant="cosine")
    settings = {**DEMO_CONFIG, **({"max_steps": max_steps} if max_steps is not None else {})}
    config = va.GRPOConfig(output_dir=out_dir, seed=seed, trackers=["jsonl"], **settings).with_overrides(overrides)
    eval_prompts, eval_seeds = eval_set(num_eval_prompts)

    def measure(p):
        return evaluate_policy(p, eval_prompts, eval_seeds, num_steps=config.num_steps,
                               guidance_scale=config.guidance_scale, reward=reward)

    before = measure(policy)
    setup_seconds = time.perf_counter() - start
    curve = [(0, before)]

    def track(trainer, step, metrics):
        if step % eval_every == 0 and step < config.max_steps:
            curve.append((step, measure(trainer.policy)))

    trainer = va.GRPOTrainer(policy, reward, all_captions(), config)
    trainer.add_callback(track)
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    after = measure(trainer.policy)
    curve.append((config.max_steps, after))
    trainer.save_lora(os.path.join(out_dir, "lora"))

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    attributes = list(before["accuracy"])
    timings = {"setup + first evaluation (s)": round(setup_seconds, 1),
               "training incl. evaluations (s)": round(train_seconds, 1),
               "total (s)": round(time.perf_counter() - start, 1), "iterations": config.max_steps,
               "mean iteration (s)": round(sum(r["time_step"] for r in rows) / max(len(rows), 1), 2),
               "torch threads": torch.get_num_threads()}
    summary = {
        "evaluator all-correct": f"{before['all_correct']:.1%} → {after['all_correct']:.1%}",
        **{f"{k} accuracy": f"{before['accuracy'][k]:.1%} → {after['accuracy'][k]:.1%}" for k in attributes},
        "toy-CLIP reward (cosine)": f"{before['reward']:.4f} → {after['reward']:.4f}",
        "evaluation": f"{num_eval_prompts} fixed captions × 1 fixed seed, ODE, {config.num_steps} steps, "
                      f"CFG {config.guidance_scale}",
    }
    sections = [
        ("Result", [summary]),
        ("Before: the base model, fixed prompts and seeds", [_grid(before["images"])]),
        ("After GRPO: same prompts and seeds", [_grid(after["images"])]),
        ("Prompts of the grids (row by row)", ["; ".join(eval_prompts[:GRID_SIZE])]),
        ("Curves", [
            line_plot({"eval (fixed prompts)": [(s, r["reward"]) for s, r in curve],
                       "training batches": [(r["step"], r["reward_mean"]) for r in rows]}, "toy-CLIP reward"),
            line_plot({"all correct": [(s, r["all_correct"]) for s, r in curve],
                       **{k: [(s, r["accuracy"][k]) for s, r in curve] for k in attributes}},
                      "Exact evaluator accuracy (GenEval-style)"),
        ]),
        ("Timings", [timings]),
        ("Config", [config.to_dict()]),
    ]
    path = write_html_report(os.path.join(out_dir, "report.html"), "visalign demo: GRPO on the toy world", sections)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"before": {k: before[k] for k in ("all_correct", "accuracy", "reward")},
                   "after": {k: after[k] for k in ("all_correct", "accuracy", "reward")},
                   "curve": [{"step": s, "all_correct": r["all_correct"], "reward": r["reward"]} for s, r in curve],
                   "timings": timings}, f, indent=2)
    return path
