"""LoRA on a policy's denoiser(s): attach, remove, disable for the reference pass, export in the
format the pipeline's ``load_lora_weights`` reads, and load back (every expert of a two-expert family).

:class:`~visalign.pipelines.base.Policy` inherits these methods; they use its ``trainable_denoisers()``,
``denoiser_name`` and ``default_lora_targets``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import ClassVar

import torch

from visalign.errors import ConfigError

__all__ = ["LoRAMethods"]


class LoRAMethods:
    """The LoRA methods of :class:`~visalign.pipelines.base.Policy` (mixed into it)."""

    def add_lora(
        self,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
        init_lora_weights=True,
    ) -> None:
        """Attaches a peft LoRA adapter to every trainable denoiser; only its weights stay trainable.

        Args:
            rank: the LoRA rank r.
            alpha: the LoRA alpha (scale alpha/r); defaults to ``rank``.
            target_modules: module names to adapt; defaults to the family's attention projections.
            dropout: LoRA dropout.
            adapter_name: the peft adapter name.
            init_lora_weights: peft's init (True: B = 0, so the policy starts equal to the base).
        """
        from peft import LoraConfig

        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}.")
        config = LoraConfig(
            r=rank,
            lora_alpha=rank if alpha is None else alpha,
            target_modules=list(target_modules or self.default_lora_targets),
            lora_dropout=dropout,
            init_lora_weights=init_lora_weights,
        )
        if any(adapter_name in (getattr(d, "peft_config", None) or {}) for d in self.trainable_denoisers().values()):
            # E.g. a notebook cell that builds a trainer run twice on the same policy.
            import warnings

            self.remove_lora(adapter_name)
            warnings.warn(
                f"The policy already had a LoRA adapter {adapter_name!r}; it was replaced by a fresh one "
                f"(the previous adapter's trained weights are gone from this policy). To keep training the "
                f"previous adapter, keep using the trainer that created it (trainer.train() again, or "
                f"resume='latest' from its output_dir), or save it first with policy.save_lora(folder); "
                f"to start over without this warning, call policy.remove_lora() before building a new trainer "
                f"or load a fresh policy.",
                UserWarning,
                stacklevel=2,
            )
        for denoiser in self.trainable_denoisers().values():
            denoiser.requires_grad_(False)
            denoiser.add_adapter(config, adapter_name=adapter_name)
            denoiser.set_adapter(adapter_name)

    def remove_lora(self, adapter_name: str = "default") -> None:
        """Removes a LoRA adapter from the denoisers; without adapters they are the base model again.

        The last adapter is unloaded entirely (the original layers are restored); with several,
        only ``adapter_name`` is deleted and the remaining ones stay active.
        """
        holders = {
            n: d
            for n, d in self.trainable_denoisers().items()
            if adapter_name in (getattr(d, "peft_config", None) or {})
        }
        if not holders:
            names = sorted(
                {name for d in self.trainable_denoisers().values() for name in (getattr(d, "peft_config", None) or {})}
            )
            raise ConfigError(
                f"remove_lora({adapter_name!r}): the policy has no adapter of that name "
                f"(adapters: {names or 'none'}). Call policy.add_lora() to attach one."
            )
        for denoiser in holders.values():
            names = list(denoiser.peft_config)
            if names == [adapter_name]:
                denoiser.unload_lora()
            else:
                denoiser.delete_adapters(adapter_name)
                denoiser.set_adapter([n for n in names if n != adapter_name])

    @property
    def has_lora(self) -> bool:
        return any(getattr(d, "peft_config", None) for d in self.trainable_denoisers().values())

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Within this block the denoisers run as the base model (the LoRA reference policy)."""
        if not self.has_lora:
            raise ConfigError(
                "adapters_disabled() needs a LoRA adapter; call policy.add_lora() first, or keep a "
                "frozen copy of the model as the reference for full fine-tuning."
            )
        adapted = [d for d in self.trainable_denoisers().values() if getattr(d, "peft_config", None)]
        for denoiser in adapted:
            denoiser.disable_adapters()
        try:
            yield
        finally:
            for denoiser in adapted:
                denoiser.enable_adapters()

    def lora_state_dict(self, adapter_name: str = "default", denoiser: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights of one denoiser (default: :attr:`denoiser_name`).

        The keys are those the pipeline's ``save_lora_weights`` expects.
        """
        from peft.utils import get_peft_model_state_dict

        module = self.trainable_denoisers()[denoiser or self.denoiser_name]
        return get_peft_model_state_dict(module, adapter_name=adapter_name)

    def _require_lora_on_every_denoiser(self, adapter_name: str, action: str) -> None:
        """A clear error when some trainable denoiser lacks the adapter (e.g. a LoRA for one expert only)."""
        if not self.has_lora:
            raise ConfigError(f"{action} needs a LoRA adapter; call policy.add_lora() first.")
        missing = [
            n
            for n, d in self.trainable_denoisers().items()
            if adapter_name not in (getattr(d, "peft_config", None) or {})
        ]
        if missing:
            have = [n for n in self.trainable_denoisers() if n not in missing]
            raise ConfigError(
                f"{action}: {self.family} trains {', '.join(self.trainable_denoisers())}, but only "
                f"{', '.join(have)} has a LoRA adapter {adapter_name!r} ({', '.join(missing)} has none), so the "
                f"export would give one LoRA for a single {self._denoiser_kind} where all are needed. Attach the "
                f"adapter to every one with policy.add_lora(...) (or load a LoRA for each with policy.load_lora)."
            )

    _denoiser_kind: ClassVar[str] = "denoiser"

    def save_lora(self, save_directory: str, adapter_name: str = "default") -> None:
        """Saves the LoRA in diffusers format; ``pipe.load_lora_weights(save_directory)`` reads it.

        The adapter config (rank, alpha, targets) goes into the file's metadata, so that the loaded
        LoRA has the trained scale even when alpha ≠ rank. Families with several denoisers write one
        file per denoiser (see their adapter's docstring for the lines that load them);
        :meth:`load_lora` loads whatever this writes.
        """
        self._require_lora_on_every_denoiser(adapter_name, "save_lora()")
        for name, denoiser in self.trainable_denoisers().items():
            state = {k: v.detach().cpu().contiguous() for k, v in self.lora_state_dict(adapter_name, name).items()}
            self._write_lora(save_directory, name, state, denoiser.peft_config[adapter_name].to_dict())

    def _write_lora(self, save_directory: str, name: str, state: dict, metadata: dict) -> None:
        """Writes one denoiser's LoRA: the pipeline's ``save_lora_weights`` under ``{name}_lora_layers``."""
        type(self.pipe).save_lora_weights(
            save_directory,
            **{f"{name}_lora_layers": state, f"{name}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )

    def load_lora(self, path: str, adapter_name: str | None = None) -> None:
        """Loads a LoRA written by :meth:`save_lora` (or any diffusers LoRA) into the pipeline.

        ``pipe.load_lora_weights(path)`` for most families; the families with several denoisers or
        without a pipeline LoRA loader override it (Wan 2.2 loads both experts, HunyuanVideo 1.5
        loads through its transformer). Loaded adapters are for sampling: to train further, keep the
        trainer that made them.
        """
        self.pipe.load_lora_weights(path, adapter_name=adapter_name)
