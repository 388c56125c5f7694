"""The trainer's exports: the trained weights as diffusers reads them, with the EMA swapped in if asked.

A mixin of :class:`~visalign.training.trainer.Trainer` (it uses the trainer's ``accelerator``,
``policy``, ``ema`` and ``trainable_parameters``). Under FSDP every rank takes part in gathering the
sharded weights and the main process writes them.
"""

from __future__ import annotations

import contextlib

__all__ = ["Exports"]


class Exports:
    """:meth:`save_lora`, :meth:`save_pretrained` and :meth:`ema_weights` of a trainer."""

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swaps in the EMA weights (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable_parameters)
        self.ema.copy_to(self.trainable_parameters)
        try:
            yield
        finally:
            self.ema.restore(self.trainable_parameters)

    def save_lora(self, save_directory: str, use_ema: bool = True) -> None:
        """Saves the LoRA in diffusers format: ``pipe.load_lora_weights(save_directory)`` loads it.

        Every trained network is exported (both Wan 2.2 experts: the second as
        ``pytorch_lora_weights_transformer_2.safetensors``); ``policy.load_lora(save_directory)`` loads any family's export.
        """
        self.accelerator.wait_for_everyone()
        with self._export_policy(use_ema) as policy:
            if policy is not None:
                policy.save_lora(save_directory)
        self.accelerator.wait_for_everyone()

    def save_pretrained(self, save_directory: str, use_ema: bool = True) -> None:
        """Saves the whole pipeline with the trained denoiser (LoRA fused when there is one)."""
        self.accelerator.wait_for_everyone()
        with self._export_policy(use_ema) as policy:
            if policy is not None:
                policy.merged_pipeline().save_pretrained(save_directory)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _export_policy(self, use_ema: bool):
        """The policy to export from on the main process (None on the others), EMA weights in if asked.

        Under FSDP the denoiser's weights are shards on every rank: all ranks swap in their EMA shard
        and take part in gathering an unsharded copy (:func:`~visalign.training.fsdp.gathered_policy`).
        """
        if self.accelerator.is_fsdp2:
            from visalign.training.fsdp import gathered_policy

            with self.ema_weights() if use_ema else contextlib.nullcontext():
                policy = gathered_policy(self.accelerator, self.policy)
            yield policy
        elif self.is_main_process:
            with self.ema_weights() if use_ema else contextlib.nullcontext():
                yield self.policy
        else:
            yield None
