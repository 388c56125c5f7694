"""Fixtures for the reward tests: tiny offline models, built once per session."""

import pytest


@pytest.fixture(scope="session")
def clip_pair():
    """(CLIPModel, CLIPProcessor), tiny and random. Tests must not mutate them."""
    from visalign.testing.rewards import tiny_clip

    return tiny_clip(seed=0)


@pytest.fixture(scope="session")
def trained_clip():
    """A tiny CLIP trained for a moment on colour swatches, so colour words are meaningful."""
    from visalign.testing.rewards import tiny_clip

    return tiny_clip(seed=0, trained=True)


@pytest.fixture(scope="session")
def vlm_pair():
    """(LlavaForConditionalGeneration, LlavaProcessor), tiny and random."""
    from visalign.testing.rewards import tiny_vlm

    return tiny_vlm(seed=0)
