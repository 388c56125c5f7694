"""Tiny, offline, random-weight models for tests, notebooks and benchmarks.

Nothing here downloads anything: every model is built from a config with random weights and an
offline tokenizer, in eval mode.

- :func:`tiny_pipeline` builds a stock diffusers pipeline of each supported family.
- The reward builders (:func:`tiny_clip`, :func:`tiny_aesthetic`, :func:`tiny_vlm`, ...) build
  tiny CLIP, aesthetic and VLM models for the reward tests and notebooks.
"""

from visalign.testing.pipelines import DEFAULT_SIZES, FAMILIES, tiny_pipeline  # noqa: F401
from visalign.testing.rewards import *  # noqa: F401,F403
from visalign.testing.rewards import __all__ as _reward_builders

__all__ = ["DEFAULT_SIZES", "FAMILIES", "tiny_pipeline", *_reward_builders]
