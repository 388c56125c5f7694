"""visalign's embedded toy world: captioned shape scenes, short videos and an exact evaluator.

No checkpoint can be downloaded everywhere, so visalign ships a world where "did the model get
better?" has an exact answer: scenes like "a red circle on the left" are rendered procedurally
and the evaluator reads colour, shape, position, size and motion back from generated pixels.

- :mod:`visalign.toy.world`: the vocabulary, :class:`Scene` / :class:`Sprite` and the caption
  grammar (:func:`parse_caption`, :func:`all_captions`);
- :mod:`visalign.toy.raster`: still images (:func:`render`, :func:`render_batch`) and the shape
  rasteriser :func:`~visalign.toy.raster.coverage`;
- :mod:`visalign.toy.video`: moving sprites (:func:`render_video`, :func:`first_frame`);
- :mod:`visalign.toy.dataset`: seeded random scenes and :class:`ToyDataset`;
- :mod:`visalign.toy.readout` and :mod:`visalign.toy.detection`: reading objects (and motion)
  from pixels (:func:`detect`);
- :mod:`visalign.toy.evaluator`: scoring pixels against prompts (:func:`evaluate`,
  :class:`ToyEvaluatorReward`).

Example::

    import visalign.toy as toy

    prompts = toy.all_captions()[:4]                  # 90 captions in all
    images = toy.render_batch(prompts)               # (4, 3, 32, 32) in [0, 1]
    toy.evaluate(images, prompts)["all_correct"]     # 1.0
    reward = toy.ToyEvaluatorReward()                # (images, prompts) -> Tensor[B]
"""

from visalign.toy.dataset import ToyDataset, sample_scenes
from visalign.toy.detection import Detection, detect
from visalign.toy.evaluator import ToyEvaluatorReward, evaluate, evaluate_images, evaluate_videos
from visalign.toy.raster import render, render_batch
from visalign.toy.video import first_frame, render_video, render_video_batch
from visalign.toy.world import (
    BACKGROUNDS,
    COLORS,
    GRAMMAR,
    MOTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    Sprite,
    all_captions,
    all_scenes,
    parse_caption,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "GRAMMAR",
    "MOTIONS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Detection",
    "Scene",
    "Sprite",
    "ToyDataset",
    "ToyEvaluatorReward",
    "all_captions",
    "all_scenes",
    "detect",
    "evaluate",
    "evaluate_images",
    "evaluate_videos",
    "first_frame",
    "parse_caption",
    "render",
    "render_batch",
    "render_video",
    "render_video_batch",
    "sample_scenes",
]
