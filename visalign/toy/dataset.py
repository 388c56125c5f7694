"""Random toy-world scenes for training: seeded draws and a ``Dataset`` of their renders.

:func:`sample_scenes` draws scenes with every attribute uniform, deterministically from a seed
(the same seed gives the same list on any machine); :class:`ToyDataset` wraps such a list and
renders each item on access, as an image (:mod:`visalign.toy.raster`) or a video
(:mod:`visalign.toy.video`) with its caption.

Example::

    from visalign.toy import ToyDataset, sample_scenes

    scenes = sample_scenes(64, seed=0, sizes=True, backgrounds=True)
    images, captions = next(iter(torch.utils.data.DataLoader(ToyDataset(1000), batch_size=64)))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from visalign.errors import InvalidInputError
from visalign.toy.raster import render
from visalign.toy.video import render_video
from visalign.toy.world import (
    BACKGROUNDS,
    CAPTION_SIZES,
    COLORS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    TWO_SHAPE_POSITIONS,
    Scene,
    Sprite,
)


def sample_scenes(
    n: int,
    seed: int = 0,
    *,
    sizes: bool = False,
    backgrounds: bool = False,
    two_shapes: bool = False,
    video: bool = False,
) -> list[Scene]:
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
            scenes.append(
                Scene.single(
                    pick(SHAPES), pick(list(COLORS)), None, pick(size_opts), background=bg, motion=pick(list(MOTIONS))
                )
            )
        elif two_shapes and rng.random() < 0.5:
            positions = list(pick(TWO_SHAPE_POSITIONS))
            rng.shuffle(positions)
            c1, c2 = rng.choice(len(COLORS), size=2, replace=False)
            colors = list(COLORS)
            scenes.append(
                Scene(
                    tuple(
                        Sprite(pick(SHAPES), colors[int(c)], p, pick(size_opts)) for c, p in zip((c1, c2), positions)
                    ),
                    background=bg,
                )
            )
        else:
            scenes.append(
                Scene.single(pick(SHAPES), pick(list(COLORS)), pick(list(POSITIONS)), pick(size_opts), background=bg)
            )
    return scenes


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
        self.scenes = sample_scenes(
            self.num_samples,
            self.seed,
            sizes=self.sizes,
            backgrounds=self.backgrounds,
            two_shapes=self.two_shapes,
            video=self.video,
        )

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scenes[index]
        if self.video:
            pixels = render_video(scene, num_frames=self.num_frames, size=self.size, antialias=self.antialias)
        else:
            pixels = render(scene, self.size, self.antialias)
        return pixels, scene.caption()

    def captions(self) -> list[str]:
        """The captions of all items, in order."""
        return [s.caption() for s in self.scenes]
