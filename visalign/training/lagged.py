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
and a resumed run continues bit-exactly. Under FSDP the parameters, and so the copies, are this
rank's shards (``DTensor``); checkpoints hold the whole tensors.

With ``offload=True`` (the ``offload_copies`` option) the lagged tensors live in CPU memory, pinned
when the parameters are on CUDA. A swap then copies them host→device into the live parameters and
restores the live values from a device-side clone (one host→device copy per pass, nothing copied
back: the lagged values do not change during a pass); :meth:`LaggedWeights.update` brings θ to the
host and updates there. On the CPU the results are bit-identical to keeping the copy beside θ.
"""

from __future__ import annotations

import contextlib

import torch

from visalign.errors import ConfigError
from visalign.training.fsdp import full_tensor, shard_like
from visalign.training.offload import copy_placement, host_copy

__all__ = ["LaggedWeights"]


class LaggedWeights:
    """A lagged copy of ``parameters`` (see the module docstring).

    Args:
        parameters: the trainable parameters (``Trainer.trainable_parameters``).
        copy: take the copy now (True), or leave :attr:`tensors` None until the first
            :meth:`update` / :meth:`refresh` (a snapshot that is refreshed on a schedule).
        offload: keep the lagged values in CPU memory (pinned for CUDA parameters) and bring them
            to the device only inside :meth:`swapped` (see the module docstring).

    Attributes:
        tensors: the lagged values, one tensor per parameter (the parameter's dtype; its device, or
            the CPU when offloaded), or None.
    """

    def __init__(self, parameters, copy: bool = True, offload: bool = False):
        self.parameters = list(parameters)
        self.offload = offload
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
            self.tensors = [self._new_copy(p, p) for p in self.parameters]
            return
        for t, p in zip(self.tensors, self.parameters):
            # Offloaded, θ comes to the host tensor by tensor. The blocking device→host copies are
            # queued behind any asynchronous host→device copy out of ``t`` left by a swap, so ``t``
            # is not written while a pass may still be reading it.
            if decay == 0.0:
                t.copy_(p.detach())
            elif decay != 1.0:
                theta = p.detach().to(t.device) if self.offload else p.detach()
                t.mul_(decay).add_(theta.to(t.dtype), alpha=1.0 - decay)

    def _new_copy(self, values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A copy of ``values`` placed as a copy of ``param`` is kept: beside it, or on the host when offloaded."""
        if not self.offload:
            return values.detach().clone()
        _, pin = copy_placement(param.device, offload=True)
        return host_copy(values.to(param.dtype), pin)

    def refresh(self) -> None:
        """Copies the current weights (``update(0)``)."""
        self.update(0.0)

    @contextlib.contextmanager
    def swapped(self):
        """Within this block the parameters hold the lagged values (no grad); swapped back after."""
        if self.tensors is None:
            raise RuntimeError("LaggedWeights.swapped() before any copy was taken: call refresh() first.")
        with torch.no_grad():
            if self.offload:
                with self._swapped_from_host():
                    yield
                return
            self._swap()
            try:
                yield
            finally:
                self._swap()

    @contextlib.contextmanager
    def _swapped_from_host(self):
        # The live values wait in a device-side clone, so the host copy is only read: one
        # host→device copy per pass (asynchronous from pinned memory, ordered before the pass's
        # kernels on the same stream) and none back.
        held = [p.detach().clone() for p in self.parameters]
        try:
            for p, t in zip(self.parameters, self.tensors):
                p.data.copy_(t, non_blocking=True)
            yield
        finally:
            for p, h in zip(self.parameters, held):
                p.data.copy_(h)

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
            total = sum(float((t.float() - p.detach().float().to(t.device)).pow(2).sum()) for t, p in pairs)
            count = sum(p.numel() for p in self.parameters)
        return total / max(count, 1)

    def state_dict(self) -> dict:
        # Under FSDP each rank holds a shard, and accelerate writes custom state from the main process
        # only: the checkpoint keeps whole tensors (gathered on every rank, a collective) so that any
        # rank, or another number of processes, can cut its shard back out on load.
        if self.tensors is None:
            return {"tensors": None}
        return {"tensors": [full_tensor(t.detach()).cpu() for t in self.tensors]}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        if tensors is not None and len(tensors) != len(self.parameters):
            raise ConfigError(
                f"A lagged-weights checkpoint holds {len(tensors)} tensors but the model has "
                f"{len(self.parameters)} trainable parameters; resume with the same LoRA/model settings."
            )
        if tensors is None:
            self.tensors = None
        elif self.offload:  # back into (pinned) host memory, as at the start
            self.tensors = [self._new_copy(shard_like(t, p.detach()), p) for t, p in zip(tensors, self.parameters)]
        else:
            self.tensors = [shard_like(t, p.detach()) for t, p in zip(tensors, self.parameters)]
