"""The ``visalign`` command line.

    visalign demo                                   # the offline demo (see README)
    visalign train configs/toy_grpo.yaml max_steps=20 learning_rate=1e-3
    visalign sample MODEL -p "a red circle" -p "a blue square" --steps 20 --out runs/sample
    visalign score runs/sample --reward toy_clip     # a folder of images/videos → rewards.csv

``MODEL`` is a hub id, a local pipeline folder, or ``tiny:FAMILY`` for a tiny random pipeline from
:mod:`visalign.testing` (e.g. ``tiny:sd3``). Every command also runs as ``python -m visalign``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _load_policy(model: str, dtype: str | None = None):
    from visalign.recipes import load_policy

    return load_policy(model, dtype)


def _save_outputs(traj, out_dir: str, upscale: int = 1) -> list[str]:
    from visalign.media import save_image_grid, save_video

    os.makedirs(out_dir, exist_ok=True)
    if traj.images.ndim == 5:
        return [save_video(video, os.path.join(out_dir, f"sample_{i:03d}.mp4")) for i, video in enumerate(traj.images)]
    return [save_image_grid(traj.images, os.path.join(out_dir, "grid.png"), upscale=upscale)]


def cmd_sample(args) -> int:
    import torch

    import visalign as va

    policy = _load_policy(args.model, args.dtype)
    generator = [torch.Generator(policy.device).manual_seed(args.seed + i) for i in range(len(args.prompt) * args.num)]
    start = time.perf_counter()
    traj = va.sample(policy, args.prompt, num_steps=args.steps, guidance_scale=args.guidance_scale,
                     sampler=args.sampler, eta=args.eta, group_size=args.num, generator=generator,
                     height=args.height, width=args.width, num_frames=args.num_frames, progress=True)
    seconds = time.perf_counter() - start
    paths = _save_outputs(traj, args.out, upscale=args.upscale)
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump({"prompts": traj.prompts, "seconds": seconds, "sampler": args.sampler}, f, indent=2)
    print(f"Sampled {traj.batch_size} in {seconds:.2f} s; wrote {', '.join(paths)}")
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


def _prompts_for(folder: str, files: list[str], prompts_file: str | None) -> list[str]:
    """Prompts by file name, from a CSV/JSONL with ``file`` and ``prompt`` columns, or a sample run's prompts.json."""
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
        return [listed[i % len(listed)] for i in range(len(files))]
    by_file = {os.path.basename(str(r["file"])): r["prompt"] for r in PromptSource.from_any(prompts_file)}
    missing = [f for f in files if f not in by_file]
    if missing:
        raise InvalidInputError(f"{prompts_file} has no prompt for {missing[:5]}; add rows with those file names.")
    return [by_file[f] for f in files]


def cmd_score(args) -> int:
    """Scores every image or video in a folder against its prompt and writes a CSV."""
    import csv

    import torch

    from visalign.errors import InvalidInputError
    from visalign.recipes import build_reward
    from visalign.rewards import Combined, call_reward

    files = sorted(f for f in os.listdir(args.folder) if os.path.splitext(f)[1].lower() in MEDIA_SUFFIXES)
    if not files:
        raise InvalidInputError(f"{args.folder} holds no images or videos ({', '.join(MEDIA_SUFFIXES)}).")
    prompts = _prompts_for(args.folder, files, args.prompts)
    reward = build_reward(json.loads(args.reward) if args.reward.startswith("{") else args.reward)
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
                total = call_reward(reward, batch, batch_prompts)
            parts = reward.last_output.components if isinstance(reward, Combined) else {}
            for i in range(batch.shape[0]):
                row = {"file": names[offset + i], "prompt": batch_prompts[i], "reward": float(total[i])}
                row.update({f"reward/{k}": float(v[i]) for k, v in parts.items()})
                rows.append(row)
            offset += batch.shape[0]
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mean = sum(r["reward"] for r in rows) / len(rows)
    print(f"Scored {len(rows)} files (mean reward {mean:.4f}); wrote {out_path}")
    return 0


def cmd_demo(args) -> int:
    """Samples a tiny random SD3-style pipeline and writes a PNG grid (offline, seconds)."""
    args.model, args.prompt = "tiny:sd3", ["a red circle on the left", "a blue square on the right"]
    args.steps, args.guidance_scale, args.sampler, args.eta, args.num = 8, 4.0, "sde", None, 4
    args.height = args.width = 32
    args.num_frames, args.dtype, args.upscale = None, None, 4
    return cmd_sample(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visalign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the offline demo and write its outputs")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train with a YAML recipe (the recipe's `algorithm:` picks the trainer)",
                           description="Train with a recipe. Any recipe or config key can be overridden as key=value, "
                                       "e.g. `visalign train configs/toy_grpo.yaml max_steps=10 model=tiny:sd3`.")
    train.add_argument("recipe", help="path to a recipe YAML (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe and config fields")
    train.set_defaults(func=cmd_train)

    score = sub.add_parser("score", help="score a folder of images or videos against their prompts → CSV")
    score.add_argument("folder", help="folder of .png/.jpg/.webp images or .mp4/.gif videos")
    score.add_argument("--reward", required=True,
                       help="a reward type (e.g. CLIPScore, toy_clip, toy_evaluator) or a JSON reward spec")
    score.add_argument("--prompts", default=None,
                       help="CSV/JSONL with `file` and `prompt` columns (default: FOLDER/prompts.csv|jsonl|json)")
    score.add_argument("--batch-size", type=int, default=16, help="files scored per batch (default: 16)")
    score.add_argument("--out", default=None, help="output CSV (default: FOLDER/rewards.csv)")
    score.set_defaults(func=cmd_score)

    sample = sub.add_parser("sample", help="sample images or videos from a model")
    sample.add_argument("model", help="hub id, local pipeline folder, or tiny:FAMILY")
    sample.add_argument("-p", "--prompt", action="append", required=True, help="a prompt (repeatable)")
    sample.add_argument("--num", type=int, default=1, help="samples per prompt (default: 1)")
    sample.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    sample.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the family's)")
    sample.add_argument("--sampler", default="ode", choices=["ode", "sde", "cps", "ddim"], help="sampler (default: ode)")
    sample.add_argument("--eta", type=float, default=None, help="noise level of stochastic samplers")
    sample.add_argument("--height", type=int, default=None, help="image height (default: the family's)")
    sample.add_argument("--width", type=int, default=None, help="image width (default: the family's)")
    sample.add_argument("--num-frames", type=int, default=None, help="video frames (video families)")
    sample.add_argument("--dtype", default=None, help="torch dtype to load with, e.g. bfloat16")
    sample.add_argument("--seed", type=int, default=0, help="base seed; sample i uses seed+i (default: 0)")
    sample.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscale of the PNG grid")
    sample.add_argument("--out", default="runs/sample", help="output folder (default: runs/sample)")
    sample.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
