"""Writing images and videos to disk: PNG grids and MP4/GIF clips (no torchvision needed)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from visalign.errors import InvalidInputError


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float [0, 1] (..., 3, H, W) → uint8 (..., H, W, 3)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return array.movedim(-3, -1).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """Tiles a batch (B, 3, H, W) in [0, 1] into one PIL image, ``nrow`` images per row."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInputError(f"image_grid expects (B, 3, H, W); got {tuple(images.shape)}.")
    b, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, np.uint8)
    for i, tile in enumerate(to_uint8(images)):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y : y + h, x : x + w] = tile
    return Image.fromarray(grid)


def to_pil_images(images: torch.Tensor, upscale: int = 1) -> list[Image.Image]:
    """A batch (B, 3, H, W) in [0, 1] → one PIL image each, nearest-neighbour ``upscale``d."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInputError(f"to_pil_images expects (B, 3, H, W); got {tuple(images.shape)}.")
    out = [Image.fromarray(tile) for tile in to_uint8(images)]
    if upscale > 1:
        out = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in out]
    return out


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None, upscale: int = 1) -> str:
    """Saves a batch of images as one PNG grid (nearest-neighbour ``upscale`` for tiny images)."""
    grid = image_grid(images, nrow)
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path


def save_video(frames: torch.Tensor, path: str, fps: int = 8) -> str:
    """Saves one video (T, 3, H, W) in [0, 1] as MP4 (imageio-ffmpeg) or GIF, by the path's suffix."""
    from visalign.errors import require

    imageio = require("imageio", "video", "Saving videos")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise InvalidInputError(f"save_video expects (T, 3, H, W); got {tuple(frames.shape)}.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = list(to_uint8(frames))
    if path.endswith(".gif"):
        imageio.mimsave(path, data, duration=1000 / fps, loop=0)
    else:
        require("imageio_ffmpeg", "video", "Saving MP4 videos")
        imageio.mimsave(path, data, fps=fps, macro_block_size=1)
    return path
