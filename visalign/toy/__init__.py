"""visalign's embedded toy world: captioned shape scenes, short videos and an exact evaluator.

No checkpoint can be downloaded everywhere, so visalign ships a world where "did the model get
better?" has an exact answer: scenes like "a red circle on the left" are rendered procedurally
(:mod:`visalign.toy.world`) and :mod:`visalign.toy.evaluator` reads colour, shape, position,
size and motion back from generated pixels.

Example::

    import visalign.toy as toy

    prompts = toy.all_captions()[:4]                  # 90 captions in all
    images = toy.render_batch(prompts)               # (4, 3, 32, 32) in [0, 1]
    toy.evaluate(images, prompts)["all_correct"]     # 1.0
    reward = toy.ToyEvaluatorReward()                # (images, prompts) -> Tensor[B]
"""

from visalign.toy.evaluator import (
    Detection,
    ToyEvaluatorReward,
    detect,
    evaluate,
    evaluate_images,
    evaluate_videos,
)
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
    ToyDataset,
    all_captions,
    all_scenes,
    first_frame,
    parse_caption,
    render,
    render_batch,
    render_video,
    render_video_batch,
    sample_scenes,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "GRAMMAR", "MOTIONS", "POSITIONS", "SHAPES", "SIZES",
    "Detection", "Scene", "Sprite", "ToyDataset", "ToyEvaluatorReward",
    "all_captions", "all_scenes", "detect", "evaluate", "evaluate_images", "evaluate_videos",
    "first_frame", "parse_caption", "render", "render_batch", "render_video",
    "render_video_batch", "sample_scenes",
]
