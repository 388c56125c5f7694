"""What the evaluator sees: :class:`Detection` records of the objects in images, and motion in videos.

:func:`detect` reads the objects of each image without a prompt (useful to inspect generations),
on top of the vectorised pixel reader of :mod:`visalign.toy.readout`. For videos,
:func:`_detect_videos` gives one detection per clip and its direction of motion:

- **motion**: the least-squares slope of the centroid over the frames, as a direction when it
  travels at least :data:`MIN_TRAVEL` of the frame;
- colour, shape and size of a video are the majority over its frames; position is not read
  (videos always start centred).

Example::

    from visalign.toy import detect, render_batch

    detect(render_batch(["a red circle on the left"]))[0][0].shape    # "circle"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visalign.errors import InvalidInputError
from visalign.toy.readout import _read
from visalign.toy.world import COLORS, POSITIONS, SHAPES, SIZES

# A video's centroid must travel at least this fraction of the frame (the world moves 0.25).
MIN_TRAVEL = 0.08

_COLOR_NAMES = list(COLORS)
_POSITION_NAMES = list(POSITIONS)
_SIZE_NAMES = list(SIZES)


@dataclass
class Detection:
    """What the evaluator read for one object of one image.

    Attributes:
        found: whether an object was found; if not, the other fields are ``None``.
        color, shape, position, size: the names read back (``color`` is ``None`` for a grey
            blob; ``size`` is one of small / medium / large).
        centroid: (x, y) of the area centroid, as fractions of the image.
        area: covered fraction of the image.
        shape_fit: each shape template's soft Dice similarity with the object's coverage
            (1 is a perfect match), e.g. ``{"circle": 0.99, "square": 0.83, ...}``.
    """

    found: bool
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    centroid: tuple[float, float] | None = None
    area: float | None = None
    shape_fit: dict[str, float] | None = None


def _check_pixels(pixels, ndim: int, what: str) -> torch.Tensor:
    if not isinstance(pixels, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor; got {type(pixels).__name__}.")
    if pixels.ndim != ndim or pixels.shape[-3] != 3 or min(pixels.shape[-2:]) < 8:
        raise InvalidInputError(
            f"{what} must have shape {'(B, 3, H, W)' if ndim == 4 else '(B, T, 3, H, W)'} "
            f"with 3 RGB channels and H, W >= 8; got {tuple(pixels.shape)}."
        )
    x = pixels.detach().float().cpu()
    if x.numel() and (x.min() < -0.5 or x.max() > 1.5):
        raise InvalidInputError(
            f"{what} must hold values in [0, 1]; got the range [{x.min():.3g}, {x.max():.3g}]. "
            "Map [-1, 1] images with (x + 1) / 2 and uint8 images with x / 255."
        )
    return x.clamp(0, 1)


class _Reading:
    """The tensors of :func:`_read` as Python lists, to build many detections quickly."""

    def __init__(self, read: dict[str, torch.Tensor]):
        self.lists = {k: v.tolist() for k, v in read.items()}

    def detection(self, i: int, k: int) -> Detection:
        L = self.lists
        if not L["found"][i][k]:
            return Detection(found=False)
        name = lambda names, key: names[L[key][i][k]] if L[key][i][k] >= 0 else None  # noqa: E731
        return Detection(
            found=True,
            color=name(_COLOR_NAMES, "color"),
            shape=name(SHAPES, "shape"),
            position=name(_POSITION_NAMES, "position"),
            size=name(_SIZE_NAMES, "size"),
            centroid=(round(L["centroid"][i][k][0], 4), round(L["centroid"][i][k][1], 4)),
            area=round(L["area"][i][k], 5),
            shape_fit={s: round(v, 4) for s, v in zip(SHAPES, L["fit"][i][k])},
        )


def detect(images: torch.Tensor, num_objects: int = 1) -> list[list[Detection]]:
    """Reads the objects in each image, without a prompt (useful to inspect generations).

    Args:
        images: (B, 3, H, W) in [0, 1].
        num_objects: 1, or 2 to split the foreground by its two dominant hues.

    Returns:
        For each image, a list of ``num_objects`` :class:`Detection`.
    """
    images = _check_pixels(images, 4, "`images`")
    if num_objects not in (1, 2):
        raise InvalidInputError(f"`num_objects` must be 1 or 2; got {num_objects!r}.")
    reading = _Reading(_read(images, torch.full((images.shape[0],), num_objects)))
    return [[reading.detection(i, k) for k in range(num_objects)] for i in range(len(images))]


def _motion(read: dict[str, torch.Tensor], b: int, t: int) -> list[str | None]:
    """The direction each video moves (or None), from its centroids' least-squares slope."""
    found = read["found"][:, 0].view(b, t).float()
    cen = read["centroid"][:, 0].view(b, t, 2)
    time = torch.arange(t, dtype=torch.float32).expand(b, t)
    wsum = found.sum(1).clamp_min(1)
    t_mean = (found * time).sum(1) / wsum
    c_mean = (found[..., None] * cen).sum(1) / wsum[:, None]
    dt = (time - t_mean[:, None]) * found
    slope = (dt[..., None] * (cen - c_mean[:, None])).sum(1) / dt.pow(2).sum(1).clamp_min(1e-6)[:, None]
    out = []
    for dx, dy in (slope * (t - 1)).tolist():  # travel over the whole clip, in image fractions
        if max(abs(dx), abs(dy)) < MIN_TRAVEL:
            out.append(None)
        elif abs(dx) >= abs(dy):
            out.append("right" if dx > 0 else "left")
        else:
            out.append("down" if dy > 0 else "up")
    return out


def _majority(values: list[int]) -> int:
    """The most common value; ties go to the smallest, so the result is deterministic."""
    return max(sorted(set(values)), key=values.count)


def _detect_videos(videos: torch.Tensor) -> tuple[list[Detection], list[str | None]]:
    """One detection per video (B, T, 3, H, W) in [0, 1], and the direction each one moves.

    A video's detection carries the majority colour, shape and size over the frames where the
    sprite was found (it must be found in at least half of them), and the centroid, area and
    shape fit of the first such frame; its position is ``None``. A video whose sprite is not
    found moves in no direction (``None``).
    """
    b, t = videos.shape[:2]
    read = _read(videos.flatten(0, 1), torch.ones(b * t, dtype=torch.long))
    motions = _motion(read, b, t)
    reading = _Reading(read)
    lists = reading.lists
    detections = []
    for i in range(b):
        present = [r for r in range(i * t, (i + 1) * t) if lists["found"][r][0]]
        if 2 * len(present) < t:
            det = Detection(found=False)
        else:
            det = reading.detection(present[0], 0)
            color, shape, size = (_majority([lists[key][r][0] for r in present]) for key in ("color", "shape", "size"))
            det.color = _COLOR_NAMES[color] if color >= 0 else None
            det.shape, det.size, det.position = SHAPES[shape], _SIZE_NAMES[size], None
        detections.append(det)
    return detections, [m if d.found else None for m, d in zip(motions, detections)]
