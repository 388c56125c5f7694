"""The ``visalign`` command line.

    visalign demo                                   # the offline demo: GRPO on the toy world, with a report
    visalign train configs/toy_grpo.yaml max_steps=20 learning_rate=1e-3
    visalign sample toy:t2i -p "a red circle on the left" -p "a blue square on the right" --num 4 --out runs/sample
    visalign score runs/sample --reward toy_clip     # a folder of images/videos → rewards.csv
    visalign steer toy:t2i -p "a red circle on the left" --method fk --reward toy_clip --particles 8 --out runs/steer
    visalign steer toy:t2i -p "a red circle on the left" --method guidance --reward toy_clip --grad-scale 0.5
    accelerate launch -m visalign train configs/sd35m_grpo.yaml     # the same, on several GPUs

``MODEL`` is a hub id, a local pipeline folder, ``toy:NAME`` for a model shipped in the package
(``toy:t2i``, see visalign/toy/MODELS.md) or ``tiny:FAMILY`` for a tiny random pipeline from
:mod:`visalign.testing` (e.g. ``tiny:sd3``). A reward (``--reward``) is a type name such as
``CLIPScore``, ``PickScore``, ``toy_clip``, ``toy_evaluator`` or ``brightness``, or a JSON spec as
in a recipe's ``reward:`` (``'{"type": "CLIPScore", "model": "openai/clip-vit-large-patch14"}'``).
Every command also runs as ``python -m visalign``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STEER_METHODS = ("fk", "best-of-n", "guidance")
DEFAULT_PARTICLES = {"fk": 4, "best-of-n": 4, "guidance": 1}


def _load_policy(model: str, dtype: str | None = None, device: str | None = None, lora: str | None = None):
    import torch

    from visalign.recipes import load_policy

    policy = load_policy(model, dtype)
    if lora is not None:
        from visalign.errors import InvalidInputError

        if not os.path.exists(lora):
            raise InvalidInputError(f"--lora {lora} does not exist; pass a folder written by `visalign train` "
                                    "(OUTPUT_DIR/lora) or any diffusers LoRA.")
        policy.pipe.load_lora_weights(lora)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return policy.to(device)


def _fill_tiny_sizes(args) -> None:
    """``tiny:FAMILY`` models only run at their tiny sizes: use those where no size was given."""
    if args.model.startswith("tiny:"):
        from visalign.testing.pipelines import DEFAULT_SIZES

        for key, value in DEFAULT_SIZES.get(args.model.split(":", 1)[1], {}).items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)


def _build_reward(spec: str):
    from visalign.recipes import build_reward

    return build_reward(json.loads(spec) if spec.lstrip().startswith("{") else spec)


def _gather_prompts(args) -> list[str]:
    from visalign.errors import InvalidInputError

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from visalign.training.prompts import PromptSource

        prompts += PromptSource.from_any(args.prompts_file).prompts
    if not prompts:
        raise InvalidInputError("No prompts: pass -p PROMPT (repeatable) or --prompts-file FILE (.txt/.csv/.jsonl).")
    return prompts


def _save_media(images, prompts: list[str], out_dir: str) -> list[str]:
    """Writes one file per sample (PNG, or MP4 for videos) and ``prompts.csv`` naming each; returns the names.

    ``prompts.csv`` is what ``visalign score OUT_DIR`` reads, so any output folder can be re-scored.
    """
    import csv

    from PIL import Image

    from visalign.media import save_video, to_uint8

    os.makedirs(out_dir, exist_ok=True)
    if images.ndim == 5:
        names = [os.path.basename(save_video(video, os.path.join(out_dir, f"sample_{i:03d}.mp4")))
                 for i, video in enumerate(images)]
    else:
        names = []
        for i, array in enumerate(to_uint8(images)):
            names.append(f"sample_{i:03d}.png")
            Image.fromarray(array).save(os.path.join(out_dir, names[-1]))
    with open(os.path.join(out_dir, "prompts.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "prompt"])
        writer.writerows(zip(names, prompts))
    return names


def _save_outputs(images, prompts: list[str], out_dir: str, upscale: int = 1) -> tuple[list[str], list[str]]:
    """Per-sample files plus, for images, ``grid.png``.

    Returns:
        ``(names, paths)``: the per-sample file names, and the paths to report (the grid, or the videos).
    """
    from visalign.media import save_image_grid

    names = _save_media(images, prompts, out_dir)
    if images.ndim == 5:
        return names, [os.path.join(out_dir, n) for n in names]
    return names, [save_image_grid(images, os.path.join(out_dir, "grid.png"), upscale=upscale)]


def _generators(device, seed: int, count: int):
    import torch

    return [torch.Generator(device).manual_seed(seed + i) for i in range(count)]


def cmd_sample(args) -> int:
    import visalign as va

    prompts = _gather_prompts(args)
    _fill_tiny_sizes(args)
    policy = _load_policy(args.model, args.dtype, args.device, args.lora)
    generator = _generators(policy.device, args.seed, len(prompts) * args.num)
    start = time.perf_counter()
    traj = va.sample(policy, prompts, group_size=args.num, progress=True, **_sampling_kwargs(args, generator))
    seconds = time.perf_counter() - start
    _, paths = _save_outputs(traj.images, list(traj.prompts), args.out, upscale=args.upscale)
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump({"prompts": traj.prompts, "seconds": seconds, "sampler": args.sampler}, f, indent=2)
    print(f"Sampled {traj.batch_size} in {seconds:.2f} s; wrote {', '.join(paths)}")
    return 0


def cmd_steer(args) -> int:
    """Inference-time steering with a reward: FK particles, best-of-N or reward-gradient guidance."""
    import csv

    import torch

    import visalign as va

    prompts = _gather_prompts(args)
    reward = _build_reward(args.reward)
    _fill_tiny_sizes(args)
    policy = _load_policy(args.model, args.dtype, args.device, args.lora)
    n = args.particles if args.particles is not None else DEFAULT_PARTICLES[args.method]
    num_prompts = len(prompts)
    common = dict(_sampling_kwargs(args, _generators(policy.device, args.seed, num_prompts * n)),
                  max_batch_size=args.max_batch_size)
    options: dict = {"particles": n}
    start = time.perf_counter()
    if args.method == "fk":
        resample_every = args.resample_every or None
        options.update(potential=args.potential, lam=args.lam, resample_every=resample_every,
                       adaptive=args.adaptive, ess_threshold=args.ess_threshold, resampler=args.resampler)
        out = va.fk_steer(policy, prompts, reward, num_particles=n, potential=args.potential, lam=args.lam,
                          resample_every=resample_every, adaptive=args.adaptive, ess_threshold=args.ess_threshold,
                          resampler=args.resampler, return_particles=False, progress=True, **common)
        chosen, rewards, all_rewards = out.images, out.rewards, out.particle_rewards
        options.update(reward_steps=out.reward_steps, final_ess=[round(float(e), 4) for e in out.ess[:, -1]],
                       num_model_evals=out.num_model_evals, num_reward_evals=out.num_reward_evals)
    elif args.method == "best-of-n":
        out = va.best_of_n(policy, prompts, reward, n=n, return_all=False, **common)
        chosen, rewards, all_rewards = out.images, out.rewards, out.all_rewards
        options.update(num_model_evals=out.num_model_evals)
    else:
        steps = tuple(args.guidance_steps) if args.guidance_steps else None
        options.update(grad_scale=args.grad_scale, guidance_steps=steps, through_model=not args.detach_model,
                       normalize_grad=args.normalize_grad)
        out = va.reward_guidance(policy, prompts, reward, scale=args.grad_scale, guidance_steps=steps,
                                 num_samples=n, through_model=not args.detach_model,
                                 normalize_grad=args.normalize_grad, progress=True, **common)
        all_rewards = out.rewards.view(num_prompts, n)
        pick = torch.arange(num_prompts, device=all_rewards.device) * n + all_rewards.argmax(dim=1)
        chosen, rewards = out.images[pick.to(out.images.device)], out.rewards[pick]
        options.update(guided_steps=out.guided_steps)
    seconds = time.perf_counter() - start

    rewards = [float(r) for r in rewards]
    names, paths = _save_outputs(chosen, prompts, args.out, upscale=args.upscale)
    with open(os.path.join(args.out, "steer.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "prompt", "reward"])
        writer.writerows(zip(names, prompts, rewards))
    mean = sum(rewards) / len(rewards)
    record = {"model": args.model, "method": args.method, "reward": args.reward, "prompts": prompts,
              "files": names, "rewards": rewards, "all_rewards": all_rewards.float().cpu().tolist(),
              "mean_reward": mean, "seconds": seconds, "seed": args.seed, "num_steps": args.num_steps,
              "sampler": args.sampler, "guidance_scale": args.guidance_scale, **options}
    with open(os.path.join(args.out, "steer.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"Steered {num_prompts} prompt(s) with {args.method} ({n} per prompt, {args.num_steps} steps): "
          f"mean reward {mean:.4f} in {seconds:.2f} s; wrote {', '.join(paths)}, steer.json, steer.csv")
    return 0


def cmd_train(args) -> int:
    """Runs the recipe's algorithm; works the same under ``accelerate launch -m visalign train ...``."""
    from visalign.recipes import load_recipe

    trainer_class, policy, reward, prompts, config = load_recipe(args.recipe, args.overrides)
    trainer = trainer_class(policy, reward, prompts, config)
    trainer.train()
    if config.use_lora:
        trainer.save_lora(os.path.join(config.output_dir, "lora"))
    else:
        trainer.save_pretrained(os.path.join(config.output_dir, "model"))
    if trainer.is_main_process:
        print(f"Done: {config.output_dir} (metrics.jsonl, checkpoints/, {'lora/' if config.use_lora else 'model/'})")
    return 0


MEDIA_SUFFIXES = {".png": "image", ".jpg": "image", ".jpeg": "image", ".webp": "image",
                  ".mp4": "video", ".gif": "video", ".webm": "video"}


def _read_media(path: str):
    import numpy as np
    import torch
    from PIL import Image

    if MEDIA_SUFFIXES[os.path.splitext(path)[1].lower()] == "image":
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(array).permute(2, 0, 1)
    from visalign.errors import require

    imageio = require("imageio", "video", "Reading videos")
    frames = np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(path)]).astype(np.float32) / 255
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


def _prompts_for(folder: str, files: list[str], prompts_file: str | None) -> tuple[list[str], list[str], list[str]]:
    """Prompts by file name, from a CSV/JSONL with ``file`` and ``prompt`` columns, or a sample run's prompts.json.

    Returns:
        ``(files, prompts, skipped)``: the files to score with their prompts, and the files a prompts
        table does not name (e.g. the ``grid.png`` that ``sample`` and ``steer`` write beside their samples).
    """
    from visalign.errors import InvalidInputError
    from visalign.training.prompts import PromptSource

    if prompts_file is None:
        for name in ("prompts.csv", "prompts.jsonl", "prompts.json"):
            if os.path.exists(os.path.join(folder, name)):
                prompts_file = os.path.join(folder, name)
                break
    if prompts_file is None:
        raise InvalidInputError(f"No prompts for {folder}: pass --prompts FILE (CSV/JSONL with file and prompt columns).")
    if prompts_file.endswith(".json"):
        listed = json.load(open(prompts_file))["prompts"]
        return files, [listed[i % len(listed)] for i in range(len(files))], []
    by_file = {os.path.basename(str(r["file"])): r["prompt"] for r in PromptSource.from_any(prompts_file)}
    named = [f for f in files if f in by_file]
    if not named:
        raise InvalidInputError(f"{prompts_file} names none of the files in {folder} ({files[:5]}); its `file` "
                                "column must hold their names.")
    return named, [by_file[f] for f in named], [f for f in files if f not in by_file]


def cmd_score(args) -> int:
    """Scores every image or video in a folder against its prompt and writes a CSV."""
    import csv

    import torch

    from visalign.errors import InvalidInputError
    from visalign.rewards import call_reward

    if not os.path.isdir(args.folder):
        what = "is a file, not a folder" if os.path.exists(args.folder) else "does not exist"
        raise InvalidInputError(f"{args.folder} {what}; pass a folder of images or videos with their prompts, e.g. "
                                "the --out folder of `visalign sample` or `visalign steer`.")
    files = sorted(f for f in os.listdir(args.folder) if os.path.splitext(f)[1].lower() in MEDIA_SUFFIXES)
    if not files:
        raise InvalidInputError(f"{args.folder} holds no images or videos ({', '.join(MEDIA_SUFFIXES)}).")
    files, prompts, skipped = _prompts_for(args.folder, files, args.prompts)
    if skipped:
        print(f"Skipping {len(skipped)} file(s) with no prompt in the prompts table: {', '.join(skipped[:5])}")
    reward = _build_reward(args.reward)
    out_path = args.out or os.path.join(args.folder, "rewards.csv")
    rows = []
    for start in range(0, len(files), args.batch_size):
        names = files[start:start + args.batch_size]
        media = [_read_media(os.path.join(args.folder, n)) for n in names]
        shapes = {tuple(m.shape) for m in media}
        batches = [torch.stack(media)] if len(shapes) == 1 else [m.unsqueeze(0) for m in media]
        offset = 0
        for batch in batches:
            batch_prompts = prompts[start + offset:start + offset + batch.shape[0]]
            with torch.no_grad():
                result = call_reward(reward, batch, batch_prompts)
            for i in range(batch.shape[0]):
                row = {"file": names[offset + i], "prompt": batch_prompts[i], "reward": float(result.total[i])}
                row.update({f"reward/{k}": float(v[i]) for k, v in result.components.items()})
                rows.append(row)
            offset += batch.shape[0]
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mean = sum(r["reward"] for r in rows) / len(rows)
    print(f"Scored {len(rows)} files (mean reward {mean:.4f}); wrote {out_path}")
    return 0


def cmd_serve_reward(args) -> int:
    """Serves the reward SPEC names until interrupted (:func:`visalign.rewards.server.serve`)."""
    from visalign.errors import ConfigError
    from visalign.rewards.server import api_key_from_env, check_bind, load_reward, serve

    if args.max_body_mb <= 0:
        raise ConfigError(f"--max-body-mb must be positive; got {args.max_body_mb}.")
    api_key = api_key_from_env(args.api_key_env)
    if api_key is None and args.api_key_env != "VISALIGN_REWARD_API_KEY":
        raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty).")
    check_bind(args.host, api_key, args.api_key_env)  # before loading a model that may take minutes
    serve(load_reward(args.spec), args.host, args.port, api_key=api_key, api_key_env=args.api_key_env,
          max_body_bytes=int(args.max_body_mb * 2**20), device=args.device, log_level=args.log_level)
    return 0


def cmd_demo(args) -> int:
    """Runs the offline demo (:func:`visalign.demo.run_demo`) and prints where its report is."""
    from visalign.demo import run_demo

    path = run_demo(out_dir=args.out, seed=args.seed, max_steps=args.max_steps, eval_every=args.eval_every,
                    num_eval_prompts=args.eval_prompts)
    print(f"Report: {path}")
    return 0


def cmd_plan(args) -> int:
    """Prints a recipe's per-GPU memory and FLOPs (visalign.plan); loads no weights, downloads nothing."""
    from visalign.pipelines.attention import resolve_attention_backend
    from visalign.plan import format_plan, make_plan, workload_from_recipe

    backend = resolve_attention_backend(args.attention_backend)  # a flash-style kernel either way (see plan.py)
    workload = workload_from_recipe(args.recipe, args.overrides, architecture=args.architecture)
    strategies = (args.strategy,) if args.strategy else (("ddp", "fsdp") if args.gpus > 1 else ("ddp",))
    plan = make_plan(workload, gpus=args.gpus, strategies=strategies, accelerate_config=args.accelerate_config)
    print(format_plan(plan) + f"\nattention backend: {backend}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": vars(workload), "gpus": plan.gpus, "measured": plan.measured, "bytes": plan.rows,
                       "flops": plan.flops, "notes": plan.notes}, f, indent=2, default=str)
    return 0


MODEL_HELP = "hub id, local pipeline folder, toy:NAME (a shipped toy model, e.g. toy:t2i) or tiny:FAMILY"


def _cli_sampling_fields() -> list:
    """The :class:`~visalign.sampling.SamplingOptions` fields that are command-line flags (metadata ``cli``
    not False)."""
    import dataclasses

    from visalign.sampling import SamplingOptions

    return [f for f in dataclasses.fields(SamplingOptions) if f.metadata.get("cli", True) is not False]


def _flag_type(name: str, annotation) -> tuple[type, list | None]:
    """``(type, choices)`` of a flag from its field's annotation: int, float, str, bool, a Literal, or X | None."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _flag_type(name, kinds[0])
    if annotation in (int, float, str, bool):
        return annotation, None
    raise TypeError(f"SamplingOptions.{name} has type {annotation}, which has no command-line flag; give it "
                    "metadata={'cli': False}, or teach visalign.cli._flag_type the type.")


def _add_sampling_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """One flag per :class:`~visalign.sampling.SamplingOptions` field the CLI exposes, generated from its metadata.

    The flags are the field's ``metadata["flags"]``, else ``--`` + its name with dashes; the type and choices come
    from its annotation; the help is the field's help sentence with the default. The parsed value lands in
    ``args.<field name>``. ``defaults`` overrides a field's default for this command (``sampler="ode"``).
    """
    import typing

    from visalign.sampling import SamplingOptions

    fields = _cli_sampling_fields()
    unknown = set(defaults) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"no sampling flag for {sorted(unknown)}")
    hints, base = typing.get_type_hints(SamplingOptions), SamplingOptions()
    for field in fields:
        default = defaults.get(field.name, getattr(base, field.name))
        kind, choices = _flag_type(field.name, hints[field.name])
        flags = field.metadata.get("flags") or ("--" + field.name.replace("_", "-"),)
        text = f"{field.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
        else:
            metavar = None if choices else flags[0].lstrip("-").replace("-", "_").upper()
            parser.add_argument(*flags, dest=field.name, type=kind, choices=choices, default=default, help=text,
                                metavar=metavar)


def _sampling_kwargs(args, generator) -> dict:
    """The sampling keywords of ``va.sample`` and the steering functions, from the parsed flags."""
    return {**{f.name: getattr(args, f.name) for f in _cli_sampling_fields()}, "generator": generator,
            "height": args.height, "width": args.width, "num_frames": args.num_frames}


def _add_generation_options(parser: argparse.ArgumentParser, out_default: str, **sampling_defaults) -> None:
    """The model, prompt and sampling options that ``sample`` and ``steer`` share."""
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("-p", "--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", default=None,
                        help="more prompts from a .txt (one per line), .csv or .jsonl with a `prompt` column")
    _add_sampling_options(parser, **sampling_defaults)
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels (default: the family's; 32 for tiny: and toy: models)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels (default: the family's; 32 for tiny: and toy: models)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="video frames (video families; default: the family's, 5 for tiny:wan-*)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample row i uses seed+i (default: 0)")
    parser.add_argument("--dtype", default=None, help="torch dtype to load the model with, e.g. bfloat16 (default: fp32)")
    parser.add_argument("--device", default=None, help="device to run on, e.g. cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--lora", default=None,
                        help="LoRA folder to load into the model first (e.g. a training run's OUTPUT_DIR/lora)")
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscale of the PNG grid (default: 1)")
    parser.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visalign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the offline demo (GRPO on the toy world) and write its report",
                          description="Runs the offline demo on the shipped toy models and prints the report's path.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    demo.add_argument("--max-steps", type=int, default=None,
                      help="training iterations of the demo (default: the demo's own, sized for a few CPU minutes)")
    demo.add_argument("--eval-every", type=int, default=15,
                      help="measure the fixed evaluation prompts every N iterations, for the curves (default: 15)")
    demo.add_argument("--eval-prompts", type=int, default=48,
                      help="fixed evaluation prompts, one seed each (default: 48)")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train with a YAML recipe (the recipe's `algorithm:` picks the trainer)",
                           description="Train with a recipe. Any recipe or config key can be overridden as key=value, "
                                       "e.g. `visalign train configs/toy_grpo.yaml max_steps=10 model=tiny:sd3`. "
                                       "Runs the same under `accelerate launch -m visalign train ...`.")
    train.add_argument("recipe", help="path to a recipe YAML (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe and config fields")
    train.set_defaults(func=cmd_train)

    steer = sub.add_parser(
        "steer", help="steer sampling with a reward at inference time (FK particles, best-of-N, reward guidance)",
        description="Samples each prompt with inference-time steering and keeps the best sample per prompt. "
                    "Writes grid.png (or one MP4 per video), sample_NNN files with prompts.csv, and steer.json / "
                    "steer.csv with every prompt's reward. Example: visalign steer toy:t2i -p 'a red circle on "
                    "the left' --method fk --reward toy_clip --particles 8")
    _add_generation_options(steer, out_default="runs/steer", num_steps=20, sampler="sde")
    steer.add_argument("--method", default="fk", choices=list(STEER_METHODS),
                       help="fk: Feynman-Kac particle resampling; best-of-n: n independent samples, keep the best; "
                            "guidance: add the reward's gradient to each step (differentiable rewards) (default: fk)")
    steer.add_argument("--reward", required=True,
                       help="a reward type (e.g. CLIPScore, PickScore, toy_clip, toy_evaluator) or a JSON reward spec")
    steer.add_argument("--particles", "-n", type=int, default=None,
                       help="particles (fk) or candidates (best-of-n) per prompt; for guidance, samples per prompt "
                            "of which the best is kept (default: 4 for fk and best-of-n, 1 for guidance)")
    steer.add_argument("--max-batch-size", type=int, default=None,
                       help="the most samples per denoiser, decoder and reward call (default: all at once)")
    fk = steer.add_argument_group("fk options")
    fk.add_argument("--potential", default="max", choices=["max", "add", "diff", "rt"],
                    help="FK potential over the intermediate rewards (default: max)")
    fk.add_argument("--lam", "--lambda", dest="lam", type=float, default=10.0,
                    help="inverse temperature: the target is p(x)·exp(lam·reward) (default: 10)")
    fk.add_argument("--resample-every", type=int, default=5,
                    help="score x̂0 and resample after every k steps; 0 resamples only at the end (default: 5)")
    fk.add_argument("--adaptive", action="store_true",
                    help="resample only when the effective sample size drops below --ess-threshold")
    fk.add_argument("--ess-threshold", type=float, default=0.5,
                    help="adaptive threshold, as a fraction of the particles (default: 0.5)")
    fk.add_argument("--resampler", default="systematic", choices=["systematic", "multinomial"],
                    help="resampling scheme (default: systematic)")
    guide = steer.add_argument_group("guidance options")
    guide.add_argument("--grad-scale", type=float, default=1.0,
                       help="step size of the reward gradient added to each guided step's mean (default: 1.0)")
    guide.add_argument("--guidance-steps", type=int, nargs=2, metavar=("START", "END"), default=None,
                       help="guide only steps START <= i < END (default: every step)")
    guide.add_argument("--normalize-grad", action="store_true",
                       help="rescale each sample's gradient to unit RMS, so --grad-scale is the shift per step")
    guide.add_argument("--detach-model", action="store_true",
                       help="treat the denoiser's output as constant in the gradient (cheaper than DPS)")
    steer.set_defaults(func=cmd_steer)

    score = sub.add_parser("score", help="score a folder of images or videos against their prompts → CSV")
    score.add_argument("folder", help="folder of .png/.jpg/.webp images or .mp4/.gif/.webm videos")
    score.add_argument("--reward", required=True,
                       help="a reward type (e.g. CLIPScore, toy_clip, toy_evaluator) or a JSON reward spec")
    score.add_argument("--prompts", default=None,
                       help="CSV/JSONL with `file` and `prompt` columns; files it does not name are skipped "
                            "(default: FOLDER/prompts.csv|jsonl|json)")
    score.add_argument("--batch-size", type=int, default=16, help="files scored per batch (default: 16)")
    score.add_argument("--out", default=None, help="output CSV (default: FOLDER/rewards.csv)")
    score.set_defaults(func=cmd_score)

    sample = sub.add_parser("sample", help="sample images or videos from a model",
                            description="Samples each prompt --num times. Writes grid.png (or one MP4 per video), "
                                        "sample_NNN files with prompts.csv (so `visalign score` can read the "
                                        "folder) and prompts.json.")
    _add_generation_options(sample, out_default="runs/sample", num_steps=20, sampler="ode")
    sample.add_argument("--num", type=int, default=1, help="samples per prompt (default: 1)")
    sample.set_defaults(func=cmd_sample)

    serve = sub.add_parser(
        "serve-reward", help="serve a reward over HTTP for RemoteReward clients (extra: serve)",
        description="Serves a reward over HTTP (GET /health, POST /score; protocol in visalign.rewards.remote) so that "
                    "trainers in other processes, environments or machines score with va.rewards.RemoteReward(URL). "
                    "Binds 127.0.0.1 by default; any other address requires an API key in an environment variable. "
                    "Example: visalign serve-reward ocr --port 8765")
    serve.add_argument("spec", metavar="SPEC",
                       help="a reward name (brightness, ocr, CLIPScore, ...), a JSON spec as in a recipe's reward:, or "
                            "module:attr naming a reward object, a reward class or a factory returning a reward")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1); anything but loopback requires an API key")
    serve.add_argument("--port", type=int, default=8765, help="port to bind; 0 picks a free one (default: 8765)")
    serve.add_argument("--api-key-env", default="VISALIGN_REWARD_API_KEY", metavar="NAME",
                       help="environment variable holding the API key clients must send; when it is set, every "
                            "request needs it (default: VISALIGN_REWARD_API_KEY)")
    serve.add_argument("--max-body-mb", type=float, default=256.0,
                       help="largest request accepted, in MiB; larger ones get 413 unread (default: 256)")
    serve.add_argument("--device", default=None,
                       help="device the reward runs on (default: cuda if available, else cpu)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="server log level; debug also logs every request (default: info)")
    serve.set_defaults(func=cmd_serve_reward)

    plan = sub.add_parser(
        "plan", help="per-GPU memory and FLOPs of a recipe before a run (loads no weights, downloads nothing)",
        description="Builds the recipe's real architecture on the meta device and prints, per GPU, the weights, "
                    "trainable parameters, gradients, AdamW state, EMA/reference copies, the activations of one "
                    "training micro-batch with and without gradient checkpointing, the rollout's memory and the "
                    "FLOPs per iteration, under DDP and FSDP. Example: visalign plan configs/sd35m_grpo.yaml --gpus 8")
    plan.add_argument("recipe", help="path to a recipe YAML whose model: is a known hub id (or with architecture:)")
    plan.add_argument("overrides", nargs="*", help="key=value overrides of recipe and config fields")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs the run will use (default: 1)")
    plan.add_argument("--strategy", choices=["ddp", "fsdp"], default=None,
                      help="only this strategy (default: DDP, and FSDP too when --gpus > 1)")
    plan.add_argument("--architecture", default=None,
                      help="architecture name when model: is not a known hub id (e.g. a fine-tune of one): "
                           "sd35-medium, flux1-dev, wan21-t2v-1.3b, wan21-t2v-14b")
    plan.add_argument("--accelerate-config", default=None,
                      help="the accelerate config the run will use; its FSDP settings are checked (wrapped classes, "
                           "fsdp_version)")
    plan.add_argument("--attention-backend", default=None, choices=["sdpa", "native", "xformers", "flash", "sage"],
                      help="attention kernel of the run (default: sdpa); all are flash-style, which the plan assumes")
    plan.add_argument("--json", default=None, help="also write the plan to this JSON file")
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a visalign error (bad input or config) prints its message and returns 1.

    Set ``VISALIGN_TRACEBACK=1`` to see the full traceback of such errors instead.
    """
    from visalign.errors import VisalignError

    from visalign.quiet import quiet_library_notices

    args = build_parser().parse_args(argv)
    quiet_library_notices()
    try:
        return args.func(args)
    except VisalignError as error:
        if os.environ.get("VISALIGN_TRACEBACK"):
            raise
        print(f"visalign {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
