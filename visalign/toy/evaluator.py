"""The exact evaluator of the toy world: it scores generated pixels against their prompts.

Given images (B, 3, H, W) or videos (B, T, 3, H, W) in [0, 1] and their captions (see
:mod:`visalign.toy.world` for the grammar), :func:`evaluate` says, per sample and per attribute,
whether the pixels show what the caption asks for, and summarises it in the GenEval style:
per-attribute accuracy and the fraction of samples with every attribute right.
:class:`ToyEvaluatorReward` is the same score as a reward.

The pixels are read by :mod:`visalign.toy.readout` (colour, shape, position and size of up to two
objects per image; the docstring there says how) and :mod:`visalign.toy.detection` (named
:class:`~visalign.toy.detection.Detection` records, and motion for videos). Size is checked
only when the caption states it, position only for still scenes whose caption states it, and
motion for videos.

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
from collections.abc import Sequence

import torch

from visalign.errors import InvalidInputError
from visalign.rewards.base import Reward
from visalign.toy.detection import Detection, _check_pixels, _detect_videos, _Reading
from visalign.toy.readout import _read
from visalign.toy.world import Scene, as_scene


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
        raise InvalidInputError(f"Got {batch} images or videos but {len(prompts)} prompts; pass one prompt per sample.")
    return [as_scene(p) for p in prompts]


def evaluate_images(images: torch.Tensor, prompts: Sequence[str | Scene]) -> dict:
    """Scores still images against still-scene prompts. See :func:`evaluate`."""
    images = _check_pixels(images, 4, "`images`")
    scenes = _scenes(prompts, images.shape[0])
    for p, sc in zip(prompts, scenes):
        if sc.is_video:
            raise InvalidInputError(f"The prompt {p!r} describes a video; pass videos (B, T, 3, H, W) to score it.")
    reading = _Reading(_read(images, torch.tensor([len(sc.sprites) for sc in scenes])))
    samples = []
    for i, sc in enumerate(scenes):
        dets = [reading.detection(i, k) for k in range(len(sc.sprites))]
        samples.append(_finish(sc.caption(), _match(sc, dets, _attributes(sc)), dets))
    return _summarise(samples)


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
            raise InvalidInputError(
                f"The prompt {p!r} has no motion; videos are scored against "
                "prompts such as 'a red circle moving right'."
            )
    detections, motions = _detect_videos(videos)
    samples = []
    for sc, det, motion in zip(scenes, detections, motions):
        sample = _finish(sc.caption(), _match(sc, [det], _attributes(sc)), [det], motion=motion == sc.motion)
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

    def __init__(self, all_or_nothing: bool = False, *, name: str | None = None, batch_size: int | None = None):
        super().__init__(name=name, differentiable=False, batch_size=batch_size)
        self.all_or_nothing = bool(all_or_nothing)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        samples = evaluate(images, prompts)["samples"]
        key = "all_correct" if self.all_or_nothing else "score"
        return torch.tensor([float(s[key]) for s in samples], dtype=torch.float32, device=images.device)

    def extra_repr(self) -> str:
        return f"all_or_nothing={self.all_or_nothing}, " + super().extra_repr()
