"""The toy world: procedural captioned scenes of coloured shapes, as images and short videos.

Everything here is pure torch, deterministic and tiny (32×32 by default), so generators can be
trained on a CPU in minutes and :mod:`visalign.toy.evaluator` can read every attribute back from
the pixels exactly.

**Attributes.** A scene holds one *sprite* (or two, behind the ``two_shapes`` flag) on a light
plain background:

- shape: ``circle``, ``square``, ``triangle`` (isosceles, apex up, as wide as it is tall);
- colour: ``red``, ``green``, ``blue``, ``yellow``, ``orange``, ``purple`` (fixed RGB in
  :data:`COLORS`, chosen with well separated hues);
- position: ``left``, ``right``, ``top``, ``bottom``, ``center`` (anchors in :data:`POSITIONS`);
- size (optional): ``small`` or ``large``; an unstated size renders at the medium scale;
- background: white or one of a few light tints (:data:`BACKGROUNDS`). It is never captioned.

Videos show one sprite that starts in the centre and travels a quarter of the frame ``left``,
``right``, ``up`` or ``down`` (:data:`MOTIONS`); frame 0 is the I2V first frame.

**Caption grammar** (also in :data:`GRAMMAR`)::

    caption := object | object " and " object | object " moving " motion
    object  := ("a" | "an") [size " "] colour " " shape [" " where]
    where   := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"

e.g. "a red circle on the left", "a large blue square in the center",
"a red circle on the left and a blue square on the right", "an orange triangle moving up".
Two-shape scenes need two different colours and opposite positions (left/right or top/bottom), so
the shapes never touch and the evaluator can tell them apart by hue. A video caption has no
position. Without ``where`` the position is unstated: the sprite renders in the centre and the
evaluator does not check it.

Counts: 90 single-shape captions (270 with sizes), 540 two-shape ones (4,860 with sizes),
72 video captions (216 with sizes); see :func:`all_captions`.

Example::

    from visalign.toy import parse_caption, render, render_video, sample_scenes

    image = render("a red circle on the left")              # (3, 32, 32) in [0, 1]
    video = render_video(parse_caption("a blue square moving right"))   # (8, 3, 32, 32)
    scenes = sample_scenes(64, seed=0, sizes=True, backgrounds=True)
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from visalign.errors import InvalidInputError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Fully saturated-ish colours whose hues are at least ~25 degrees apart (red 0, orange 30,
# yellow 56, green 130, blue 228, purple 285), so a hue read-out separates them even when a
# generated image is off by a little.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.90, 0.10),
    "orange": (1.00, 0.50, 0.00),
    "purple": (0.60, 0.15, 0.75),
}
# Anchor of each position as (x, y) fractions of the image; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Half-extent of the sprite's bounding box as a fraction of the image side. "medium" is what an
# unstated size renders at; it is never written in a caption.
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.13, "large": 0.18}
CAPTION_SIZES: tuple[str, ...] = ("small", "large")
# Unit direction (dx, dy) of each motion, in image coordinates (y down).
MOTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
}
# How far a video's sprite travels from the centre, as a fraction of the image side.
TRAVEL = 0.25
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "cream": (0.99, 0.96, 0.86),
    "grey": (0.92, 0.92, 0.92),
    "sky": (0.87, 0.93, 0.99),
    "rose": (0.99, 0.91, 0.93),
    "mint": (0.89, 0.97, 0.91),
}
# Only opposite positions may share a scene: their anchors are half an image apart, so even two
# large sprites keep a gap and every pixel belongs to exactly one of them.
TWO_SHAPE_POSITIONS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

GRAMMAR = (
    'caption := object | object " and " object | object " moving " motion\n'
    'object  := ("a" | "an") [size " "] colour " " shape [" " where]\n'
    f"size    := {' | '.join(CAPTION_SIZES)}\n"
    f"colour  := {' | '.join(COLORS)}\n"
    f"shape   := {' | '.join(SHAPES)}\n"
    f"where   := {' | '.join(f'{chr(34)}{p}{chr(34)}' for p in POSITION_PHRASES.values())}\n"
    f"motion  := {' | '.join(MOTIONS)}\n"
    "Two objects need different colours and opposite positions (left/right or top/bottom); "
    "a video caption (with 'moving') has one object and no position."
)


def _check(value, allowed, what: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise InvalidInputError(
            f"Unknown {what} {value!r}; expected one of {sorted(allowed)}"
            + (" or None" if optional else "") + "."
        )


@dataclass(frozen=True)
class Sprite:
    """One coloured shape in a scene.

    Args:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS`.
        position: one of :data:`POSITIONS`, or ``None`` when the caption does not say (it then
            renders in the centre and the evaluator does not check it).
        size: ``"small"``, ``"large"`` or ``None`` (unstated: renders at the medium scale).
    """

    shape: str
    color: str
    position: str | None = None
    size: str | None = None

    def __post_init__(self):
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "colour")
        _check(self.position, POSITIONS, "position", optional=True)
        _check(self.size, CAPTION_SIZES, "size", optional=True)

    def phrase(self) -> str:
        """The caption phrase of this sprite, e.g. ``"an orange square on the left"``."""
        words = ([self.size] if self.size else []) + [self.color, self.shape]
        article = "an" if words[0][0] in "aeiou" else "a"
        text = " ".join([article, *words])
        if self.position is not None:
            text += " " + POSITION_PHRASES[self.position]
        return text


@dataclass(frozen=True)
class Scene:
    """A captioned scene: one or two sprites on a background, optionally moving (a video).

    Args:
        sprites: one :class:`Sprite`, or two with different colours at opposite positions.
        background: a key of :data:`BACKGROUNDS`. It is not part of the caption.
        motion: ``None`` for a still image, else one of :data:`MOTIONS`; a moving scene has a
            single sprite with no position (videos start in the centre).

    Use :meth:`Scene.single` for the common one-sprite case.
    """

    sprites: tuple[Sprite, ...]
    background: str = "white"
    motion: str | None = None

    def __post_init__(self):
        sprites = (self.sprites,) if isinstance(self.sprites, Sprite) else tuple(self.sprites)
        object.__setattr__(self, "sprites", sprites)
        if not 1 <= len(sprites) <= 2 or not all(isinstance(s, Sprite) for s in sprites):
            raise InvalidInputError(
                f"A scene holds one or two Sprite objects; got {self.sprites!r}."
            )
        _check(self.background, BACKGROUNDS, "background")
        _check(self.motion, MOTIONS, "motion", optional=True)
        if len(sprites) == 2:
            a, b = sprites
            if a.color == b.color:
                raise InvalidInputError(
                    f"The two sprites of a scene need different colours; both are {a.color!r}."
                )
            pair = {a.position, b.position}
            if not any(pair == set(p) for p in TWO_SHAPE_POSITIONS):
                raise InvalidInputError(
                    f"Two sprites need opposite positions (left/right or top/bottom); got "
                    f"{a.position!r} and {b.position!r}."
                )
        if self.motion is not None and (len(sprites) != 1 or sprites[0].position is not None):
            raise InvalidInputError(
                "A moving scene (a video) has exactly one sprite and no position: it always "
                f"starts in the centre. Got sprites {sprites!r} with motion {self.motion!r}."
            )

    @classmethod
    def single(cls, shape: str, color: str, position: str | None = None, size: str | None = None,
               *, background: str = "white", motion: str | None = None) -> "Scene":
        """A one-sprite scene, e.g. ``Scene.single("circle", "red", "left")``."""
        return cls((Sprite(shape, color, position, size),), background=background, motion=motion)

    @property
    def is_video(self) -> bool:
        return self.motion is not None

    def caption(self) -> str:
        """The scene's caption in the world's grammar (the background is never mentioned)."""
        text = " and ".join(s.phrase() for s in self.sprites)
        return text + (f" moving {self.motion}" if self.motion else "")


# ----------------------------------------------------------------------------- parsing

_WHERE = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_OBJECT_RE = re.compile(
    r"(?:a|an) (?:(?P<size>{sizes}) )?(?P<color>{colors}) (?P<shape>{shapes})"
    r"(?: (?P<where>{where}))?".format(
        sizes="|".join(CAPTION_SIZES), colors="|".join(COLORS), shapes="|".join(SHAPES),
        where="|".join(re.escape(p) for p in POSITION_PHRASES.values()),
    )
)


def parse_caption(text: str) -> Scene:
    """Parses a caption of the world's grammar into a :class:`Scene` (white background).

    Case, surrounding spaces, repeated spaces and a final full stop are ignored.

    Args:
        text: e.g. ``"a red circle on the left"`` or ``"a blue square moving up"``.

    Returns:
        The scene; ``parse_caption(s.caption()) == s`` for any white-background scene ``s``.

    Raises:
        InvalidInputError: the text does not follow :data:`GRAMMAR` (the message lists it).
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"A caption must be a string; got {type(text).__name__}.")
    clean = " ".join(text.strip().lower().rstrip(".").split())
    motion = None
    m = re.fullmatch(r"(.*) moving (\w+)", clean)
    if m and m.group(2) in MOTIONS:
        clean, motion = m.group(1), m.group(2)
    sprites = []
    for part in clean.split(" and "):
        om = _OBJECT_RE.fullmatch(part)
        if om is None:
            raise InvalidInputError(
                f"Cannot parse the caption {text!r}: {part!r} is not an object of the toy "
                f"world. Captions follow this grammar:\n{GRAMMAR}\n"
                'For example "a red circle on the left" or "a large blue square moving up".'
            )
        where = om.group("where")
        sprites.append(Sprite(om.group("shape"), om.group("color"),
                              _WHERE[where] if where else None, om.group("size")))
    try:
        return Scene(tuple(sprites), motion=motion)
    except InvalidInputError as exc:
        raise InvalidInputError(f"The caption {text!r} describes an impossible scene: {exc}\n"
                                f"Captions follow this grammar:\n{GRAMMAR}") from None


def as_scene(scene: Scene | str) -> Scene:
    """Returns ``scene`` itself, or the parsed scene when it is a caption string."""
    return scene if isinstance(scene, Scene) else parse_caption(scene)


# ----------------------------------------------------------------------------- enumeration

def all_scenes(*, sizes: bool = False, two_shapes: bool = False,
               video: bool = False) -> list[Scene]:
    """Every distinct scene of the grammar (white background, positions stated), in a fixed order.

    Args:
        sizes: also the "small" and "large" variants of every object.
        two_shapes: also the two-shape scenes (listed once, the left/top sprite first).
        video: the moving-sprite scenes instead of the still ones.
    """
    size_opts = (None, *CAPTION_SIZES) if sizes else (None,)
    if video:
        if two_shapes:
            raise InvalidInputError("Videos have a single sprite; `two_shapes` must be False.")
        return [Scene.single(sh, c, None, sz, motion=m)
                for m, sh, c, sz in itertools.product(MOTIONS, SHAPES, COLORS, size_opts)]
    out = [Scene.single(sh, c, p, sz)
           for p, sh, c, sz in itertools.product(POSITIONS, SHAPES, COLORS, size_opts)]
    if two_shapes:
        for (p1, p2), (c1, c2) in itertools.product(TWO_SHAPE_POSITIONS,
                                                    itertools.permutations(COLORS, 2)):
            for s1, s2, z1, z2 in itertools.product(SHAPES, SHAPES, size_opts, size_opts):
                out.append(Scene((Sprite(s1, c1, p1, z1), Sprite(s2, c2, p2, z2))))
    return out


def all_captions(*, sizes: bool = False, two_shapes: bool = False,
                 video: bool = False) -> list[str]:
    """The captions of :func:`all_scenes`: 90 by default (3 shapes × 6 colours × 5 positions)."""
    return [s.caption() for s in all_scenes(sizes=sizes, two_shapes=two_shapes, video=video)]


def sample_scenes(n: int, seed: int = 0, *, sizes: bool = False, backgrounds: bool = False,
                  two_shapes: bool = False, video: bool = False) -> list[Scene]:
    """Draws ``n`` scenes with every attribute uniform, deterministically from ``seed``.

    Args:
        n: how many scenes.
        seed: the seed of a ``numpy.random.Generator``; the same seed gives the same list.
        sizes: draw the size from {unstated, small, large} instead of always unstated.
        backgrounds: draw the background from :data:`BACKGROUNDS` instead of white.
        two_shapes: make half of the scenes two-shape scenes.
        video: draw moving scenes (for :func:`render_video`) instead of still ones.
    """
    if video and two_shapes:
        raise InvalidInputError("Videos have a single sprite; `two_shapes` must be False.")
    if int(n) < 0:
        raise InvalidInputError(f"`n` must be a count >= 0; got {n!r}.")
    rng = np.random.default_rng(seed)
    size_opts = (None, *CAPTION_SIZES) if sizes else (None,)
    bgs = list(BACKGROUNDS) if backgrounds else ["white"]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731 - keeps draws in one order
    scenes = []
    for _ in range(int(n)):
        bg = pick(bgs)
        if video:
            scenes.append(Scene.single(pick(SHAPES), pick(list(COLORS)), None, pick(size_opts),
                                       background=bg, motion=pick(list(MOTIONS))))
        elif two_shapes and rng.random() < 0.5:
            positions = list(pick(TWO_SHAPE_POSITIONS))
            rng.shuffle(positions)
            c1, c2 = rng.choice(len(COLORS), size=2, replace=False)
            colors = list(COLORS)
            scenes.append(Scene(tuple(
                Sprite(pick(SHAPES), colors[int(c)], p, pick(size_opts))
                for c, p in zip((c1, c2), positions)), background=bg))
        else:
            scenes.append(Scene.single(pick(SHAPES), pick(list(COLORS)), pick(list(POSITIONS)),
                                       pick(size_opts), background=bg))
    return scenes


# ----------------------------------------------------------------------------- rendering

def coverage(shape: str, cx, cy, r, height: int, width: int,
             antialias: bool = True) -> torch.Tensor:
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
            rows = [i for i, (sprites, _, _) in enumerate(items)
                    if len(sprites) > slot and sprites[slot].shape == shape]
            if not rows:
                continue
            sprites = [items[i][0][slot] for i in rows]
            centers = torch.tensor([items[i][1][slot] for i in rows]) * size
            radius = torch.tensor([SIZES[sp.size or "medium"] for sp in sprites]) * size
            alpha[rows] = coverage(shape, centers[:, 0], centers[:, 1], radius, size, size,
                                   antialias)
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


def render_batch(scenes: Sequence[Scene | str], size: int = 32,
                 antialias: bool = True) -> torch.Tensor:
    """Renders still scenes (or captions) into a (B, 3, size, size) tensor; see :func:`render`."""
    if len(scenes) == 0:
        raise InvalidInputError("`render_batch` needs at least one scene.")
    return _draw([_still(as_scene(s)) for s in scenes], _validate_size(size), antialias)


def _video(scene: Scene | str, motion: str | None, num_frames: int) -> list[_Layer]:
    scene = as_scene(scene)
    motion = motion if motion is not None else scene.motion
    if motion is None:
        raise InvalidInputError(
            f"Rendering a video needs a motion: pass motion= one of {list(MOTIONS)} or a scene "
            f"such as 'a red circle moving right'; got the still scene {scene.caption()!r}."
        )
    scene = Scene(scene.sprites, scene.background, motion)  # validates: one sprite, no position
    if not isinstance(num_frames, int) or num_frames < 2:
        raise InvalidInputError(f"`num_frames` must be an int of at least 2; got {num_frames!r}.")
    (dx, dy), (x0, y0) = MOTIONS[motion], POSITIONS["center"]
    steps = [TRAVEL * t / (num_frames - 1) for t in range(num_frames)]
    return [(scene.sprites, [(x0 + dx * st, y0 + dy * st)], scene.background) for st in steps]


def render_video(scene: Scene | str, motion: str | None = None, num_frames: int = 8,
                 size: int = 32, antialias: bool = True) -> torch.Tensor:
    """Renders a video of one sprite travelling from the centre in a direction.

    The sprite moves :data:`TRAVEL` (a quarter) of the frame at constant speed, from the centre
    in frame 0 to the end in the last frame. Any ``num_frames`` ≥ 2 works (Wan-style models want
    4k+1 frames, e.g. 9).

    Args:
        scene: a one-sprite :class:`Scene` or caption without a position, e.g.
            ``"a red circle moving right"``.
        motion: the direction; ``None`` uses ``scene.motion``. It overrides ``scene.motion``.
        num_frames: the number of frames T.
        size: the side of each frame in pixels.
        antialias: as in :func:`render`.

    Returns:
        A float32 tensor (T, 3, size, size) in [0, 1].
    """
    return _draw(_video(scene, motion, num_frames), _validate_size(size), antialias)


def render_video_batch(scenes: Sequence[Scene | str], num_frames: int = 8, size: int = 32,
                       antialias: bool = True) -> torch.Tensor:
    """Renders moving scenes (or captions) into a (B, T, 3, size, size) tensor."""
    if len(scenes) == 0:
        raise InvalidInputError("`render_video_batch` needs at least one scene.")
    layers = [layer for s in scenes for layer in _video(s, None, num_frames)]
    frames = _draw(layers, _validate_size(size), antialias)
    return frames.view(len(scenes), num_frames, *frames.shape[1:])


def first_frame(scene: Scene | str, size: int = 32, antialias: bool = True) -> torch.Tensor:
    """The I2V conditioning image of a video scene: its frame 0, (3, size, size).

    Every video starts in the centre, so the first frame alone does not reveal the direction:
    an I2V model has to read it from the caption.
    """
    scene = as_scene(scene)
    return render(Scene(scene.sprites, scene.background), size, antialias)


# ----------------------------------------------------------------------------- dataset

@dataclass
class ToyDataset(torch.utils.data.Dataset):
    """A fixed, seeded list of scenes that yields ``(pixels, caption)`` pairs.

    Items are rendered on access, so the dataset is cheap to build; item ``i`` is the same for
    the same arguments on any machine.

    Args:
        num_samples: the number of items.
        seed: seeds :func:`sample_scenes`.
        size: the image side in pixels.
        sizes, backgrounds, two_shapes: as in :func:`sample_scenes`.
        video: yield videos (T, 3, size, size) instead of images (3, size, size).
        num_frames: T for videos.
        antialias: as in :func:`render`.

    Example::

        ds = ToyDataset(1000, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
        images, captions = next(iter(loader))   # (64, 3, 32, 32), a list of 64 strings
    """

    num_samples: int
    seed: int = 0
    size: int = 32
    sizes: bool = False
    backgrounds: bool = False
    two_shapes: bool = False
    video: bool = False
    num_frames: int = 8
    antialias: bool = True
    scenes: list[Scene] = field(init=False, repr=False)

    def __post_init__(self):
        self.scenes = sample_scenes(self.num_samples, self.seed, sizes=self.sizes,
                                    backgrounds=self.backgrounds, two_shapes=self.two_shapes,
                                    video=self.video)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scenes[index]
        if self.video:
            pixels = render_video(scene, num_frames=self.num_frames, size=self.size,
                                  antialias=self.antialias)
        else:
            pixels = render(scene, self.size, self.antialias)
        return pixels, scene.caption()

    def captions(self) -> list[str]:
        """The captions of all items, in order."""
        return [s.caption() for s in self.scenes]
