"""Small helpers shared by the reward tests."""

import torch


def rand_images(batch=2, size=(40, 48), seed=0, requires_grad=False):
    """(batch, 3, H, W) uniform [0, 1] images, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g).requires_grad_(requires_grad)


def brightness(images, prompts=None):
    """A plain-callable reward: mean pixel value (differentiable)."""
    return images.float().mean(dim=tuple(range(1, images.dim())))
