"""Toy-world videos: one sprite travelling from the centre of the frame in a caption's direction.

A moving :class:`~visalign.toy.world.Scene` (``"a red circle moving right"``) renders as a clip
whose frame 0 has the sprite in the centre and whose last frame has it :data:`TRAVEL` of the
frame further on; :func:`first_frame` is that frame 0, the I2V conditioning image. Frames are
painted by the still-image painter of :mod:`visalign.toy.raster`.

Example::

    from visalign.toy import first_frame, render_video, render_video_batch

    video = render_video("a blue square moving right")          # (8, 3, 32, 32) in [0, 1]
    clips = render_video_batch(["a red circle moving up"], num_frames=9)   # (1, 9, 3, 32, 32)
    image = first_frame("a red circle moving up")               # (3, 32, 32)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from visalign.errors import InvalidInputError
from visalign.toy.raster import _draw, _Layer, _validate_size, render
from visalign.toy.world import MOTIONS, POSITIONS, Scene, as_scene

# How far a video's sprite travels from the centre, as a fraction of the image side.
TRAVEL = 0.25


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


def render_video(
    scene: Scene | str, motion: str | None = None, num_frames: int = 8, size: int = 32, antialias: bool = True
) -> torch.Tensor:
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


def render_video_batch(
    scenes: Sequence[Scene | str], num_frames: int = 8, size: int = 32, antialias: bool = True
) -> torch.Tensor:
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
