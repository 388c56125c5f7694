"""Run outputs: metrics to a JSONL file and accelerate trackers, and sample media with rewards.

Everything here runs on the main process only; other processes call it and return at once.
"""

from __future__ import annotations

import json
import math
import os

import torch

from visalign.media import save_image_grid, save_video


class RunLogger:
    """Writes ``metrics.jsonl`` and forwards the same numbers to ``accelerator.log``.

    Args:
        accelerator: the run's ``Accelerator`` (its trackers were initialised with the config).
        output_dir: the run folder.
        use_jsonl: write ``<output_dir>/metrics.jsonl`` (one JSON object per logged step).
    """

    def __init__(self, accelerator, output_dir: str, use_jsonl: bool = True):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl") if use_jsonl else None

    def log(self, metrics: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()}
        clean = {k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v))}
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, float)}, step=step)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")

    def save_samples(
        self, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor, step: int, tag: str = "samples"
    ) -> str | None:
        """Saves a PNG grid (images) or MP4s (videos) with a JSON of prompts and rewards."""
        if not self.accelerator.is_main_process:
            return None
        folder = os.path.join(self.output_dir, tag)
        stem = os.path.join(folder, f"step-{step:06d}")
        if images.ndim == 5:
            paths = [save_video(video, f"{stem}-{i}.mp4") for i, video in enumerate(images)]
        else:
            paths = [save_image_grid(images, f"{stem}.png", upscale=max(1, 128 // images.shape[-1]))]
        with open(f"{stem}.json", "w") as f:
            json.dump(
                {
                    "step": step,
                    "files": [os.path.basename(p) for p in paths],
                    "samples": [{"prompt": p, "reward": float(r)} for p, r in zip(prompts, rewards)],
                },
                f,
                indent=2,
            )
        return paths[0]
