"""Shared fixtures: tiny offline policies of every family, built once per session."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a 2-core machine running two pytest
# workers, torch's default of one thread per core makes them contend and slow down ~10x.
torch.set_num_threads(1)

FAMILIES = ("sd", "sdxl", "sd3", "flux", "wan-t2v", "wan-i2v")
FLOW_FAMILIES = ("sd3", "flux", "wan-t2v", "wan-i2v")
PROMPTS = ["a red circle on the left", "a blue square"]


def size_kwargs(family: str) -> dict:
    """The small height/width/num_frames every tiny family runs at."""
    from visalign.testing.pipelines import DEFAULT_SIZES

    return {k: v for k, v in DEFAULT_SIZES[family].items() if v is not None}


def first_frames(family: str, batch: int, seed: int = 0):
    """Random I2V first frames (as uint8 → [0,1], so PIL and tensor views agree), or None."""
    if family != "wan-i2v":
        return None
    size = size_kwargs(family)
    rng = np.random.RandomState(seed)
    arr = (rng.rand(batch, size["height"], size["width"], 3) * 255).astype(np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="session")
def tiny_policies():
    """family → Policy over a tiny random pipeline (seed 0). Tests must not mutate them."""
    import visalign as va
    from visalign.testing import tiny_pipeline

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = va.wrap(tiny_pipeline(family, seed=0))
        return cache[family]

    return get
