"""Real-size benchmarks on one GPU: SD3.5-Medium and FLUX.1-dev at 512², bf16, LoRA (driver of gpu.sh).

    bash benchmarks/gpu.sh                                   # one GPU: every section, table + JSON
    python benchmarks/gpu.py --device cpu --depth 1 --size 64 --steps 2 --iterations 2   # CPU smoke mode
    python benchmarks/gpu.py --device cpu --depth 1 --size 128 --sections plan           # plan vs measured on CPU

Each architecture (``visalign.architectures``: the published configs, random weights) is built once
with the tiny text encoders of ``visalign.testing`` widened to the real widths (the real T5-XXL and
CLIP-G cannot be built usefully without weights; everything from the embeddings on is real), then:

- ``sampling``: the stock diffusers pipeline against ``va.sample(..., sampler="ode")``, same settings,
  interleaved, medians and their ratio (target: within 3%);
- ``grpo``: ``va.GRPOTrainer`` against the DanceGRPO-structured loop (benchmarks/grpo_vs_baseline.py),
  iterations/s and ratio (target: 1.5x), GPU peaks, and the training phase's MFU: model FLOPs of the
  training phase counted by ``FlopCounterMode`` (``visalign.plan.measure``, no checkpoint recompute) /
  its measured time / the GPU's data-sheet dense bf16 peak (``visalign.plan.PEAK_BF16_FLOPS``; target 35%);
- ``algorithms``: one step of online DPO, PRDP, DRaFT through the whole chain with and without
  per-step checkpointing, and NFT: seconds per step and peak memory (out-of-memory is recorded);
- ``plan``: ``visalign plan``'s peak against the measured one for a LoRA GRPO iteration and a full
  fine-tuning one (skipped when the plan says it cannot fit): on a GPU ``torch.cuda.max_memory_allocated``,
  on CPU the growth of the process's peak RSS over its RSS after imports, in a fresh process per case
  (``/proc/self/clear_refs`` resets the peak after building, ``malloc_trim`` returns freed memory first).

It prints one table per section and writes everything, with the machine and versions, to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHITECTURES = {"sd35-medium": "sd3", "flux1-dev": "flux"}
TINY_TEXT = {"sd3": 77, "flux": 0}  # CLIP tokens the denoiser sees besides T5's


def brightness(images, prompts):
    return images.float().flatten(1).mean(1)


def _cuda(args) -> bool:
    return args.device.startswith("cuda")


def _sync(args) -> None:
    if _cuda(args):
        torch.cuda.synchronize()


def _reset(args) -> None:
    gc.collect()
    if _cuda(args):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(args) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if _cuda(args) else None


def _mixed(args) -> str:
    return "bf16" if args.dtype == "bfloat16" and _cuda(args) else "no"


def build(name: str, args):
    import visalign as va
    from visalign import architectures as arch

    pipe = arch.build_pipeline(name, depth=args.depth, device=args.device, dtype=getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe, va.wrap(pipe, max_sequence_length=args.text_length)


# ---------------------------------------------------------------------------------------------- sampling
def bench_sampling(pipe, policy, args) -> dict:
    import visalign as va

    prompts = [f"prompt {i}" for i in range(args.sample_batch)]
    g = policy.default_guidance_scale
    size = dict(height=args.size, width=args.size)

    def stock():
        pipe(
            prompt=prompts,
            num_inference_steps=args.steps,
            guidance_scale=g,
            output_type="pt",
            max_sequence_length=args.text_length,
            generator=torch.Generator(args.device).manual_seed(0),
            **size,
        )

    def ours():
        va.sample(
            policy,
            prompts,
            num_steps=args.steps,
            guidance_scale=g,
            sampler="ode",
            generator=torch.Generator(args.device).manual_seed(0),
            **size,
        )

    # On a GPU, wall time; on a (shared, loaded) CPU the process's CPU time, which other processes' load
    # disturbs far less than wall time (both loops run the same intra-op threads).
    clock = time.perf_counter if _cuda(args) else time.process_time
    times = {"stock": [], "visalign": []}
    with torch.no_grad():
        for fn in (stock, ours):
            fn()  # warm-up
        for _ in range(args.repeats):
            for key, fn in (("stock", stock), ("visalign", ours)):
                _sync(args)
                start = clock()
                fn()
                _sync(args)
                times[key].append(clock() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"batch": args.sample_batch, "steps": args.steps, "stock_s": med["stock"], "visalign_s": med["visalign"]}
    return dict(out, ratio=med["visalign"] / med["stock"], clock="wall" if _cuda(args) else "process CPU time")


# ---------------------------------------------------------------------------------------------- GRPO vs baseline
def _workload(name: str, policy, args, use_lora: bool, micro_batch: int | None):
    from visalign.plan import Workload

    family = ARCHITECTURES[name]
    samples = args.prompts * args.group_size
    k = max(1, round(args.fraction * (args.steps - 1)))
    cfg = 2 if family == "sd3" else 1
    text = sum(
        p.numel()
        for n, m in policy.pipe.components.items()
        if n.startswith("text_encoder") and m is not None
        for p in m.parameters()
    )
    dtype = args.dtype if _cuda(args) else "float32"
    return Workload(
        name,
        "grpo",
        dtype,
        dtype,
        args.size,
        args.size,
        None,
        use_lora,
        args.lora_rank,
        None,
        args.checkpointing,
        False,
        False,
        samples,
        args.steps,
        k,
        min(micro_batch or samples, samples),
        cfg,
        cfg,
        TINY_TEXT[family] + args.text_length,
        text,
        "cuda" if _cuda(args) else "cpu",
    )


_MEASURED: dict = {}


def _measure(w, depth):
    """``visalign.plan.measure`` once per distinct workload shape (it takes tens of seconds at full depth)."""
    import dataclasses

    from visalign.plan import measure

    key = (
        depth,
        *(
            v
            for k, v in dataclasses.asdict(w).items()
            if k not in ("rollout_batch", "num_steps", "trained_steps", "micro_batch")
        ),
    )
    if key not in _MEASURED:
        _MEASURED[key] = measure(w, depth=depth)
    return dict(_MEASURED[key])


def bench_grpo(name: str, pipe, policy, args) -> dict:
    import visalign as va
    from benchmarks import grpo_vs_baseline as gvb
    from visalign.plan import peak_bf16_flops

    family = ARCHITECTURES[name]
    gargs = SimpleNamespace(
        family={"sd3": "sd3", "flux": "flux"}[family],
        depth=args.depth,
        size=args.size,
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        group_size=args.group_size,
        prompts=args.prompts,
        fraction=args.fraction,
        lora_rank=args.lora_rank,
        guidance_scale=policy.default_guidance_scale,
        micro_batch=args.micro_batch,
        checkpointing=args.checkpointing,
        text_length=args.text_length,
        frames=None,
        iterations=args.iterations,
    )
    twin = va.wrap(copy.deepcopy(pipe), max_sequence_length=args.text_length)
    result = gvb.compare(gargs, policies=(policy, twin))
    del twin
    _cleanup(policy)
    w = _workload(name, policy, args, True, args.micro_batch)
    measured = _measure(w, args.depth)
    train_flops = w.rollout_batch * w.trained_steps * w.train_cfg * measured["flops_train"]
    rollout_flops = w.rollout_batch * args.steps * w.cfg * measured["flops_forward"]
    phases = result["phases"]["visalign"] or {"time_training": float("nan"), "time_sampling": float("nan")}
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if _cuda(args) else None
    result.update(train_flops=train_flops, rollout_flops=rollout_flops, peak_bf16_flops=peak)
    result.update(train_flops_per_s=train_flops / phases["time_training"])
    result.update(rollout_flops_per_s=rollout_flops / phases["time_sampling"])
    if peak:
        result.update(mfu_training=result["train_flops_per_s"] / peak, mfu_rollout=result["rollout_flops_per_s"] / peak)
    return result


def _cleanup(policy) -> None:
    if policy.has_lora:
        policy.remove_lora()
    policy.denoiser.disable_gradient_checkpointing()
    policy.set_runner(None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- algorithm steps
ALGORITHMS = ("dpo-online", "prdp", "draft-full", "draft-full-nockpt", "nft")


def _trainer(algorithm: str, policy, args, out: str):
    import visalign as va

    common = dict(
        output_dir=out,
        max_steps=10**6,
        height=args.size,
        width=args.size,
        lora_rank=args.lora_rank,
        trackers=["jsonl"],
        mixed_precision=_mixed(args),
        num_steps=args.steps,
        guidance_scale=policy.default_guidance_scale,
        gradient_checkpointing=args.checkpointing,
    )
    prompts = [f"prompt {i}" for i in range(16)]
    group = dict(group_size=args.group_size, prompts_per_step=args.prompts)
    if algorithm == "dpo-online":
        return va.DPOTrainer(policy, brightness, prompts, va.DPOConfig(mode="online", **group, **common))
    if algorithm == "prdp":
        return va.PRDPTrainer(policy, brightness, prompts, va.PRDPConfig(**group, **common))
    if algorithm == "nft":
        return va.NFTTrainer(policy, brightness, prompts, va.NFTConfig(**group, **common))
    draft = dict(checkpoint_steps=algorithm == "draft-full")
    return va.DRaFTTrainer(policy, brightness, prompts, va.DRaFTConfig(prompts_per_step=1, **draft, **common))


def bench_algorithms(policy, args) -> dict:
    import visalign as va

    rows = {}
    for algorithm in ALGORITHMS:
        if algorithm == "nft" and not hasattr(va, "NFTTrainer"):
            continue
        _reset(args)
        try:
            with tempfile.TemporaryDirectory() as out:
                trainer = _trainer(algorithm, policy, args, out)
                times = []
                for it in range(args.algorithm_iterations):
                    _sync(args)
                    start = time.perf_counter()
                    trainer._seed_step(it)
                    trainer.train_step(it)
                    _sync(args)
                    times.append(time.perf_counter() - start)
                rows[algorithm] = {"step_s": statistics.median(times[1:] or times), "peak_gib": _peak_gib(args)}
                del trainer
        except torch.cuda.OutOfMemoryError:
            rows[algorithm] = {"step_s": None, "peak_gib": None, "error": "out of memory"}
        _cleanup(policy)
    return rows


# ---------------------------------------------------------------------------------------------- plan vs measured
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _allocator_peaks(prof, marker: str) -> tuple[int, int]:
    """``(allocated when ``marker`` starts, peak allocated during it)`` from the profiler's memory events:
    every allocation and free through PyTorch's CPU allocator, summed in time order from the profile's start."""
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == marker)
    running, at_start, peak = 0, None, 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if at_start is None and e.start_ns() >= window.start_ns():
            at_start = peak = running
        running += e.nbytes()
        if window.start_ns() <= e.start_ns() <= window.end_ns():
            peak = max(peak, running)
    return at_start or running, peak


def plan_case(name: str, use_lora: bool, args, method: str = "allocator") -> dict:
    """One plan-vs-measured case in this process (a fresh one on CPU); returns predicted and measured peaks.

    ``method="allocator"``: on a GPU ``torch.cuda.max_memory_allocated``; on CPU what PyTorch's CPU
    allocator held at its peak, from ``torch.profiler``'s memory events (the whole case is profiled, so
    the weights count). ``method="rss"`` (CPU): the process's peak RSS above its RSS after imports,
    without the profiler, which would add its own buffers; RSS also holds what glibc and oneDNN keep.
    """
    import contextlib
    import ctypes

    import visalign as va
    from visalign.plan import make_plan

    if not _cuda(args):  # import and warm up everything a run touches, so the baseline RSS holds it
        from visalign.testing import tiny_pipeline

        with tempfile.TemporaryDirectory() as out:
            warm = va.GRPOConfig(output_dir=out, group_size=2, num_steps=2, max_steps=1, trackers=["jsonl"])
            va.GRPOTrainer(tiny_pipeline(ARCHITECTURES[name]), brightness, ["a"], warm).train()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_bytes("VmRSS") if not _cuda(args) else 0
    profiler = (
        contextlib.nullcontext()
        if _cuda(args) or method == "rss"
        else torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    )
    with profiler as prof:
        pipe, policy = build(name, args)
        w = _workload(name, policy, args, use_lora, args.micro_batch)
        plan = make_plan(w, gpus=1, strategies=("ddp",), depth=args.depth, measured=_measure(w, args.depth))
        predicted = plan.rows["ddp"]["PEAK per GPU"]
        if _cuda(args) and predicted > 0.9 * torch.cuda.get_device_properties(0).total_memory:
            return {
                "lora": use_lora,
                "predicted_gib": predicted / 2**30,
                "measured_gib": None,
                "skipped": "the plan says it does not fit",
            }
        with tempfile.TemporaryDirectory() as out:
            config = va.GRPOConfig(
                num_steps=args.steps,
                group_size=args.group_size,
                prompts_per_step=args.prompts,
                timestep_fraction=args.fraction,
                micro_batch_size=args.micro_batch,
                use_lora=use_lora,
                lora_rank=args.lora_rank,
                height=args.size,
                width=args.size,
                output_dir=out,
                gradient_checkpointing=args.checkpointing,
                mixed_precision=_mixed(args),
                guidance_scale=policy.default_guidance_scale,
                trackers=["jsonl"],
                max_steps=10**6,
            )
            trainer = va.GRPOTrainer(policy, brightness, [f"prompt {i}" for i in range(8)], config)
            if _cuda(args):
                _reset(args)
            else:
                gc.collect()
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # the peak RSS restarts from the current RSS
            with torch.profiler.record_function("plan_case_iterations"):
                for it in range(args.plan_iterations):
                    trainer._seed_step(it)
                    trainer.train_step(it)
            rss = _rss_bytes("VmHWM") - base if not _cuda(args) else None
    if _cuda(args):
        measured, setup = torch.cuda.max_memory_allocated(), None
    elif method == "rss":
        measured, setup = rss, None
    else:
        setup, measured = _allocator_peaks(prof, "plan_case_iterations")
    rows = plan.rows["ddp"]
    phases = {
        "rollout": "rollout: peak above static",
        "train": "train: peak above static",
        "optimizer step": "optimizer step: temporaries",
    }
    return {
        "lora": use_lora,
        "method": "cuda allocated" if _cuda(args) else method,
        "predicted_gib": predicted / 2**30,
        "measured_gib": measured / 2**30,
        "error": predicted / measured - 1,
        "allocated_before_gib": setup / 2**30 if setup else None,
        "static_predicted_gib": rows["static"] / 2**30,
        "phase": max(phases, key=lambda p: rows[phases[p]]),
    }


def bench_plan(name: str, args) -> list[dict]:
    cases = []
    for use_lora in [kind == "lora" for kind in args.plan_cases]:
        if _cuda(args):
            cases.append(plan_case(name, use_lora, args))
            _reset(args)
            continue
        flags = [
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--size",
            args.size,
            "--depth",
            args.depth or 0,
            "--steps",
            args.steps,
            "--group-size",
            args.group_size,
            "--prompts",
            args.prompts,
            "--fraction",
            args.fraction,
            "--lora-rank",
            args.lora_rank,
            "--micro-batch",
            args.micro_batch,
            "--text-length",
            args.text_length,
            "--plan-iterations",
            args.plan_iterations,
            *([] if args.checkpointing else ["--no-checkpointing"]),
        ]
        for method in args.plan_methods:
            case = f"{name}:{'lora' if use_lora else 'full'}:{method}"
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *map(str, flags), "--plan-case", case],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                cases.append({"lora": use_lora, "method": method, "error_text": out.stderr.strip().splitlines()[-1:]})
            else:
                cases.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return cases


# ---------------------------------------------------------------------------------------------- driver
def run_architecture(name: str, args) -> dict:
    out: dict = {}
    sections = [s for s in args.sections if s != "plan"]
    if sections:
        pipe, policy = build(name, args)
        if "sampling" in sections:
            out["sampling"] = bench_sampling(pipe, policy, args)
            print_sampling(name, out["sampling"])
        if "grpo" in sections:
            out["grpo"] = bench_grpo(name, pipe, policy, args)
            print_grpo(name, out["grpo"])
        if "algorithms" in sections:
            out["algorithms"] = bench_algorithms(policy, args)
            print_algorithms(name, out["algorithms"])
        del pipe, policy
        _reset(args)
    if "plan" in args.sections:
        out["plan"] = bench_plan(name, args)
        print_plan(name, out["plan"])
    return out


def _fmt(value, spec=".3f", none="-"):
    return none if value is None else format(value, spec)


def print_sampling(name, r):
    print(
        f"\n[{name}] sampling, batch {r['batch']}, {r['steps']} steps: stock {r['stock_s']:.3f} s, "
        f"visalign {r['visalign_s']:.3f} s, visalign/stock {r['ratio']:.3f}"
    )


def print_grpo(name, r):
    print(
        f"\n[{name}] GRPO: visalign {r['visalign_it_per_s']:.4f} it/s, baseline {r['baseline_it_per_s']:.4f} it/s, "
        f"ratio {r['ratio']:.2f}x; training {r['train_flops'] / 1e12:.1f} TFLOP at "
        f"{r['train_flops_per_s'] / 1e12:.2f} TFLOP/s, MFU {_fmt(r.get('mfu_training'), '.1%')}; rollout MFU "
        f"{_fmt(r.get('mfu_rollout'), '.1%')}; peak GiB {r.get('peak_gib')}"
    )


def print_algorithms(name, rows):
    print(f"\n[{name}] {'algorithm':20s} {'step s':>8s} {'peak GiB':>9s}")
    for algorithm, r in rows.items():
        print(f"[{name}] {algorithm:20s} {_fmt(r['step_s']):>8s} {_fmt(r['peak_gib'], '.2f'):>9s} {r.get('error', '')}")


def print_plan(name, cases):
    for c in cases:
        print(
            f"\n[{name}] plan vs measured, {'LoRA' if c.get('lora') else 'full FT'}, {c.get('method')}: predicted "
            f"{_fmt(c.get('predicted_gib'), '.2f')} GiB, measured {_fmt(c.get('measured_gib'), '.2f')} GiB, "
            f"error {_fmt(c.get('error'), '+.1%')} {c.get('skipped') or c.get('error_text') or ''}"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    p.add_argument(
        "--sections",
        nargs="+",
        default=["sampling", "grpo", "algorithms", "plan"],
        choices=["sampling", "grpo", "algorithms", "plan"],
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["bfloat16", "float32"])
    p.add_argument("--size", type=int, default=512, help="height = width (default: 512)")
    p.add_argument("--depth", type=int, default=0, help="denoiser blocks kept; 0 = the full model (default)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default: 10)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="prompts per GRPO iteration (default: 2)")
    p.add_argument("--fraction", type=float, default=0.6, help="share of SDE steps trained (default: 0.6)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=2, help="visalign's samples per forward/backward (default: 2)")
    p.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="gradient checkpointing off (default: on, in every loop)",
    )
    p.add_argument("--text-length", type=int, default=128, help="T5 tokens per prompt (default: 128)")
    p.add_argument("--sample-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed sampling repeats (default: 3)")
    p.add_argument("--iterations", type=int, default=3, help="GRPO iterations per loop, first a warm-up (default: 3)")
    p.add_argument("--algorithm-iterations", type=int, default=2)
    p.add_argument(
        "--plan-iterations",
        type=int,
        default=2,
        help="GRPO iterations measured per plan case "
        "(default: 2: from the second on, AdamW's moments exist throughout, as the plan assumes)",
    )
    p.add_argument(
        "--plan-methods",
        nargs="+",
        default=["allocator", "rss"],
        choices=["allocator", "rss"],
        help="CPU measurements, each in its own process (default: both)",
    )
    p.add_argument(
        "--plan-cases",
        nargs="+",
        default=["lora", "full"],
        choices=["lora", "full"],
        help="plan-vs-measured cases: a LoRA and a full fine-tuning GRPO iteration (default: both)",
    )
    p.add_argument("--json", default="gpu_results.json", help="where to write the results (default: gpu_results.json)")
    p.add_argument("--plan-case", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.depth = args.depth or None
    if args.plan_case:
        name, kind, method = args.plan_case.split(":")
        print(json.dumps(plan_case(name, kind == "lora", args, method)))
        return {}
    import diffusers
    import peft

    device = torch.cuda.get_device_name() if _cuda(args) else f"CPU ({os.cpu_count()} cores)"
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k != "plan_case"},
    }
    print(
        f"visalign GPU benchmarks on {device}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"{args.size}px, {args.dtype}, depth {args.depth or 'full'}, LoRA r{args.lora_rank}, {args.steps} steps"
    )
    start, results = time.perf_counter(), {}
    for name in args.architectures:  # the JSON is rewritten after each architecture: a cut-off run keeps its part
        results[name] = run_architecture(name, args)
        meta["seconds"] = time.perf_counter() - start
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2, default=str)
    print(f"\nwrote {args.json} ({meta['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
