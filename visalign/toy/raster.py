"""Drawing still toy-world scenes into pixels: the anti-aliased shape rasteriser and the renderers.

:func:`coverage` is the world's one rasteriser (the evaluator fits templates drawn by it, so clean
renders match their template exactly); :func:`render` and :func:`render_batch` paint the sprites of
a :class:`~visalign.toy.world.Scene` over its background, vectorised over a batch. The moving
scenes of :mod:`visalign.toy.video` are drawn with the same painter.

Example::

    from visalign.toy import render, render_batch

    image = render("a red circle on the left")                  # (3, 32, 32) in [0, 1]
    batch = render_batch(["a blue square", "a large green triangle at the top"], size=64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from visalign.errors import InvalidInputError
from visalign.toy.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, Sprite, as_scene


def coverage(shape: str, cx, cy, r, height: int, width: int, antialias: bool = True) -> torch.Tensor:
    """How much of each pixel a shape covers, in [0, 1].

    The shape is given by its bounding-box centre ``(cx, cy)`` and half-extent ``r`` in pixels;
    these may be tensors of any shape ``S`` (broadcast together), giving ``(*S, H, W)``.
    Anti-aliasing uses the signed distance ``d`` to the outline: coverage = clamp(0.5 - d, 0, 1),
    exact for squares and very close for circles and triangles. The evaluator fits templates
    made by this same function, so clean renders match their template exactly.
    """
    cx, cy, r = (torch.as_tensor(v, dtype=torch.float32)[..., None, None] for v in (cx, cy, r))
    # Pixel centres sit at i + 0.5. Keeping x as a row and y as a column lets every step
    # broadcast, so most intermediates are (.., 1, W) or (.., H, 1) rather than (.., H, W).
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = (torch.arange(height, dtype=torch.float32) + 0.5)[:, None]
    dx, dy = (xs - cx).abs(), ys - cy
    if shape == "square":
        if not antialias:
            return ((dx <= r) & (dy.abs() <= r)).float()
        return (r - dx + 0.5).clamp(0, 1) * (r - dy.abs() + 0.5).clamp(0, 1)
    if shape == "circle":
        sdf = torch.sqrt(dx**2 + dy**2) - r
    elif shape == "triangle":
        # Apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r). The slanted
        # edges have outward normals (±2, -1)/√5; the max over half-planes is the distance.
        slant = (2 * dx - (dy + r)) / math.sqrt(5.0)
        sdf = torch.maximum(slant, dy - r)
    else:
        raise InvalidInputError(f"Unknown shape {shape!r}; expected one of {list(SHAPES)}.")
    return (0.5 - sdf).clamp(0, 1) if antialias else (sdf <= 0).float()


def _validate_size(size) -> int:
    if not isinstance(size, int) or size < 8:
        raise InvalidInputError(f"`size` must be an int of at least 8 pixels; got {size!r}.")
    return size


_Layer = tuple[Sequence[Sprite], Sequence[tuple[float, float]], str]  # sprites, centres, bg


def _draw(items: Sequence[_Layer], size: int, antialias: bool) -> torch.Tensor:
    """Draws many images at once: (N, 3, size, size). Sprites are painted in order."""
    n, k = len(items), max(len(sprites) for sprites, _, _ in items)
    image = torch.tensor([BACKGROUNDS[bg] for _, _, bg in items])[:, :, None, None]
    image = image.expand(n, 3, size, size).clone()
    for slot in range(k):
        alpha = torch.zeros(n, size, size)
        color = torch.zeros(n, 3)
        for shape in SHAPES:
            rows = [
                i for i, (sprites, _, _) in enumerate(items) if len(sprites) > slot and sprites[slot].shape == shape
            ]
            if not rows:
                continue
            sprites = [items[i][0][slot] for i in rows]
            centers = torch.tensor([items[i][1][slot] for i in rows]) * size
            radius = torch.tensor([SIZES[sp.size or "medium"] for sp in sprites]) * size
            alpha[rows] = coverage(shape, centers[:, 0], centers[:, 1], radius, size, size, antialias)
            color[rows] = torch.tensor([COLORS[sp.color] for sp in sprites])
        alpha = alpha[:, None]
        image = image * (1 - alpha) + color[:, :, None, None] * alpha
    return image


def _still(scene: Scene) -> _Layer:
    centers = [POSITIONS[s.position or "center"] for s in scene.sprites]
    return scene.sprites, centers, scene.background


def render(scene: Scene | str, size: int = 32, antialias: bool = True) -> torch.Tensor:
    """Renders a still scene.

    Args:
        scene: a :class:`Scene` or a caption. A moving scene renders its first frame.
        size: the side of the square image in pixels.
        antialias: soften edges by pixel coverage (default) or draw hard edges.

    Returns:
        A float32 tensor (3, size, size) in [0, 1].
    """
    return render_batch([scene], size, antialias)[0]


def render_batch(scenes: Sequence[Scene | str], size: int = 32, antialias: bool = True) -> torch.Tensor:
    """Renders still scenes (or captions) into a (B, 3, size, size) tensor; see :func:`render`."""
    if len(scenes) == 0:
        raise InvalidInputError("`render_batch` needs at least one scene.")
    return _draw([_still(as_scene(s)) for s in scenes], _validate_size(size), antialias)
