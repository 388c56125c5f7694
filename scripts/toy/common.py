"""What both toy training scripts share: the CLI options, logging, the LR schedule, the optimizer
step, the EMA of the saved weights and the end of a denoiser's training step.

``train_t2i.py`` and ``train_video.py`` import this module by name (their folder is on
``sys.path`` when they run); neither imports the other.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def add_common_args(q, steps: int, batch: int, lr: float) -> None:
    """The options every training subcommand takes, with that subcommand's defaults."""
    q.add_argument("--out", required=True, help="output folder (created)")
    q.add_argument("--seed", type=int, default=0, help="seeds weights, data and noise")
    q.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    q.add_argument("--batch-size", type=int, default=batch, help="samples per step")
    q.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (see scripts/toy/README.md)")
    q.add_argument("--log-every", type=int, default=50, help="steps between log lines")


def setup(args) -> None:
    """Sets the thread count and quiets diffusers (before any subcommand runs)."""
    torch.set_num_threads(args.threads)
    # With a short text length the stock pipelines warn on every call that the zero text rows
    # were truncated; that is intended here, so keep the logs readable.
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def log_line(msg: str, log_file: Path | None = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(line + "\n")


def lr_factor(step: int, warmup: int, total: int | None = None) -> float:
    """Linear warm-up, then constant (``total=None``) or cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_step(loss: torch.Tensor, opt, sched, params) -> None:
    """One update of every toy model: backward, clip the gradient norm to 1, step the optimizer and the LR schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


class EMA:
    """An exponential moving average of a set of parameters (kept in fp32 on the CPU)."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        # The usual warm-up of the decay, so early averages are not dominated by the random init.
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the live weights and the averages (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def finish_step(
    step: int, loss: torch.Tensor, args, opt, sched, params, ema: EMA, *, out: Path, start: float, log: Path, save
) -> None:
    """The shared end of a denoiser's training step: the update, the EMA, the progress line, and
    ``save(target)`` with the EMA weights swapped in every ``--save-every`` steps (into
    ``out/checkpoints``) and at the end (into ``out``)."""
    optimizer_step(loss, opt, sched, params)
    ema.update(step)
    done = step + 1
    if step % args.log_every == 0 or done == args.steps:
        log_line(f"step {done} loss {loss.item():.4f} ({time.time() - start:.0f}s)", log)
    if (args.save_every and done % args.save_every == 0) or done == args.steps:
        target = out if done == args.steps else out / "checkpoints" / f"step-{done:05d}"
        ema.swap()
        try:
            save(target)
        finally:
            ema.swap()
        log_line(f"saved EMA weights of step {done} to {target}", log)


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def weights_size_mb(out: Path) -> float:
    """Size of a trained folder without its intermediate checkpoints."""
    checkpoints = out / "checkpoints"
    return folder_size_mb(out) - (folder_size_mb(checkpoints) if checkpoints.exists() else 0.0)


def write_info(out: Path, info: dict) -> None:
    with open(out / "training_info.json", "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
