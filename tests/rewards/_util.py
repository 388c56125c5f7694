"""Small helpers shared by the reward tests."""

import torch


def rand_images(batch=2, size=(40, 48), seed=0, requires_grad=False):
    """(batch, 3, H, W) uniform [0, 1] images, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g).requires_grad_(requires_grad)
