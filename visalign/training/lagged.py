"""A lagged copy of the trainable weights, swapped in place for a pass: old policies, EMA anchors, snapshots.

DiffusionNFT samples from and regresses against an *old* policy θ_old ← d·θ_old + (1−d)·θ, AWM
anchors the policy to an EMA of itself, and online DPO compares against a snapshot refreshed every K
iterations. Each is a copy of the **trainable** weights only: for LoRA the adapter tensors (the
frozen base is shared, never copied), for full fine-tuning the denoiser's weights.

A pass under :meth:`LaggedWeights.swapped` copies the lagged tensors into the live parameters under
no_grad and copies the live values back afterwards. Run it *before* the policy's own forward in a
step, so that autograd never sees a weight that changed under it::

    old = LaggedWeights(trainer.trainable_parameters)     # a copy of θ now
    with old.swapped():
        v_old = policy.predict(x, t, cond)                 # no gradient, θ_old in place
    v = policy.predict(x, t, cond)                         # θ, with gradient
    ...
    old.update(decay)                                      # θ_old ← d·θ_old + (1−d)·θ

Register it with ``accelerator.register_for_checkpointing`` (``state_dict``/``load_state_dict``)
and a resumed run continues bit-exactly.
"""

from __future__ import annotations

import contextlib

import torch

from visalign.errors import ConfigError

__all__ = ["LaggedWeights"]


class LaggedWeights:
    """A lagged copy of ``parameters`` (see the module docstring).

    Args:
        parameters: the trainable parameters (``Trainer.trainable_parameters``).
        copy: take the copy now (True), or leave :attr:`tensors` None until the first
            :meth:`update` / :meth:`refresh` (a snapshot that is refreshed on a schedule).

    Attributes:
        tensors: the lagged values, one tensor per parameter (same device and dtype), or None.
    """

    def __init__(self, parameters, copy: bool = True):
        self.parameters = list(parameters)
        self.tensors: list[torch.Tensor] | None = None
        if copy:
            self.refresh()

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """θ_lag ← d·θ_lag + (1−d)·θ; ``decay`` = 0 (or no copy yet) copies θ exactly."""
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"A lagged-weights decay must be in [0, 1], got {decay!r}.")
        if self.tensors is None:
            self.tensors = [p.detach().clone() for p in self.parameters]
            return
        for t, p in zip(self.tensors, self.parameters):
            if decay == 0.0:
                t.copy_(p.detach())
            elif decay != 1.0:
                t.mul_(decay).add_(p.detach().to(t.dtype), alpha=1.0 - decay)

    def refresh(self) -> None:
        """Copies the current weights (``update(0)``)."""
        self.update(0.0)

    @contextlib.contextmanager
    def swapped(self):
        """Within this block the parameters hold the lagged values (no grad); swapped back after."""
        if self.tensors is None:
            raise RuntimeError("LaggedWeights.swapped() before any copy was taken: call refresh() first.")
        with torch.no_grad():
            self._swap()
            try:
                yield
            finally:
                self._swap()

    def _swap(self) -> None:
        for p, t in zip(self.parameters, self.tensors):
            held = p.detach().clone()
            p.data.copy_(t)
            t.copy_(held)

    def distance(self) -> float:
        """mean (θ_lag − θ)² over all the weights: how far the copy lags (0 right after a refresh)."""
        if self.tensors is None:
            return 0.0
        with torch.no_grad():
            pairs = zip(self.tensors, self.parameters)
            total = sum(float((t.float() - p.detach().float()).pow(2).sum()) for t, p in pairs)
            count = sum(p.numel() for p in self.parameters)
        return total / max(count, 1)

    def state_dict(self) -> dict:
        return {"tensors": None if self.tensors is None else [t.detach().cpu() for t in self.tensors]}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        if tensors is not None and len(tensors) != len(self.parameters):
            raise ConfigError(
                f"A lagged-weights checkpoint holds {len(tensors)} tensors but the model has "
                f"{len(self.parameters)} trainable parameters; resume with the same LoRA/model settings."
            )
        self.tensors = (
            None
            if tensors is None
            else [t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, self.parameters)]
        )
