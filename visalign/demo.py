"""``make demo`` / ``visalign demo``: real alignment on a laptop, offline, in minutes.

DRaFT (reward backprop; GRPO with ``--algorithm grpo``) fine-tunes the shipped toy text-to-image
model (a rectified-flow SD3-style pipeline trained on the toy world, deliberately imperfect) with the
shipped toy CLIP as the reward. Because the toy
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

import contextlib
import json
import os
import time
from collections.abc import Sequence

import torch

from visalign.errors import ConfigError
from visalign.media import to_pil_images
from visalign.quiet import quiet_library_notices
from visalign.report import Cell, Gallery, line_plot, write_html_report

# The demo's recipes; configs/toy_<algorithm>.yaml holds the same settings for `visalign train`
# (tests/test_demo.py checks that they agree). DEMO_ALGORITHM is the one `make demo` runs: the one
# with the clearest gain on the exact evaluator within the demo's few CPU minutes, measured head to
# head in BENCHMARKS.md ("Toy world: samples to accuracy, head to head").
DEMO_CONFIGS: dict[str, dict] = {
    # DRaFT-2: reward backprop through the last 2 of 10 ODE steps, 8 captions (one sample each) per
    # iteration; 64 iterations = 512 generated samples.
    "draft": dict(
        max_steps=64,
        num_steps=10,
        guidance_scale=3.0,
        sampler="ode",
        variant="draft",
        truncation=2,
        prompts_per_step=8,
        checkpoint_steps=False,
        height=32,
        width=32,
        learning_rate=1e-3,
        use_lora=True,
        lora_rank=16,
        lora_alpha=16,
        max_grad_norm=1.0,
    ),
    # GRPO: lr 1e-3 for 60 iterations; BENCHMARKS.md ("Toy world: GRPO settings for make demo") has
    # the runs behind it; 2e-3 peaks earlier and then degrades, 3e-3 gains a third as much in 30.
    "grpo": dict(
        max_steps=60,
        num_steps=10,
        guidance_scale=3.0,
        sampler="sde",
        noise="flow",
        eta=0.7,
        group_size=8,
        prompts_per_step=4,
        height=32,
        width=32,
        advantage_std="group",
        clip_range=1e-3,
        timestep_fraction=0.6,
        learning_rate=1e-3,
        use_lora=True,
        lora_rank=16,
        lora_alpha=16,
        max_grad_norm=1.0,
    ),
}
DEMO_ALGORITHM = "draft"
DEMO_CONFIG = DEMO_CONFIGS[DEMO_ALGORITHM]
LABELS = {"draft": "DRaFT", "grpo": "GRPO"}
TRAINERS = {"draft": ("DRaFTConfig", "DRaFTTrainer"), "grpo": ("GRPOConfig", "GRPOTrainer")}
GRID_SIZE = 16
ATTRIBUTES = ("color", "shape", "position")


def _gallery(result: dict, prompts: Sequence[str]) -> Gallery:
    """The first 16 samples, upscaled 4× (nearest) so 32 px shapes are visible, each with its
    caption and the exact evaluator's verdict (green ✓ all correct, red ✗ naming what is wrong).
    """
    images = to_pil_images(result["images"][:GRID_SIZE].float().cpu(), upscale=4)
    cells = []
    for image, prompt, verdict in zip(images, prompts, result["samples"]):
        wrong = [attr for attr, ok in verdict["correct"].items() if not ok]
        cells.append(
            Cell(
                image, prompt, correct=bool(verdict["all_correct"]), note=f"wrong: {', '.join(wrong)}" if wrong else ""
            )
        )
    return Gallery(cells, columns=8)


def _count_correct(result: dict) -> str:
    shown = result["samples"][:GRID_SIZE]
    return f"{sum(bool(v['all_correct']) for v in shown)} of {len(shown)} judged all correct"


def summary_table(before: dict, after: dict) -> str:
    """The before → after table the demo prints: evaluator accuracies (percent) and the reward."""
    rows = [("all correct", before["all_correct"], after["all_correct"], True)]
    rows += [
        (attr, before["accuracy"][attr], after["accuracy"][attr], True)
        for attr in ATTRIBUTES
        if attr in before["accuracy"]
    ]
    if "reward" in before:
        rows.append(("reward (toy-CLIP)", before["reward"], after["reward"], False))
    lines = [f"  {'':<18}{'before':>8}  {'after':>8}  {'Δ':>10}"]
    for name, b, a, percent in rows:
        if percent:
            lines.append(f"  {name:<18}{b:>8.1%}  {a:>8.1%}  {(a - b) * 100:>+6.1f} pts")
        else:
            lines.append(f"  {name:<18}{b:>8.4f}  {a:>8.4f}  {a - b:>+10.4f}")
    return "\n".join(lines)


@contextlib.contextmanager
def _no_loading_bars():
    """Hides diffusers' and transformers' loading bars while the tiny toy models load (sub-second)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def run_demo(
    out_dir: str = "runs/demo",
    seed: int = 0,
    max_steps: int | None = None,
    eval_every: int = 15,
    num_eval_prompts: int = 48,
    overrides: Sequence[str] = (),
    algorithm: str = DEMO_ALGORITHM,
) -> str:
    """Trains on the toy world with one of :data:`DEMO_CONFIGS` and writes the report.

    Args:
        out_dir: where the report, metrics, samples and LoRA go.
        seed: the run's seed (the evaluation prompts and seeds are fixed regardless).
        max_steps: training iterations (default: the recipe's ``max_steps``).
        eval_every: evaluate the fixed prompts every this many iterations (for the curves).
        num_eval_prompts: fixed evaluation prompts, one seed each.
        overrides: ``key=value`` overrides of the algorithm's config, as on the command line.
        algorithm: a key of :data:`DEMO_CONFIGS` (``"draft"`` or ``"grpo"``).

    Returns:
        The path of ``report.html``.
    """
    if algorithm not in DEMO_CONFIGS:
        raise ConfigError(f"The demo runs one of {', '.join(DEMO_CONFIGS)}; got algorithm={algorithm!r}.")
    import visalign as va
    from visalign.recipes import toy_model_path
    from visalign.toy import all_captions
    from visalign.toy.policy_eval import eval_set, evaluate_policy

    # Length 1 instead of the stock 256 zero T5 rows is the same model (toy/MODELS.md), ~5x faster.
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    quiet_library_notices()
    with _no_loading_bars():
        policy = va.load(toy_model_path("t2i"), local_files_only=True, policy_kwargs={"max_sequence_length": 1})
        reward = va.rewards.CLIPScore(model=toy_model_path("clip"), variant="cosine")
    config_class, trainer_class = (getattr(va, name) for name in TRAINERS[algorithm])
    label = LABELS[algorithm]
    settings = {**DEMO_CONFIGS[algorithm], **({"max_steps": max_steps} if max_steps is not None else {})}
    config = config_class(output_dir=out_dir, seed=seed, trackers=["jsonl"], **settings).with_overrides(overrides)
    eval_prompts, eval_seeds = eval_set(num_eval_prompts)

    def measure(p):
        return evaluate_policy(
            p, eval_prompts, eval_seeds, num_steps=config.num_steps, guidance_scale=config.guidance_scale, reward=reward
        )

    before = measure(policy)
    setup_seconds = time.perf_counter() - start
    curve = [(0, before)]

    def track(trainer, step, metrics):
        if step % eval_every == 0 and step < config.max_steps:
            curve.append((step, measure(trainer.policy)))

    trainer = trainer_class(policy, reward, all_captions(), config)
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
    timings = {
        "setup + first evaluation (s)": round(setup_seconds, 1),
        "training incl. evaluations (s)": round(train_seconds, 1),
        "total (s)": round(time.perf_counter() - start, 1),
        "iterations": config.max_steps,
        "mean iteration (s)": round(sum(r["time_step"] for r in rows) / max(len(rows), 1), 2),
        "torch threads": torch.get_num_threads(),
    }
    summary = {
        "evaluator all-correct": f"{before['all_correct']:.1%} → {after['all_correct']:.1%}",
        **{f"{k} accuracy": f"{before['accuracy'][k]:.1%} → {after['accuracy'][k]:.1%}" for k in attributes},
        "toy-CLIP reward (cosine)": f"{before['reward']:.4f} → {after['reward']:.4f}",
        "evaluation": f"{num_eval_prompts} fixed captions × 1 fixed seed, ODE, {config.num_steps} steps, "
        f"CFG {config.guidance_scale}",
    }
    sections = [
        ("Result", [summary]),
        (
            "Before: the base model, fixed prompts and seeds",
            [
                f"{_count_correct(before)} by the exact evaluator: a green ✓ means every attribute of the "
                f"caption is right, a red ✗ names the wrong ones.",
                _gallery(before, eval_prompts),
            ],
        ),
        (f"After {label}: same prompts and seeds", [f"{_count_correct(after)}.", _gallery(after, eval_prompts)]),
        (
            "Curves",
            [
                line_plot(
                    {
                        "eval (fixed prompts)": [(s, r["reward"]) for s, r in curve],
                        "training batches": [(r["step"], r["reward_mean"]) for r in rows],
                    },
                    "toy-CLIP reward",
                ),
                line_plot(
                    {
                        "all correct": [(s, r["all_correct"]) for s, r in curve],
                        **{k: [(s, r["accuracy"][k]) for s, r in curve] for k in attributes},
                    },
                    "Exact evaluator accuracy (GenEval-style)",
                ),
            ],
        ),
        ("Timings", [timings]),
        ("Config", [config.to_dict()]),
    ]
    path = write_html_report(os.path.join(out_dir, "report.html"), f"visalign demo: {label} on the toy world", sections)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(
            {
                "before": {k: before[k] for k in ("all_correct", "accuracy", "reward")},
                "after": {k: after[k] for k in ("all_correct", "accuracy", "reward")},
                "curve": [{"step": s, "all_correct": r["all_correct"], "reward": r["reward"]} for s, r in curve],
                "timings": timings,
            },
            f,
            indent=2,
        )
    print(
        f"\nBefore → after {config.max_steps} {label} iterations ({num_eval_prompts} fixed prompts, "
        f"exact evaluator):\n{summary_table(before, after)}"
    )
    return path
