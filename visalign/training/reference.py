"""A copy of the trainable weights that stands in for the reference policy (online/iterative DPO).

With ``ref_refresh_every=K`` the reference is not the base model but the policy as it was at the
last refresh: a snapshot of the *trainable* weights (for LoRA, the adapter only; the frozen base is
shared, never copied). A reference pass swaps the snapshot into the live parameters in place, under
no_grad, and swaps it back; run it before the policy's own forward, so autograd never sees a
changed weight. The snapshot is checkpointed with the run.

It is a :class:`~visalign.training.lagged.LaggedWeights` that starts empty and is only ever
refreshed (decay 0); DiffusionNFT's old policy and AWM's EMA anchor use the decaying form.
"""

from __future__ import annotations

import torch

from visalign.training.lagged import LaggedWeights

__all__ = ["ReferenceSnapshot"]


class ReferenceSnapshot(LaggedWeights):
    """Copies of the trainable weights at the last :meth:`refresh`, swapped in for reference passes.

    ``tensors`` is None until the first refresh. Checkpointed through
    ``accelerator.register_for_checkpointing`` (``state_dict``/``load_state_dict``). With
    ``offload=True`` the snapshot lives in (pinned) host memory between passes.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], offload: bool = False):
        super().__init__(parameters, copy=False, offload=offload)
