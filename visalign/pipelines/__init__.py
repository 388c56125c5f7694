"""Policies: diffusers pipelines wrapped for sampling with log-probs, scoring and training.

``va.wrap(pipe)`` picks the adapter registered for the pipeline's class; ``va.load(path)`` loads and
wraps. Each family lives in its own file; importing this package registers all of them.
"""

# Importing the family modules registers their adapters.
from visalign.pipelines import (  # noqa: E402,F401  # noqa: E402,F401  # noqa: E402,F401
    flux,
    flux2,
    hunyuan_video15,
    kontext,
    qwen_image,
    qwen_image_edit,
    sd3,
    stable_diffusion,
    wan,
    wan22,
    z_image,
)
from visalign.pipelines.base import Conditioning, Geometry, Policy, Schedule
from visalign.pipelines.registry import adapter_for, load, register_adapter, supported_pipelines, wrap

__all__ = [
    "Conditioning",
    "Geometry",
    "Policy",
    "Schedule",
    "adapter_for",
    "load",
    "register_adapter",
    "supported_pipelines",
    "wrap",
]
