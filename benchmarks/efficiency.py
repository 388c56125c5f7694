"""Toy world, head to head: evaluator accuracy against GENERATED TRAINING SAMPLES, per algorithm.

    python benchmarks/efficiency.py                                  # all 8, seeds 0 1 2, 256..2048
    python benchmarks/efficiency.py --algorithms nft awm grpo --seeds 0 1 2 --budgets 256 512 \\
        --out benchmarks/results/efficiency.jsonl                    # resumable; run two at once to share the queue
    python benchmarks/efficiency.py --summarize --out benchmarks/results/efficiency.jsonl   # table + docs/efficiency.png

Every trainer starts from the same base (``toy:t2i``, rank-16 LoRA), trains on the same reward
(``toy_clip``) over the world's 90 captions, and is measured by the same evaluation:
:func:`visalign.toy.policy_eval.evaluate_policy` on ``eval_set(--eval-captions)`` (default 96 fixed
captions, one fixed seed each; ODE, 10 steps, CFG 3), the exact evaluator's all-correct and
colour / shape / position accuracy, and the mean toy-CLIP reward on those images.

**Equal budgets of generated training samples.** One run per (algorithm, seed) trains until its
cumulative generated samples reach the largest budget; a callback evaluates the policy the first
time the cumulative count reaches each budget. Samples per iteration come from the config
(:func:`samples_per_iteration`): prompts_per_step × group_size (GRPO and its variants, online DPO,
PRDP, NFT, AWM), prompts_per_step (DRaFT: one sample per caption). The learning-rate schedule of
every toy recipe is constant, so stopping at the largest budget changes nothing at smaller ones.

**Recipes, tuned with equal effort.** Each algorithm runs its shipped recipe
``configs/toy_<alg>.yaml`` with ``seed=<seed>``, no checkpoints, no samples, no trackers and
``true_metric_every=0`` (the GRPO recipe's reward-hacking monitor would add evaluations to its
time). GRPO-Fast (``toy_grpo_fast.yaml``, docs/math.md §10) is the GRPO recipe with a random 3-step
SDE window per iteration started in the first half of the 10 steps; GRPO-Guard
(``toy_grpo_guard.yaml``, §11) is the GRPO recipe with ``ratio: guard``. Each recipe is the winner,
on seed 0 at 512 samples, of its previous settings and the two alternatives in
:data:`TUNING_GRID` (``--tuning`` runs them; ``alg@key=value`` runs any other variant).

**Measured per (algorithm, seed, budget)** (one JSON line each, appended to ``--out``): the samples
and iterations so far, the evaluation, the training wall time so far (``trainer.train()`` minus the
evaluations), the process's peak RSS so far (``resource.getrusage``; each run is its own process,
so this is that run's model, reward, Python and torch). A row with ``algorithm: "base"`` and
budget 0 holds the base model's evaluation (the same for every algorithm: the LoRA starts at zero).

**Resume and sharing.** Finished (algorithm, seed) runs found in ``--out`` are skipped; a run that
was interrupted is rerun from the start (runs are deterministic) and only its missing budgets are
written. A claimed run holds ``<out>.lock.<alg>.<seed>`` (its process id), so two drivers started
with the same arguments split the queue between them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("grpo", "grpo_fast", "grpo_guard", "dpo", "prdp", "draft", "nft", "awm")
LABELS = {
    "grpo": "GRPO",
    "grpo_fast": "GRPO-Fast",
    "grpo_guard": "GRPO-Guard",
    "dpo": "DPO (online)",
    "prdp": "PRDP",
    "draft": "DRaFT-2",
    "nft": "DiffusionNFT",
    "awm": "AWM",
}
DEFAULT_BUDGETS = (256, 512, 1024, 2048)
# The same tuning effort for every algorithm: its shipped recipe and two alternatives, one seed,
# 512 samples. Where one optimizer step uses a part of the rollout (GRPO and its options, NFT, AWM),
# the second alternative takes 4 steps per rollout at the same compute; where a step reuses all of
# it (DPO, PRDP) or there is no rollout (DRaFT), it is a third of the learning rate instead.
TUNING_GRID = {
    **{a: ["learning_rate=3e-3", "updates_per_rollout=4"] for a in ("grpo", "grpo_fast", "grpo_guard", "nft", "awm")},
    **{a: ["learning_rate=3e-3", "learning_rate=3e-4"] for a in ("dpo", "prdp", "draft")},
}
EVAL_STEPS, EVAL_CFG = 10, 3.0
ATTRIBUTES = ("color", "shape", "position")


def split_spec(spec: str) -> tuple[str, list[str]]:
    """``"nft@learning_rate=3e-3@updates_per_rollout=4"`` -> ``("nft", [the two overrides])`` (tuning runs)."""
    name, *overrides = spec.split("@")
    return name, overrides


def check_spec(spec: str) -> str:
    """argparse type of ``--algorithms``: a benchmark algorithm, optionally with ``@key=value`` overrides."""
    name, overrides = split_spec(spec)
    if name not in ALGORITHMS or any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected one of {', '.join(ALGORITHMS)}, optionally followed by @key=value overrides "
            "(e.g. nft@learning_rate=3e-3)"
        )
    return spec


def recipe_for(algorithm: str) -> tuple[str, list[str]]:
    """``(recipe path, tuning overrides)`` of a benchmark algorithm or tuning spec (``alg@key=value...``)."""
    name, tuning = split_spec(algorithm)
    return os.path.join(ROOT, "configs", f"toy_{name}.yaml"), tuning


def run_overrides(algorithm: str, seed: int, max_steps: int, output_dir: str) -> list[str]:
    """Every override a benchmark run applies to its recipe (method, seed, length, no side outputs)."""
    return recipe_for(algorithm)[1] + [
        f"seed={seed}",
        f"max_steps={max_steps}",
        f"output_dir={output_dir}",
        "trackers=[]",
        "sample_every=0",
        "checkpoint_every=0",
        "true_metric_every=0",
    ]


def samples_per_iteration(algorithm: str, config) -> int:
    """Images each iteration generates for training (per rank): DRaFT one per caption, others a group each."""
    algorithm = split_spec(algorithm)[0]
    if algorithm == "draft":
        return int(config.prompts_per_step)
    if algorithm == "dpo" and getattr(config, "mode", "online") != "online":
        return 0  # offline DPO generates nothing
    return int(config.prompts_per_step) * int(getattr(config, "group_size", 1))


def _evaluate(policy, reward, num_captions: int) -> dict:
    from visalign.toy.policy_eval import eval_set, evaluate_policy

    prompts, seeds = eval_set(num_captions)
    result = evaluate_policy(policy, prompts, seeds, num_steps=EVAL_STEPS, guidance_scale=EVAL_CFG, reward=reward)
    return {
        "all_correct": float(result["all_correct"]),
        "accuracy": {k: float(result["accuracy"][k]) for k in ATTRIBUTES},
        "reward": float(result["reward"]),
    }


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    """This process's CPU time (user + system): unlike wall time, it does not grow with the machine's load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _environment(threads: int) -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "threads": threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": datetime.date.today().isoformat(),
    }


def append_row(path: str, row: dict) -> None:
    """Appends one JSON line with a single write (safe with several writers on one file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill mid-write
    return rows


def done_budgets(rows: list[dict], algorithm: str, seed: int, eval_captions: int) -> set[int]:
    return {
        int(r["budget"])
        for r in rows
        if r.get("algorithm") == algorithm and r.get("seed") == seed and r.get("eval_captions") == eval_captions
    }


def run_one(
    algorithm: str,
    seed: int,
    budgets,
    eval_captions: int = 96,
    out: str | None = None,
    threads: int = 1,
    with_base: bool = False,
    skip_budgets=(),
) -> list[dict]:
    """Trains ``algorithm`` with ``seed`` in this process, evaluating at each budget; returns the rows.

    Rows are appended to ``out`` as they are measured (except budgets in ``skip_budgets``, already
    there). With ``with_base`` the base model is evaluated first (row ``algorithm="base"``, budget 0).
    """
    import torch

    from visalign.recipes import load_recipe

    torch.set_num_threads(threads)
    budgets = sorted({int(b) for b in budgets})
    recipe, tuning = recipe_for(algorithm)
    env = _environment(threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cls, policy, reward, prompts, config = load_recipe(recipe, run_overrides(algorithm, seed, 1, tmp))
        per_iter = samples_per_iteration(algorithm, config)
        if per_iter <= 0:
            raise SystemExit(f"{algorithm}: its recipe generates no samples; nothing to budget.")
        max_steps = math.ceil(budgets[-1] / per_iter)
        config = config.with_overrides([f"max_steps={max_steps}"])
        common = {"eval_captions": eval_captions, "eval_num_steps": EVAL_STEPS, "eval_guidance_scale": EVAL_CFG, **env}
        if with_base:
            base = {
                "algorithm": "base",
                "seed": None,
                "budget": 0,
                "samples": 0,
                "iterations": 0,
                **_evaluate(policy, reward, eval_captions),
                "train_wall_s": 0.0,
                "peak_rss_mib": _peak_rss_mib(),
                **common,
            }
            rows.append(base)
            if out:
                append_row(out, base)
        trainer = cls(policy, reward, prompts, config)
        pending = list(budgets)
        clock = {"eval_s": 0.0, "start": 0.0, "eval_cpu_s": 0.0, "cpu_start": 0.0}

        def at_budget(trainer, step, metrics) -> None:
            samples = step * per_iter
            while pending and samples >= pending[0]:
                budget = pending.pop(0)
                wall = time.perf_counter() - clock["start"] - clock["eval_s"]
                cpu = _cpu_s() - clock["cpu_start"] - clock["eval_cpu_s"]
                t0, c0 = time.perf_counter(), _cpu_s()
                if budget in skip_budgets:
                    continue
                row = {
                    "algorithm": algorithm,
                    "seed": seed,
                    "budget": budget,
                    "samples": samples,
                    "iterations": step,
                    "samples_per_iteration": per_iter,
                    **_evaluate(trainer.policy, reward, eval_captions),
                    "train_wall_s": wall,
                    "train_cpu_s": cpu,
                    "peak_rss_mib": _peak_rss_mib(),
                    "load_avg_1m": os.getloadavg()[0],
                    "recipe": os.path.relpath(recipe, ROOT),
                    "overrides": tuning,
                    **common,
                }
                clock["eval_s"] += time.perf_counter() - t0
                clock["eval_cpu_s"] += _cpu_s() - c0
                rows.append(row)
                if out:
                    append_row(out, row)
                print(
                    f"[{algorithm} seed {seed}] {samples} samples ({step} it): all-correct "
                    f"{row['all_correct']:.1%}, reward {row['reward']:.4f}, train {wall:.0f} s ({cpu:.0f} CPU-s)",
                    flush=True,
                )

        trainer.add_callback(at_budget)
        clock["start"], clock["cpu_start"] = time.perf_counter(), _cpu_s()
        trainer.train()
    return rows


# ---------------------------------------------------------------------------- the queue
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(out: str, algorithm: str, seed: int) -> str | None:
    """Creates the run's lock file (our pid); None when a live process holds it."""
    lock = f"{out}.lock.{algorithm}.{seed}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(lock) as f:
                    holder = int(f.read().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and _pid_alive(holder):
                return None
            with contextlib_suppress():
                os.remove(lock)  # stale: its process is gone
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return lock
    return None


class contextlib_suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def run_queue(args) -> None:
    budgets = sorted(set(args.budgets))
    for algorithm in args.algorithms:
        for seed in args.seeds:
            rows = read_rows(args.out)
            have = done_budgets(rows, algorithm, seed, args.eval_captions)
            if set(budgets) <= have:
                print(f"skip: {algorithm} seed {seed} (complete in {args.out})", flush=True)
                continue
            lock = _claim(args.out, algorithm, seed)
            if lock is None:
                print(f"skip: {algorithm} seed {seed} (another process runs it)", flush=True)
                continue
            try:
                rows = read_rows(args.out)  # again, now that it is ours
                have = done_budgets(rows, algorithm, seed, args.eval_captions)
                if set(budgets) <= have:
                    continue
                with_base = not any(
                    r.get("algorithm") == "base" and r.get("eval_captions") == args.eval_captions for r in rows
                )
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    "--algorithms",
                    algorithm,
                    "--seeds",
                    str(seed),
                    "--budgets",
                    *map(str, budgets),
                    "--eval-captions",
                    str(args.eval_captions),
                    "--threads",
                    str(args.threads),
                    "--out",
                    args.out,
                    "--skip-budgets",
                    *map(str, sorted(have & set(budgets))),
                ]
                if with_base:
                    cmd.append("--with-base")
                env = {
                    **os.environ,
                    "OMP_NUM_THREADS": str(args.threads),
                    "MKL_NUM_THREADS": str(args.threads),
                    "TQDM_DISABLE": "1",
                    "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1",
                }
                start = time.perf_counter()
                print(f"run: {algorithm} seed {seed} budgets {budgets}", flush=True)
                proc = subprocess.run(cmd, cwd=ROOT, env=env)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{status}: {algorithm} seed {seed} in {time.perf_counter() - start:.0f} s", flush=True)
            finally:
                with contextlib_suppress():
                    os.remove(lock)


# ---------------------------------------------------------------------------- the summary
def _mean_sd(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    if not values:
        return "–"
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ± {fmt.format(statistics.stdev(values) * scale)}"


def aggregate(rows: list[dict], eval_captions: int | None = None) -> dict:
    """``{(algorithm, budget): [rows over seeds]}`` (the last row of each seed wins) and the base row."""
    groups: dict = {}
    base = None
    for r in rows:
        if eval_captions is not None and r.get("eval_captions") != eval_captions:
            continue
        if r.get("algorithm") == "base":
            base = base or r
            continue
        groups.setdefault((r["algorithm"], int(r["budget"])), {})[r["seed"]] = r
    return {"groups": {k: [v[s] for s in sorted(v)] for k, v in groups.items()}, "base": base}


def summary_table(rows: list[dict], eval_captions: int | None = None) -> str:
    """A markdown table: mean ± sd over seeds per (algorithm, budget)."""
    agg = aggregate(rows, eval_captions)
    order = {a: i for i, a in enumerate(ALGORITHMS)}
    lines = [
        "| algorithm | samples | seeds | all-correct % | colour / shape / position % | toy-CLIP reward "
        "| train CPU s | train wall s | peak RSS MiB |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    base = agg["base"]
    if base is not None:
        attrs = " / ".join(f"{100 * base['accuracy'][k]:.1f}" for k in ATTRIBUTES)
        lines.append(
            f"| base (`toy:t2i`) | 0 | – | {100 * base['all_correct']:.1f} | {attrs} | {base['reward']:.4f} | – | – | – |"
        )
    for (alg, budget), group in sorted(agg["groups"].items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        attrs = " / ".join(_mean_sd([g["accuracy"][k] for g in group], 100, "{:.0f}") for k in ATTRIBUTES)
        seeds = ",".join(str(g["seed"]) for g in group)
        lines.append(
            f"| {LABELS.get(alg, alg)} | {budget} | {len(group)} ({seeds}) | "
            f"{_mean_sd([g['all_correct'] for g in group], 100)} | {attrs} | "
            f"{_mean_sd([g['reward'] for g in group], 1, '{:.4f}')} | "
            f"{_mean_sd([g['train_cpu_s'] for g in group if 'train_cpu_s' in g], 1, '{:.0f}')} | "
            f"{_mean_sd([g['train_wall_s'] for g in group], 1, '{:.0f}')} | "
            f"{_mean_sd([g['peak_rss_mib'] for g in group], 1, '{:.0f}')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, eval_captions: int | None = None) -> str:
    """Accuracy against samples, one line per algorithm, error bars = sd over seeds; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows, eval_captions)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for alg in ALGORITHMS:
        points = sorted((b, g) for (a, b), g in agg["groups"].items() if a == alg)
        if not points:
            continue
        xs = [b for b, _ in points]
        means = [100 * statistics.fmean(x["all_correct"] for x in g) for _, g in points]
        sds = [100 * statistics.stdev(x["all_correct"] for x in g) if len(g) > 1 else 0.0 for _, g in points]
        lo, hi = min(len(g) for _, g in points), max(len(g) for _, g in points)
        seeds = f"{lo} seed{'s' if hi > 1 else ''}" if lo == hi else f"{lo}–{hi} seeds"
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=f"{LABELS.get(alg, alg)} ({seeds})")
    if agg["base"] is not None:
        ax.axhline(100 * agg["base"]["all_correct"], color="grey", linestyle="--", linewidth=1, label="base model")
    ax.set_xscale("log", base=2)
    budgets = sorted({b for (_, b) in agg["groups"]})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("generated training samples")
    ax.set_ylabel("evaluator all-correct (%)")
    n = (agg["base"] or next((g[0] for g in agg["groups"].values()), {})).get("eval_captions", "?")
    ax.set_title(
        f"Toy world: accuracy vs samples (eval_set({n}), ODE 10 steps, CFG 3; mean ± sd over seeds)", fontsize=9
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--algorithms",
        nargs="+",
        type=check_spec,
        default=list(ALGORITHMS),
        help="in this order (default: all eight); alg@key=value@... runs a tuning variant of alg's recipe",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=list(DEFAULT_BUDGETS),
        help="generated training samples at which to evaluate (default 256 512 1024 2048)",
    )
    parser.add_argument(
        "--tuning",
        action="store_true",
        help="run TUNING_GRID's alternatives of --algorithms (as alg@override specs) instead of the recipes",
    )
    parser.add_argument("--eval-captions", type=int, default=96, help="size of the fixed evaluation set (eval_set(n))")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "efficiency.jsonl"))
    parser.add_argument("--summarize", action="store_true", help="print the table of --out and write --plot")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "efficiency.png"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-base", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-budgets", nargs="*", type=int, default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tuning:
        args.algorithms = [f"{a}@{o}" for a in args.algorithms for o in TUNING_GRID.get(split_spec(a)[0], [])]
    if any(b <= 0 for b in args.budgets):
        parser.error("--budgets must be positive sample counts")
    if args.summarize:
        rows = read_rows(args.out)
        if not rows:
            parser.error(f"no rows in {args.out}")
        print(summary_table(rows, args.eval_captions))
        print(f"\nplot: {plot(rows, args.plot, args.eval_captions)}")
        return
    if args.worker:
        run_one(
            args.algorithms[0],
            args.seeds[0],
            args.budgets,
            args.eval_captions,
            args.out,
            args.threads,
            with_base=args.with_base,
            skip_budgets=set(args.skip_budgets),
        )
        return
    run_queue(args)


if __name__ == "__main__":
    main()
