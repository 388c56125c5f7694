"""The exact evaluator: 100% on clean renders, robust to noise, flags exactly what is wrong."""

import random

import pytest
import torch
import torch.nn.functional as F

from visalign.errors import InvalidInputError, NotDifferentiableError
from visalign.toy import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    Scene,
    Sprite,
    ToyEvaluatorReward,
    all_scenes,
    detect,
    evaluate,
    render_batch,
    render_video_batch,
    sample_scenes,
)
from visalign.toy.raster import coverage


def _on_backgrounds(scenes):
    """The scenes with the backgrounds cycled, so every tint is exercised."""
    names = list(BACKGROUNDS)
    return [Scene(s.sprites, names[i % len(names)], s.motion) for i, s in enumerate(scenes)]


def _pixels(scenes, antialias=True, size=32):
    if scenes[0].is_video:
        return render_video_batch(scenes, size=size, antialias=antialias)
    return render_batch(scenes, size=size, antialias=antialias)


def _noisy(x, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _exact(pixels, scenes):
    result = evaluate(pixels, [s.caption() for s in scenes])
    wrong = [s["prompt"] for s in result["samples"] if not s["all_correct"]]
    assert not wrong, f"{len(wrong)} wrong, e.g. {wrong[:3]}"
    assert result["all_correct"] == 1.0 and set(result["accuracy"].values()) == {1.0}
    return result


# Every caption: 270 single-shape and 4,860 two-shape ones with sizes stated or not, and 216
# videos. Faster tests use every single-shape caption with sizes (270), every two-shape one
# without sizes (540) and a seeded sample of the sized two-shape ones.
EVERY = _on_backgrounds(all_scenes(sizes=True, two_shapes=True))
SINGLE = _on_backgrounds(all_scenes(sizes=True))
TWO = _on_backgrounds([s for s in all_scenes(two_shapes=True) if len(s.sprites) == 2])
TWO_SIZED = _on_backgrounds(
    random.Random(0).sample([s for s in all_scenes(sizes=True, two_shapes=True) if len(s.sprites) == 2], 300)
)
VIDEOS = _on_backgrounds(all_scenes(sizes=True, video=True))


def test_exact_on_every_clean_image():
    assert len(EVERY) == 5130
    result = _exact(_pixels(EVERY), EVERY)
    assert set(result["accuracy"]) == {"color", "shape", "position", "size"}


def test_exact_on_clean_hard_edged_images():
    scenes = SINGLE + TWO + TWO_SIZED
    _exact(_pixels(scenes, antialias=False), scenes)


@pytest.mark.slow
def test_exact_on_every_clean_hard_edged_image():
    _exact(_pixels(EVERY, antialias=False), EVERY)


@pytest.mark.parametrize("antialias", [True, False], ids=["antialiased", "hard-edged"])
def test_exact_on_every_clean_video(antialias):
    result = _exact(_pixels(VIDEOS, antialias), VIDEOS)
    assert set(result["accuracy"]) == {"color", "shape", "motion", "size"}
    assert {s["motion"] for s in result["samples"]} == set(MOTIONS)


def test_exact_at_other_resolutions():
    scenes = SINGLE[::5] + TWO[::20]
    _exact(_pixels(scenes, size=64), scenes)
    _exact(_pixels(scenes, size=48), scenes)
    _exact(_pixels(VIDEOS[::6], size=64), VIDEOS[::6])


def test_robust_to_gaussian_noise():
    images = SINGLE + TWO + TWO_SIZED
    _exact(_noisy(_pixels(images), 0.05), images)
    _exact(_noisy(_pixels(VIDEOS), 0.05), VIDEOS)
    # Twice that noise still reads single shapes and videos exactly (seeded, so not flaky).
    _exact(_noisy(_pixels(SINGLE), 0.10, seed=1), SINGLE)
    _exact(_noisy(_pixels(VIDEOS), 0.10, seed=1), VIDEOS)


def test_robust_to_blur_and_dim_colours():
    """Generated images are soft and off-palette; mild versions of both still read exactly."""
    x = _pixels(SINGLE)
    r = 2
    kernel = torch.exp(-(torch.arange(-r, r + 1.0) ** 2) / (2 * 0.7**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    rows = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(3, 1, 1, -1), groups=3)
    blurred = F.conv2d(F.pad(rows, (0, 0, r, r), mode="replicate"), kernel.view(3, 1, -1, 1), groups=3)
    _exact(blurred, SINGLE)
    _exact(x * 0.8, SINGLE)


def _variant(scene, attribute, rng):
    """``scene`` with exactly one attribute of its first sprite changed (for two sprites, a
    position change swaps them)."""
    first, others = scene.sprites[0], scene.sprites[1:]
    if attribute == "motion":
        return Scene(scene.sprites, scene.background, rng.choice([m for m in MOTIONS if m != scene.motion]))
    if attribute == "position" and others:
        a, b = scene.sprites
        return Scene(
            (Sprite(a.shape, a.color, b.position, a.size), Sprite(b.shape, b.color, a.position, b.size)),
            scene.background,
        )
    choices = {
        "color": [c for c in COLORS if c not in {s.color for s in scene.sprites}],
        "shape": [s for s in SHAPES if s != first.shape],
        "position": [p for p in POSITIONS if p != first.position],
        "size": [z for z in ("small", "large") if z != first.size],
    }[attribute]
    changed = Sprite(**{**first.__dict__, attribute: rng.choice(choices)})
    return Scene((changed, *others), scene.background, scene.motion)


@pytest.mark.parametrize("kind", ["single", "two", "video"])
def test_flags_exactly_the_attribute_that_differs(kind):
    """Render scene A, score it against caption B that differs in one attribute: only that
    attribute is wrong."""
    rng = random.Random(0)
    if kind == "single":
        scenes = _on_backgrounds(all_scenes())  # all 90, no size stated
        scenes += sample_scenes(30, seed=1, sizes=True, backgrounds=True)
        attributes = ["color", "shape", "position", "size"]
    elif kind == "two":
        scenes = [
            s for s in sample_scenes(80, seed=2, sizes=True, backgrounds=True, two_shapes=True) if len(s.sprites) == 2
        ]
        attributes = ["color", "shape", "position", "size"]
    else:
        scenes = _on_backgrounds(all_scenes(video=True))  # all 72
        attributes = ["color", "shape", "motion", "size"]
    rendered, prompts, changed = [], [], []
    for i, scene in enumerate(scenes):
        for attribute in attributes:
            rendered.append(i)
            prompts.append(_variant(scene, attribute, rng).caption())
            changed.append(attribute)
    pixels = _pixels(scenes)[rendered]
    for sample, attribute in zip(evaluate(pixels, prompts)["samples"], changed):
        expected = {a: a != attribute for a in sample["correct"]}
        assert attribute in sample["correct"], sample["prompt"]
        assert sample["correct"] == expected, (sample["prompt"], sample["detections"])
        assert not sample["all_correct"] and 0 < sample["score"] < 1


def test_blank_and_missing_objects_score_zero():
    blank = torch.ones(2, 3, 32, 32)
    blank[1] = torch.tensor(BACKGROUNDS["mint"])[:, None, None]
    full = torch.tensor(COLORS["red"])[None, :, None, None].expand(1, 3, 32, 32)
    result = evaluate(torch.cat([blank, full]), ["a red circle on the left"] * 3)
    assert result["all_correct"] == 0 and result["score"] == 0
    for sample in result["samples"]:
        assert sample["score"] == 0 and not any(sample["correct"].values())
        assert not sample["detections"][0].found
    videos = torch.ones(2, 8, 3, 32, 32)
    assert ToyEvaluatorReward()(videos, ["a red circle moving up"] * 2).tolist() == [0, 0]
    # A still "video" shows no motion.
    still = render_batch(["a red circle"])[:, None].expand(1, 8, 3, 32, 32)
    sample = evaluate(still, ["a red circle moving up"])["samples"][0]
    assert sample["correct"] == {"color": True, "shape": True, "motion": False}
    assert sample["motion"] is None
    # A two-object prompt with one object drawn: the missing object's attributes are wrong.
    one = render_batch(["a red circle on the left"])
    prompt = "a red circle on the left and a blue square on the right"
    sample = evaluate(one, [prompt])["samples"][0]
    assert sample["score"] == 0.5 and not sample["all_correct"]
    assert [d.found for d in sample["detections"]] == [True, False]


def test_grey_shape_has_no_colour():
    alpha = coverage("square", 8.0, 16.0, 4.2, 32, 32)
    grey = (1 - alpha) + 0.45 * alpha
    sample = evaluate(grey.expand(1, 3, 32, 32), ["a red square on the left"])["samples"][0]
    assert sample["correct"] == {"color": False, "shape": True, "position": True}
    assert sample["detections"][0].color is None


def test_summary_and_detections():
    prompts = ["a red circle on the left", "a large blue square", "a green triangle at the top"]
    images = render_batch(
        ["a red circle on the left", "a large blue square in the center", "a green triangle at the bottom"]
    )
    result = evaluate(images, prompts)
    assert result["num_samples"] == 3
    assert result["all_correct"] == pytest.approx(2 / 3)
    assert result["accuracy"] == {"color": 1.0, "shape": 1.0, "position": 0.5, "size": 1.0}
    assert result["score"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert set(result["samples"][1]["correct"]) == {"color", "shape", "size"}  # no position stated
    det = result["samples"][2]["detections"][0]
    assert (det.found, det.color, det.shape, det.position, det.size) == (True, "green", "triangle", "bottom", "medium")
    assert max(det.shape_fit, key=det.shape_fit.get) == "triangle"
    two = detect(render_batch(["a red circle on the left and a blue square on the right"]), 2)[0]
    assert {(d.color, d.shape, d.position) for d in two} == {("red", "circle", "left"), ("blue", "square", "right")}


def test_reward():
    prompts = ["a red circle on the left", "a red square on the left", "a blue square at the top"]
    images = render_batch(["a red circle on the left"] * 3).requires_grad_()
    reward = ToyEvaluatorReward()
    scores = reward(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores.tolist() == pytest.approx([1, 2 / 3, 0])
    assert ToyEvaluatorReward(all_or_nothing=True)(images.detach(), prompts).tolist() == [1, 0, 0]
    assert not reward.differentiable
    with pytest.raises(NotDifferentiableError):
        scores.sum().backward()
    video = render_video_batch(["a red circle moving up"])
    assert reward(video, ["a red circle moving down"]).tolist() == pytest.approx([2 / 3])


def test_input_errors():
    image = render_batch(["a red circle"])
    with pytest.raises(InvalidInputError, match="shape"):
        evaluate(image.permute(0, 2, 3, 1), ["a red circle"])
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        evaluate(image * 2 - 1, ["a red circle"])
    with pytest.raises(InvalidInputError, match="prompts"):
        evaluate(image, ["a red circle", "a blue square"])
    with pytest.raises(InvalidInputError, match="grammar"):
        evaluate(image, ["a pink circle"])
    with pytest.raises(InvalidInputError, match="video"):
        evaluate(image, ["a red circle moving up"])
    with pytest.raises(InvalidInputError, match="motion"):
        evaluate(image[:, None].expand(1, 4, 3, 32, 32), ["a red circle"])
    with pytest.raises(InvalidInputError, match="num_objects"):
        detect(image, 3)
