"""A copy of the trainable weights that stands in for the reference policy (online/iterative DPO).

With ``ref_refresh_every=K`` the reference is not the base model but the policy as it was at the
last refresh: a snapshot of the *trainable* weights (for LoRA, the adapter only; the frozen base is
shared, never copied). A reference pass swaps the snapshot into the live parameters in place, under
no_grad, and swaps it back; run it before the policy's own forward, so autograd never sees a
changed weight. The snapshot is checkpointed with the run.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["ReferenceSnapshot"]


class ReferenceSnapshot:
    """Copies of the trainable weights at the last refresh, swapped in for reference passes.

    Checkpointed through ``accelerator.register_for_checkpointing`` (``state_dict``/``load_state_dict``).
    """

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.tensors: list[torch.Tensor] | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        self.tensors = [p.detach().clone() for p in self.parameters]

    @contextlib.contextmanager
    def swapped(self):
        """Within this block the parameters hold the snapshot (no grad); swapped back after."""
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

    def state_dict(self) -> dict:
        return {"tensors": None if self.tensors is None else [t.cpu() for t in self.tensors]}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        self.tensors = None if tensors is None else [
            t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, self.parameters)]
