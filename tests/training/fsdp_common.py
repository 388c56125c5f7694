"""The FSDP test run, shared by tests/training/test_fsdp.py and the script it launches (fsdp_draft_script.py).

Full fine-tuning of tiny SD3 with DRaFT (ODE sampler, no CFG): every random draw of a sample comes
from its per-sample generator, so one process can replay exactly the samples that two ranks draw.
"""

from types import SimpleNamespace

import torch

import visalign as va
from visalign.testing import brightness
from visalign.training.trainer import Trainer

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "an orange square"]
PER_RANK = 2  # prompts per rank per iteration


def config(output_dir, prompts_per_step: int = PER_RANK, **overrides) -> va.DRaFTConfig:
    base = dict(
        output_dir=str(output_dir),
        max_steps=2,
        num_steps=3,
        prompts_per_step=prompts_per_step,
        height=32,
        width=32,
        guidance_scale=1.0,
        use_lora=False,
        learning_rate=1e-3,
        ema_decay=0.9,
        checkpoint_every=1,
        keep_last=5,
        trackers=[],
    )
    return va.DRaFTConfig(**{**base, **overrides})


def trainer(pipe, output_dir, **overrides) -> va.DRaFTTrainer:
    """The FSDP run's trainer (one rank's share of each iteration)."""
    return va.DRaFTTrainer(pipe, brightness, PROMPTS, config(output_dir, **overrides))


class TwoRanksInOneProcess(va.DRaFTTrainer):
    """One process that trains on what ranks 0 and 1 of a 2-process run draw, as one batch.

    The prompt sampler already gives one process with twice the batch the union of both ranks'
    prompts, in rank order; the noise is per sample, seeded by (seed, rank, step, index): this
    hands out rank 0's generators for the first half of the batch and rank 1's for the second.
    """

    def generators(self, step: int, count: int, stream: int = 1) -> list[torch.Generator]:
        half = count // 2
        return [
            torch.Generator(self.accelerator.device).manual_seed(self.seed_of_rank(rank, step, stream * 100_003 + i))
            for rank in (0, 1)
            for i in range(half)
        ]

    def seed_of_rank(self, rank: int, step: int, stream: int) -> int:
        # Trainer.step_seed itself, as it runs on rank `rank`.
        as_rank = SimpleNamespace(config=self.config, accelerator=SimpleNamespace(process_index=rank))
        return Trainer.step_seed(as_rank, step, stream)


def one_process_union(pipe, output_dir) -> TwoRanksInOneProcess:
    return TwoRanksInOneProcess(pipe, brightness, PROMPTS, config(output_dir, prompts_per_step=2 * PER_RANK))
