"""The evaluator's pixel reader: finds up to two objects in each image and measures them, vectorised.

:func:`_read` takes images (N, 3, H, W) in [0, 1] and returns, per image and object slot, whether
an object was found and its colour, shape, position and size as indices into the world's
vocabularies (:mod:`visalign.toy.world`), with its centroid, area and shape fits. How each
attribute is read (all lengths are fractions of the image, so any resolution works):

- **background**: the mean of a thin border frame, ignoring pixels far from its median;
- **foreground**: pixels farther than :data:`FG_THRESHOLD` from it, minus isolated specks.
  When the border shows noise, objects are *found* on a 3×3-smoothed copy (the threshold then
  follows the noise level) but *measured* on the original pixels;
- **colour**: the dominant hue of the foreground, each pixel weighted by its squared distance
  from the background so solid interiors outvote blended edges, snapped to the nearest palette
  hue; the object's name is the hue of the mean of its strongest pixels. Hue ignores
  brightness and the blend with a pale background, which generated images get wrong first.
  A grey blob has no colour. For two-object prompts, the two dominant hues split the
  foreground, each pixel going to the hue whose direction from the background it follows;
- **shape**: each object's soft coverage (each pixel's offset from the background projected
  onto the object's colour) gives its area and centroid; a circle, a square and a triangle of
  that area at that centroid are drawn with the world's own
  :func:`~visalign.toy.raster.coverage`, and the one with the highest soft Dice similarity wins.
  On clean renders the right template matches exactly, and noise lowers all three alike;
- **position**: the winning template's bounding-box centre, snapped to the nearest anchor;
- **size**: the winning template's half-extent, snapped (in log scale) to small / medium / large.

:mod:`visalign.toy.detection` turns these tensors into named
:class:`~visalign.toy.detection.Detection` records (and reads motion from videos).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visalign.toy.raster import coverage
from visalign.toy.world import COLORS, POSITIONS, SHAPES, SIZES

# A pixel is foreground when its RGB distance from the background exceeds this (or five noise
# stds, if more). Palette colours are >= 0.75 away from every background, and Gaussian noise of
# std 0.05 per channel exceeds 0.25 on ~1e-5 of the pixels.
FG_THRESHOLD = 0.25
# Below this HSV saturation an object's mean colour counts as grey: no palette colour.
MIN_SATURATION = 0.25
# An object must cover at least this fraction of the image to be found (a small triangle in
# the world covers ~1.6%).
MIN_AREA = 0.004
# Above this background noise level (std per channel) objects are found on a smoothed copy.
NOISE_LEVEL = 0.02

# Area of each template in units of r² (r: half-extent of the bounding box).
_UNIT_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
# A triangle's area centroid lies r/3 below its bounding-box centre (apex up).
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}
_CHUNK = 512  # images per template batch, to bound memory on big evaluations


def _hue_sat(rgb: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV hue in degrees [0, 360) and saturation of RGB values along ``dim``."""
    r, g, b = rgb.unbind(dim)
    mx, arg = rgb.max(dim)
    mn = rgb.min(dim).values
    delta = (mx - mn).clamp_min(1e-6)
    hue = (
        torch.where(arg == 0, ((g - b) / delta) % 6, torch.where(arg == 1, (b - r) / delta + 2, (r - g) / delta + 4))
        * 60.0
    )
    return hue % 360.0, (mx - mn) / mx.clamp_min(1e-6)


def _hue_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs() % 360.0
    return torch.minimum(d, 360.0 - d)


_PALETTE_HUES = _hue_sat(torch.tensor(list(COLORS.values())))[0]  # (6,)
# Nearest palette colour of every whole hue degree: labelling pixels becomes a table look-up.
_HUE_LUT = _hue_dist(torch.arange(360.0)[:, None] + 0.5, _PALETTE_HUES).argmin(-1)


def _hue_label(hue: torch.Tensor) -> torch.Tensor:
    return _HUE_LUT[hue.long().clamp(0, 359)]


def _norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.pow(2).sum(dim).sqrt()


def _box3(x: torch.Tensor) -> torch.Tensor:
    """Sum over each pixel's 3x3 neighbourhood (zero padding), over the last two dims.

    Separable shifted adds: much faster on CPU than conv2d or max_pool2d for these sizes.
    """
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[..., :-2] + p[..., 1:-1] + p[..., 2:]
    return rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]


def _background(pixels: torch.Tensor, border: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The background colour (N, 3) and noise std per channel (N,) of each image.

    The colour is the mean of the border pixels within :data:`FG_THRESHOLD` of the border's
    median: the median ignores a sprite that touches the border, and the mean of the inliers
    stays unbiased where clipping to [0, 1] skews the noise (a white background).
    """
    ring = pixels[:, :, border]  # (N, 3, P)
    median = ring.median(dim=-1).values
    inlier = (_norm(ring - median[..., None], 1) < FG_THRESHOLD)[:, None]  # (N, 1, P)
    count = inlier.sum(-1).clamp_min(1)
    bg = torch.where(inlier.any(-1), (ring * inlier).sum(-1) / count, median)
    sigma = (((ring - bg[..., None]) ** 2 * inlier).sum((1, 2)) / (3 * count[:, 0])).sqrt()
    return bg, sigma


def _read(images: torch.Tensor, num_objects: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reads up to two objects from each image. Vectorised over the batch.

    Args:
        images: (N, 3, H, W) in [0, 1].
        num_objects: (N,) 1 or 2, how many objects to look for in each image.

    Returns:
        Tensors of shape (N, 2, ...): ``found`` bool, ``color`` / ``shape`` / ``position`` /
        ``size`` long indices (-1: none), ``centroid`` (x, y) fractions, ``area`` fraction,
        ``fit`` (N, 2, 3). Slot 1 is unused (not found) for one-object images.
    """
    n, _, h, w = images.shape
    side = min(h, w)
    # The background and its noise are read from a border frame ~1/16 of the side thick.
    bw = max(1, side // 16)
    border = torch.ones(h, w, dtype=torch.bool)
    border[bw : h - bw, bw : w - bw] = False
    _, sigma = _background(images, border)
    # On noisy images the objects are *found* on a 3x3 box-filtered copy, which divides the
    # noise by 3, but *measured* (coverage, area, centroid) on the original pixels.
    noisy = sigma > NOISE_LEVEL
    work = images
    if bool(noisy.any()):
        smooth = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        work = torch.where(noisy[:, None, None, None], smooth, images)
    bg, sigma = _background(work, border)
    wdiff = work - bg[:, :, None, None]
    wdist = _norm(wdiff, 1)  # (N, H, W)
    # Five sigmas of 3-channel noise is exceeded by ~1e-5 of background pixels.
    fg = wdist > torch.clamp(5 * sigma, min=FG_THRESHOLD)[:, None, None]
    # Drop specks: a pixel needs at least two foreground neighbours (of eight) to stay.
    fg &= (_box3(fg.to(torch.uint8)) - fg.to(torch.uint8)) >= 2

    # Colour votes: each foreground pixel votes for its nearest palette hue. Weighting by the
    # squared distance from the background lets solid interiors outvote anti-aliased edges,
    # whose hue drifts towards the background's tint.
    label = _hue_label(_hue_sat(work, dim=1)[0])  # (N, H, W)
    weight = wdist.pow(2) * fg
    votes = torch.zeros(n, len(COLORS)).scatter_add_(1, label.flatten(1), weight.flatten(1))
    top_votes, top_labels = votes.topk(2, dim=1)  # (N, 2)
    # Only two-object images split the foreground, and the second hue needs the mass of half a
    # minimal object: the anti-aliased edges of one sprite, whose hue drifts, never reach it.
    two = (num_objects == 2) & (top_votes[:, 1] >= 0.5 * MIN_AREA * h * w)
    # Split by direction from the background rather than by hue: a blend of a colour with the
    # background lies on the segment between them, so its direction is blend-invariant, while
    # its hue is not (a red edge on cream looks orange).
    picked = fg[:, None] & (label[:, None] == top_labels[..., None, None])  # (N, 2, H, W)
    wk = weight[:, None] * picked
    seed_rgb = torch.einsum("nchw,nkhw->nkc", work, wk) / wk.sum((2, 3)).clamp_min(1e-6)[..., None]
    direction = seed_rgb - bg[:, None]
    direction = direction / _norm(direction, -1).clamp_min(1e-6)[..., None]
    cosine = torch.einsum("nchw,nkc->nkhw", wdiff, direction)  # (N, 2, H, W)
    # Two hues that point the same way from the background are one object after all.
    two &= (direction[:, 0] * direction[:, 1]).sum(-1) < 0.99
    in_second = (cosine[:, 1] > cosine[:, 0]) & two[:, None, None]
    masks = torch.stack([fg & ~in_second, fg & in_second], dim=1)  # (N, 2, H, W)

    # Each object's colour: the mean of its strongest pixels (at least half its max distance),
    # named by the nearest palette hue; too grey a mean names no colour.
    obj_dist = wdist[:, None] * masks
    core = masks & (obj_dist >= 0.5 * obj_dist.flatten(2).max(-1).values[..., None, None])
    core_n = core.sum((2, 3)).clamp_min(1)  # (N, 2)
    mean_rgb = torch.einsum("nchw,nkhw->nkc", images, core.float()) / core_n[..., None]
    mean_hue, mean_sat = _hue_sat(mean_rgb)
    color = torch.where(mean_sat >= MIN_SATURATION, _hue_label(mean_hue), -1)

    # Soft coverage: project each pixel's offset from the background onto the object's colour.
    # A one-pixel ring around the mask lets anti-aliased edges count (never the other object's
    # pixels). No clamping at 0, so noise averages out of the area and centroid instead of
    # adding up.
    obj_dir = mean_rgb - bg[:, None]  # (N, 2, 3)
    diff = images - bg[:, :, None, None]
    obj_dir = obj_dir / obj_dir.pow(2).sum(-1).clamp_min(1e-6)[..., None]
    alpha = torch.einsum("nchw,nkc->nkhw", diff, obj_dir).clamp(-1, 2)
    grown = _box3(masks.to(torch.uint8)) > 0
    alpha = alpha * (grown & ~masks.flip(1))

    area = alpha.flatten(2).sum(-1)  # (N, 2) in pixels
    found = masks.flatten(2).any(-1) & (area >= MIN_AREA * h * w)
    found[:, 1] &= two
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    safe = area.clamp_min(1e-6)
    cx = (alpha * xs).flatten(2).sum(-1) / safe
    cy = (alpha * ys[:, None]).flatten(2).sum(-1) / safe

    # Shape: soft Dice with a template of each shape of the same area and centroid. Dice is
    # 1 - squared error / energy, so zero-mean noise lowers all three scores alike.
    a2 = alpha.pow(2).flatten(2).sum(-1)
    fits, centers, radii = [], [], []
    for name in SHAPES:
        r = torch.sqrt(area.clamp_min(0) / _UNIT_AREA[name])
        box_cy = cy - _CENTROID_DROP[name] * r
        fit = torch.empty(n, 2)
        for s in range(0, n, _CHUNK):
            sl = slice(s, s + _CHUNK)
            tmpl = coverage(name, cx[sl], box_cy[sl], r[sl], h, w)
            cross = (tmpl * alpha[sl]).flatten(2).sum(-1)
            fit[sl] = 2 * cross / (a2[sl] + tmpl.pow(2).flatten(2).sum(-1)).clamp_min(1e-6)
        fits.append(fit)
        centers.append(torch.stack([cx / w, box_cy / h], -1))
        radii.append(r / side)
    fit = torch.stack(fits, -1)  # (N, 2, 3)
    shape = fit.argmax(-1)
    center = torch.stack(centers, 2).gather(2, shape[..., None, None].expand(n, 2, 1, 2))[:, :, 0]
    radius = torch.stack(radii, -1).gather(2, shape[..., None])[..., 0]

    anchors = torch.tensor(list(POSITIONS.values()))
    position = _norm(center[:, :, None] - anchors, -1).argmin(-1)
    log_sizes = torch.tensor(list(SIZES.values())).log()
    size = (radius.clamp_min(1e-6).log()[..., None] - log_sizes).abs().argmin(-1)

    none = torch.full_like(shape, -1)
    return {
        "found": found,
        "color": torch.where(found, color, none),
        "shape": torch.where(found, shape, none),
        "position": torch.where(found, position, none),
        "size": torch.where(found, size, none),
        "centroid": torch.stack([cx / w, cy / h], -1),
        "area": area / (h * w),
        "fit": fit,
    }
