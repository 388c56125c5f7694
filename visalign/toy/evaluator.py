"""The exact evaluator of the toy world: it reads attributes back from pixels and scores prompts.

Given images (B, 3, H, W) or videos (B, T, 3, H, W) in [0, 1] and their captions (see
:mod:`visalign.toy.world` for the grammar), :func:`evaluate` says, per sample and per attribute,
whether the pixels show what the caption asks for, and summarises it in the GenEval style:
per-attribute accuracy and the fraction of samples with every attribute right.

How each attribute is read (all lengths are fractions of the image, so any resolution works):

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
  :func:`~visalign.toy.world.coverage`, and the one with the highest soft Dice similarity wins.
  On clean renders the right template matches exactly, and noise lowers all three alike;
- **position**: the winning template's bounding-box centre, snapped to the nearest anchor;
- **size** (checked only when the caption states it): the winning template's half-extent,
  snapped (in log scale) to small / medium / large;
- **motion** (videos): the least-squares slope of the centroid over the frames, as a direction
  when it travels at least :data:`MIN_TRAVEL` of the frame. Colour, shape and size of a video
  are the majority over its frames; position is not checked (videos always start centred).

An attribute of a two-object prompt is right when it is right for both objects, under the
pairing of prompt objects and detected objects that gets the most attributes right. An object
that is not found (blank image, missing second shape) gets every attribute wrong.

Example::

    from visalign.toy import evaluate, render_batch, ToyEvaluatorReward

    prompts = ["a red circle on the left", "a blue square in the center"]
    result = evaluate(render_batch(prompts), prompts)
    result["accuracy"]      # {"color": 1.0, "shape": 1.0, "position": 1.0}
    result["all_correct"]   # 1.0
    ToyEvaluatorReward()(images, prompts)   # Tensor[B]: fraction of attributes right
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visalign.errors import InvalidInputError
from visalign.rewards.base import Reward
from visalign.toy.world import COLORS, POSITIONS, SHAPES, SIZES, Scene, as_scene, coverage

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
# A video's centroid must travel at least this fraction of the frame (the world moves 0.25).
MIN_TRAVEL = 0.08

_COLOR_NAMES = list(COLORS)
_POSITION_NAMES = list(POSITIONS)
_SIZE_NAMES = list(SIZES)
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
    hue = torch.where(arg == 0, ((g - b) / delta) % 6,
                      torch.where(arg == 1, (b - r) / delta + 2, (r - g) / delta + 4)) * 60.0
    return hue % 360.0, (mx - mn) / mx.clamp_min(1e-6)


def _hue_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs() % 360.0
    return torch.minimum(d, 360.0 - d)


_PALETTE_HUES = _hue_sat(torch.tensor(list(COLORS.values())))[0]  # (6,)
# Nearest palette colour of every whole hue degree: labelling pixels becomes a table look-up.
_HUE_LUT = _hue_dist(torch.arange(360.0)[:, None] + 0.5, _PALETTE_HUES).argmin(-1)


def _hue_label(hue: torch.Tensor) -> torch.Tensor:
    return _HUE_LUT[hue.long().clamp(0, 359)]


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
    ring = pixels[:, :, border]                                           # (N, 3, P)
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
    border[bw:h - bw, bw:w - bw] = False
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
    wdist = _norm(wdiff, 1)                                               # (N, H, W)
    # Five sigmas of 3-channel noise is exceeded by ~1e-5 of background pixels.
    fg = wdist > torch.clamp(5 * sigma, min=FG_THRESHOLD)[:, None, None]
    # Drop specks: a pixel needs at least two foreground neighbours (of eight) to stay.
    fg &= (_box3(fg.to(torch.uint8)) - fg.to(torch.uint8)) >= 2

    # Colour votes: each foreground pixel votes for its nearest palette hue. Weighting by the
    # squared distance from the background lets solid interiors outvote anti-aliased edges,
    # whose hue drifts towards the background's tint.
    label = _hue_label(_hue_sat(work, dim=1)[0])                          # (N, H, W)
    weight = wdist.pow(2) * fg
    votes = torch.zeros(n, len(COLORS)).scatter_add_(1, label.flatten(1), weight.flatten(1))
    top_votes, top_labels = votes.topk(2, dim=1)                          # (N, 2)
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
    cosine = torch.einsum("nchw,nkc->nkhw", wdiff, direction)            # (N, 2, H, W)
    # Two hues that point the same way from the background are one object after all.
    two &= (direction[:, 0] * direction[:, 1]).sum(-1) < 0.99
    in_second = (cosine[:, 1] > cosine[:, 0]) & two[:, None, None]
    masks = torch.stack([fg & ~in_second, fg & in_second], dim=1)         # (N, 2, H, W)

    # Each object's colour: the mean of its strongest pixels (at least half its max distance),
    # named by the nearest palette hue; too grey a mean names no colour.
    obj_dist = wdist[:, None] * masks
    core = masks & (obj_dist >= 0.5 * obj_dist.flatten(2).max(-1).values[..., None, None])
    core_n = core.sum((2, 3)).clamp_min(1)                                # (N, 2)
    mean_rgb = torch.einsum("nchw,nkhw->nkc", images, core.float()) / core_n[..., None]
    mean_hue, mean_sat = _hue_sat(mean_rgb)
    color = torch.where(mean_sat >= MIN_SATURATION, _hue_label(mean_hue), -1)

    # Soft coverage: project each pixel's offset from the background onto the object's colour.
    # A one-pixel ring around the mask lets anti-aliased edges count (never the other object's
    # pixels). No clamping at 0, so noise averages out of the area and centroid instead of
    # adding up.
    obj_dir = mean_rgb - bg[:, None]                                      # (N, 2, 3)
    diff = images - bg[:, :, None, None]
    obj_dir = obj_dir / obj_dir.pow(2).sum(-1).clamp_min(1e-6)[..., None]
    alpha = torch.einsum("nchw,nkc->nkhw", diff, obj_dir).clamp(-1, 2)
    grown = _box3(masks.to(torch.uint8)) > 0
    alpha = alpha * (grown & ~masks.flip(1))

    area = alpha.flatten(2).sum(-1)                                       # (N, 2) in pixels
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
    fit = torch.stack(fits, -1)                                           # (N, 2, 3)
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


def _attributes(scene: Scene) -> list[str]:
    """The attributes a prompt states, in report order."""
    attrs = ["color", "shape"]
    if not scene.is_video and any(s.position is not None for s in scene.sprites):
        attrs.append("position")
    if any(s.size is not None for s in scene.sprites):
        attrs.append("size")
    if scene.is_video:
        attrs.append("motion")
    return attrs


def _match(scene: Scene, found: list[Detection], attrs: list[str]) -> dict[str, list[bool]]:
    """Per attribute, per prompt object: right or not, under the best object pairing."""
    best, best_hits = None, -1
    for perm in itertools.permutations(range(len(scene.sprites))):
        table = {a: [] for a in attrs if a != "motion"}
        for sprite, j in zip(scene.sprites, perm):
            det = found[j]
            for a in table:
                want = getattr(sprite, a)
                # An unstated position or size of one object of the prompt is not checked.
                table[a].append(det.found and (want is None or getattr(det, a) == want))
        hits = sum(map(sum, table.values()))
        if hits > best_hits:
            best, best_hits = table, hits
    return best


def _summarise(samples: list[dict]) -> dict:
    accuracy: dict[str, list[bool]] = {}
    for s in samples:
        for a, ok in s["correct"].items():
            accuracy.setdefault(a, []).append(ok)
    n = max(len(samples), 1)
    return {
        "all_correct": sum(s["all_correct"] for s in samples) / n,
        "accuracy": {a: sum(v) / len(v) for a, v in accuracy.items()},
        "score": sum(s["score"] for s in samples) / n,
        "num_samples": len(samples),
        "samples": samples,
    }


def _finish(prompt: str, table: dict[str, list[bool]], detections, motion=None) -> dict:
    correct = {a: all(v) for a, v in table.items()}
    if motion is not None:
        correct["motion"] = motion
    # The reward counts every (object, attribute) pair, so half-right two-object images score
    # between the extremes instead of at zero.
    pairs = [ok for v in table.values() for ok in v] + ([motion] if motion is not None else [])
    return {
        "prompt": prompt,
        "correct": correct,
        "all_correct": all(correct.values()),
        "score": sum(pairs) / len(pairs),
        "detections": detections,
    }


def _scenes(prompts, batch: int) -> list[Scene]:
    if isinstance(prompts, (str, Scene)):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) != batch:
        raise InvalidInputError(f"Got {batch} images or videos but {len(prompts)} prompts; "
                                "pass one prompt per sample.")
    return [as_scene(p) for p in prompts]


def evaluate_images(images: torch.Tensor, prompts: Sequence[str | Scene]) -> dict:
    """Scores still images against still-scene prompts. See :func:`evaluate`."""
    images = _check_pixels(images, 4, "`images`")
    scenes = _scenes(prompts, images.shape[0])
    for p, sc in zip(prompts, scenes):
        if sc.is_video:
            raise InvalidInputError(f"The prompt {p!r} describes a video; pass videos "
                                    "(B, T, 3, H, W) to score it.")
    reading = _Reading(_read(images, torch.tensor([len(sc.sprites) for sc in scenes])))
    samples = []
    for i, sc in enumerate(scenes):
        dets = [reading.detection(i, k) for k in range(len(sc.sprites))]
        samples.append(_finish(sc.caption(), _match(sc, dets, _attributes(sc)), dets))
    return _summarise(samples)


def _motion(read: dict[str, torch.Tensor], b: int, t: int) -> list[str | None]:
    """The direction each video moves (or None), from its centroids' least-squares slope."""
    found = read["found"][:, 0].view(b, t).float()
    cen = read["centroid"][:, 0].view(b, t, 2)
    time = torch.arange(t, dtype=torch.float32).expand(b, t)
    wsum = found.sum(1).clamp_min(1)
    t_mean = (found * time).sum(1) / wsum
    c_mean = (found[..., None] * cen).sum(1) / wsum[:, None]
    dt = (time - t_mean[:, None]) * found
    slope = ((dt[..., None] * (cen - c_mean[:, None])).sum(1)
             / dt.pow(2).sum(1).clamp_min(1e-6)[:, None])
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


def evaluate_videos(videos: torch.Tensor, prompts: Sequence[str | Scene]) -> dict:
    """Scores videos against moving-scene prompts. See :func:`evaluate`.

    A video's detection carries the majority colour, shape and size over the frames where the
    sprite was found (it must be found in at least half of them), and the centroid, area and
    shape fit of the first such frame.
    """
    videos = _check_pixels(videos, 5, "`videos`")
    b, t = videos.shape[:2]
    if t < 2:
        raise InvalidInputError(f"A video needs at least 2 frames to show motion; got {t}.")
    scenes = _scenes(prompts, b)
    for p, sc in zip(prompts, scenes):
        if not sc.is_video:
            raise InvalidInputError(f"The prompt {p!r} has no motion; videos are scored against "
                                    "prompts such as 'a red circle moving right'.")
    read = _read(videos.flatten(0, 1), torch.ones(b * t, dtype=torch.long))
    motions = _motion(read, b, t)
    reading = _Reading(read)
    lists = reading.lists
    samples = []
    for i, sc in enumerate(scenes):
        present = [r for r in range(i * t, (i + 1) * t) if lists["found"][r][0]]
        if 2 * len(present) < t:
            det = Detection(found=False)
        else:
            det = reading.detection(present[0], 0)
            color, shape, size = (_majority([lists[key][r][0] for r in present])
                                  for key in ("color", "shape", "size"))
            det.color = _COLOR_NAMES[color] if color >= 0 else None
            det.shape, det.size, det.position = SHAPES[shape], _SIZE_NAMES[size], None
        motion = motions[i] if det.found else None
        sample = _finish(sc.caption(), _match(sc, [det], _attributes(sc)), [det],
                         motion=motion == sc.motion)
        sample["motion"] = motion
        samples.append(sample)
    return _summarise(samples)


def evaluate(pixels: torch.Tensor, prompts: Sequence[str | Scene]) -> dict:
    """Scores generated images or videos against their prompts, attribute by attribute.

    Args:
        pixels: images (B, 3, H, W) or videos (B, T, 3, H, W), floats in [0, 1].
        prompts: B captions of the toy grammar (or :class:`~visalign.toy.world.Scene` objects).

    Returns:
        A dict:

        - ``"all_correct"``: the fraction of samples with every stated attribute right;
        - ``"accuracy"``: per attribute (``color``, ``shape``, ``position``, ``size``,
          ``motion``), the fraction right among the samples whose prompt states it;
        - ``"score"``: the mean per-sample score (fraction of attributes right);
        - ``"num_samples"``;
        - ``"samples"``: per sample ``{"prompt", "correct": {attr: bool}, "all_correct",
          "score", "detections": [Detection, ...]}`` (videos also carry ``"motion"``).

    Raises:
        InvalidInputError: wrong shape or range, a prompt count that differs from B, an
            unparsable prompt, or a video prompt for images (and vice versa).
    """
    if isinstance(pixels, torch.Tensor) and pixels.ndim == 5:
        return evaluate_videos(pixels, prompts)
    return evaluate_images(pixels, prompts)


class ToyEvaluatorReward(Reward):
    """The exact evaluator as a reward: ``reward(pixels, prompts) -> Tensor[B]`` in [0, 1].

    Each sample scores the fraction of its (object, attribute) pairs that are right, so a
    one-object prompt with colour, shape and position scores 0, 1/3, 2/3 or 1. It takes images
    (B, 3, H, W) and videos (B, T, 3, H, W). It is not differentiable: use it with GRPO-style
    algorithms, steering, or to check what a learned reward is really rewarding.

    Args:
        all_or_nothing (`bool`, defaults to `False`): score 1 only when every attribute is
            right, else 0 (GenEval's metric).
        name (`str`, *optional*): the name in logs; defaults to ``"toy_evaluator"``.
        batch_size (`int`, *optional*): the most samples evaluated at once.

    Example::

        reward = ToyEvaluatorReward()
        reward(render_batch(["a red circle on the left"]), ["a red square on the left"])
        # tensor([0.6667]): colour and position right, shape wrong
    """

    default_name = "toy_evaluator"
    default_differentiable = False
    input_kind = "any"

    def __init__(self, all_or_nothing: bool = False, *, name: str | None = None,
                 batch_size: int | None = None):
        super().__init__(name=name, differentiable=False, batch_size=batch_size)
        self.all_or_nothing = bool(all_or_nothing)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        samples = evaluate(images, prompts)["samples"]
        key = "all_correct" if self.all_or_nothing else "score"
        return torch.tensor([float(s[key]) for s in samples], dtype=torch.float32,
                            device=images.device)

    def extra_repr(self) -> str:
        return f"all_or_nothing={self.all_or_nothing}, " + super().extra_repr()
