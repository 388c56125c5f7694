"""The toy world's vocabulary, scenes and caption grammar: what a scene is and how it is written.

A scene holds one *sprite* (or two, behind the ``two_shapes`` flag) on a light plain background:

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

The rest of the world builds on these scenes, all in pure torch, deterministic and tiny (32×32 by
default) so generators train on a CPU in minutes: :mod:`visalign.toy.raster` draws still images,
:mod:`visalign.toy.video` moving sprites, :mod:`visalign.toy.dataset` draws random scenes for
training, and :mod:`visalign.toy.evaluator` reads every attribute back from the pixels exactly.

Example::

    from visalign.toy import parse_caption, render, render_video, sample_scenes

    image = render("a red circle on the left")              # (3, 32, 32) in [0, 1]
    video = render_video(parse_caption("a blue square moving right"))   # (8, 3, 32, 32)
    scenes = sample_scenes(64, seed=0, sizes=True, backgrounds=True)
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

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
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
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
            f"Unknown {what} {value!r}; expected one of {sorted(allowed)}" + (" or None" if optional else "") + "."
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
            raise InvalidInputError(f"A scene holds one or two Sprite objects; got {self.sprites!r}.")
        _check(self.background, BACKGROUNDS, "background")
        _check(self.motion, MOTIONS, "motion", optional=True)
        if len(sprites) == 2:
            a, b = sprites
            if a.color == b.color:
                raise InvalidInputError(f"The two sprites of a scene need different colours; both are {a.color!r}.")
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
    def single(
        cls,
        shape: str,
        color: str,
        position: str | None = None,
        size: str | None = None,
        *,
        background: str = "white",
        motion: str | None = None,
    ) -> Scene:
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
        sizes="|".join(CAPTION_SIZES),
        colors="|".join(COLORS),
        shapes="|".join(SHAPES),
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
        sprites.append(Sprite(om.group("shape"), om.group("color"), _WHERE[where] if where else None, om.group("size")))
    try:
        return Scene(tuple(sprites), motion=motion)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"The caption {text!r} describes an impossible scene: {exc}\nCaptions follow this grammar:\n{GRAMMAR}"
        ) from None


def as_scene(scene: Scene | str) -> Scene:
    """Returns ``scene`` itself, or the parsed scene when it is a caption string."""
    return scene if isinstance(scene, Scene) else parse_caption(scene)


# ----------------------------------------------------------------------------- enumeration


def all_scenes(*, sizes: bool = False, two_shapes: bool = False, video: bool = False) -> list[Scene]:
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
        return [
            Scene.single(sh, c, None, sz, motion=m)
            for m, sh, c, sz in itertools.product(MOTIONS, SHAPES, COLORS, size_opts)
        ]
    out = [Scene.single(sh, c, p, sz) for p, sh, c, sz in itertools.product(POSITIONS, SHAPES, COLORS, size_opts)]
    if two_shapes:
        for (p1, p2), (c1, c2) in itertools.product(TWO_SHAPE_POSITIONS, itertools.permutations(COLORS, 2)):
            for s1, s2, z1, z2 in itertools.product(SHAPES, SHAPES, size_opts, size_opts):
                out.append(Scene((Sprite(s1, c1, p1, z1), Sprite(s2, c2, p2, z2))))
    return out


def all_captions(*, sizes: bool = False, two_shapes: bool = False, video: bool = False) -> list[str]:
    """The captions of :func:`all_scenes`: 90 by default (3 shapes × 6 colours × 5 positions)."""
    return [s.caption() for s in all_scenes(sizes=sizes, two_shapes=two_shapes, video=video)]
