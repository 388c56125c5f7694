"""Tiny, offline, random-weight models for tests, notebooks and benchmarks.

Nothing here downloads anything: every model is built from a config with random weights and an
offline tokenizer, in eval mode.

- :func:`tiny_pipeline` builds a stock diffusers pipeline of each supported family.
- The reward helpers build tiny CLIP, aesthetic and VLM models for the reward tests.
"""

from visalign.testing.pipelines import FAMILIES, tiny_pipeline  # noqa: F401

try:  # the reward builders live beside the pipelines; absent only while being written
    from visalign.testing.rewards import *  # noqa: F401,F403
except ImportError:  # pragma: no cover
    pass
