"""What several commands share: loading a model or a reward from a command-line spec, gathering prompts,
and writing or reading a folder of images and videos with its ``prompts.csv``.
"""

from __future__ import annotations

import json
import os


def load_policy_for_cli(
    model: str,
    dtype: str | None = None,
    device: str | None = None,
    lora: str | None = None,
    attention_backend: str | None = None,
):
    """The policy a ``sample`` or ``steer`` run uses: loaded, with its LoRA and attention backend, on ``device``.

    Args:
        model: a hub id, a local pipeline folder, ``toy:NAME`` or ``tiny:FAMILY``.
        dtype: a torch dtype name to load with (None: the checkpoint's, fp32 for tiny/toy).
        device: where to run (None: cuda if available, else cpu).
        lora: a LoRA folder to load into the model first.
        attention_backend: ``--attention-backend`` (None: leave the stock kernel).

    Raises:
        MissingDependencyError: the backend's package is not installed (before anything is loaded).
        ConfigError: a backend the model's attention cannot use (flash/sage on a UNet).
    """
    import torch

    from visalign.pipelines.attention import apply_attention_backend, check_attention_backend
    from visalign.recipes import load_policy

    if attention_backend is not None:
        check_attention_backend(attention_backend)  # a missing package fails before a large model loads
    policy = load_policy(model, dtype)
    if attention_backend is not None:
        apply_attention_backend(policy, attention_backend)  # what the trainer's attention_backend does
    if lora is not None:
        from visalign.errors import InvalidInputError

        if not os.path.exists(lora):
            raise InvalidInputError(
                f"--lora {lora} does not exist; pass a folder written by `visalign train` "
                "(OUTPUT_DIR/lora) or any diffusers LoRA."
            )
        policy.load_lora(lora)  # every expert's file, in the format the family exports
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return policy.to(device)


def fill_tiny_sizes(args) -> None:
    """``tiny:FAMILY`` models only run at their tiny sizes: use those where no size was given."""
    if args.model.startswith("tiny:"):
        from visalign.testing.pipelines import DEFAULT_SIZES

        for key, value in DEFAULT_SIZES.get(args.model.split(":", 1)[1], {}).items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)


def reward_from_spec(spec: str):
    from visalign.recipes import build_reward

    return build_reward(json.loads(spec) if spec.lstrip().startswith("{") else spec)


def gather_prompts(args) -> list[str]:
    from visalign.errors import InvalidInputError

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from visalign.training.prompts import PromptSource

        prompts += PromptSource.from_any(args.prompts_file).prompts
    if not prompts:
        raise InvalidInputError("No prompts: pass -p PROMPT (repeatable) or --prompts-file FILE (.txt/.csv/.jsonl).")
    return prompts


def save_media(images, prompts: list[str], out_dir: str) -> list[str]:
    """Writes one file per sample (PNG, or MP4 for videos) and ``prompts.csv`` naming each; returns the names.

    ``prompts.csv`` is what ``visalign score OUT_DIR`` reads, so any output folder can be re-scored.
    """
    import csv

    from PIL import Image

    from visalign.media import save_video, to_uint8

    os.makedirs(out_dir, exist_ok=True)
    if images.ndim == 5:
        names = [
            os.path.basename(save_video(video, os.path.join(out_dir, f"sample_{i:03d}.mp4")))
            for i, video in enumerate(images)
        ]
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


def save_outputs(images, prompts: list[str], out_dir: str, upscale: int = 1) -> tuple[list[str], list[str]]:
    """Per-sample files plus, for images, ``grid.png``.

    Returns:
        ``(names, paths)``: the per-sample file names, and the paths to report (the grid, or the videos).
    """
    from visalign.media import save_image_grid

    names = save_media(images, prompts, out_dir)
    if images.ndim == 5:
        return names, [os.path.join(out_dir, n) for n in names]
    return names, [save_image_grid(images, os.path.join(out_dir, "grid.png"), upscale=upscale)]


def seeded_generators(device, seed: int, count: int):
    import torch

    return [torch.Generator(device).manual_seed(seed + i) for i in range(count)]


MEDIA_SUFFIXES = {
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".webp": "image",
    ".mp4": "video",
    ".gif": "video",
    ".webm": "video",
}


def read_media(path: str):
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


def prompts_for(folder: str, files: list[str], prompts_file: str | None) -> tuple[list[str], list[str], list[str]]:
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
        raise InvalidInputError(
            f"No prompts for {folder}: pass --prompts FILE (CSV/JSONL with file and prompt columns)."
        )
    if prompts_file.endswith(".json"):
        listed = json.load(open(prompts_file))["prompts"]
        return files, [listed[i % len(listed)] for i in range(len(files))], []
    by_file = {os.path.basename(str(r["file"])): r["prompt"] for r in PromptSource.from_any(prompts_file)}
    named = [f for f in files if f in by_file]
    if not named:
        raise InvalidInputError(
            f"{prompts_file} names none of the files in {folder} ({files[:5]}); its `file` "
            "column must hold their names."
        )
    return named, [by_file[f] for f in named], [f for f in files if f not in by_file]
