"""visalign: align diffusion and rectified-flow visual generators with rewards.

Quick start::

    import visalign as va
    from visalign.testing import tiny_pipeline

    policy = va.wrap(tiny_pipeline("sd3"))
    traj = va.sample(policy, ["a red circle"], num_steps=8, sampler="sde", eta=0.7)
    traj.images.shape   # (1, 3, H, W), floats in [0, 1]

The names below are imported lazily, so ``import visalign`` stays fast and a missing optional
package only matters when the feature that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "wrap": "visalign.pipelines",
    "load": "visalign.pipelines",
    "Policy": "visalign.pipelines",
    "sample": "visalign.sampling",
    "log_prob": "visalign.sampling",
    "Trajectory": "visalign.sampling",
    "LogProbOutput": "visalign.sampling",
    "SamplingOptions": "visalign.sampling",
    "GRPOTrainer": "visalign.algorithms.grpo",
    "GRPOConfig": "visalign.algorithms.grpo",
    "DPOTrainer": "visalign.algorithms.dpo",
    "DPOConfig": "visalign.algorithms.dpo",
    "PRDPTrainer": "visalign.algorithms.prdp",
    "PRDPConfig": "visalign.algorithms.prdp",
    "DRaFTTrainer": "visalign.algorithms.draft",
    "DRaFTConfig": "visalign.algorithms.draft",
    "NFTTrainer": "visalign.algorithms.nft",
    "NFTConfig": "visalign.algorithms.nft",
    "AWMTrainer": "visalign.algorithms.awm",
    "AWMConfig": "visalign.algorithms.awm",
    "fk_steer": "visalign.steering",
    "best_of_n": "visalign.steering",
    "reward_guidance": "visalign.steering",
}
_SUBMODULES = {
    "rewards",
    "errors",
    "testing",
    "sampling",
    "pipelines",
    "training",
    "algorithms",
    "losses",
    "steering",
    "toy",
}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from visalign.pipelines import Policy, load, wrap  # noqa: F401
    from visalign.sampling import LogProbOutput, SamplingOptions, Trajectory, log_prob, sample  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"visalign.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'visalign' has no attribute '{name}'")


def __dir__():
    return __all__
