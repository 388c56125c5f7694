"""The toy world: grammar, parsing, deterministic sampling and rendering."""

import pytest
import torch

from visalign.errors import InvalidInputError
from visalign.toy import (
    BACKGROUNDS,
    COLORS,
    GRAMMAR,
    MOTIONS,
    POSITIONS,
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
from visalign.toy.video import TRAVEL

FLAGS = [
    dict(),
    dict(sizes=True),
    dict(two_shapes=True),
    dict(sizes=True, two_shapes=True),
    dict(video=True),
    dict(video=True, sizes=True),
]
COUNTS = [90, 270, 90 + 540, 270 + 4860, 72, 216]


@pytest.mark.parametrize("flags,count", zip(FLAGS, COUNTS), ids=[str(f) for f in FLAGS])
def test_every_caption_round_trips(flags, count):
    scenes = all_scenes(**flags)
    captions = all_captions(**flags)
    assert len(captions) == len(set(captions)) == count
    for scene, caption in zip(scenes, captions):
        assert scene.caption() == caption
        assert parse_caption(caption) == scene


def test_caption_examples_and_articles():
    assert Scene.single("circle", "red", "left").caption() == "a red circle on the left"
    assert Scene.single("square", "orange", "center").caption() == "an orange square in the center"
    assert Scene.single("square", "orange", "top", "large").caption() == "a large orange square at the top"
    assert Scene.single("triangle", "blue", size="small", motion="up").caption() == "a small blue triangle moving up"
    two = Scene((Sprite("circle", "red", "left"), Sprite("square", "blue", "right")))
    assert two.caption() == "a red circle on the left and a blue square on the right"
    # Lenient on case, spacing, the article and a final full stop; position may be unstated.
    assert parse_caption("  A  Orange Circle on the LEFT. ") == Scene.single("circle", "orange", "left")
    assert parse_caption("a red circle") == Scene.single("circle", "red")
    swapped = parse_caption("a blue square on the right and a red circle on the left")
    assert swapped.sprites[0].color == "blue"


@pytest.mark.parametrize(
    "text",
    [
        "a pink circle on the left",  # unknown colour
        "a red hexagon",  # unknown shape
        "a red circle in the corner",  # unknown position
        "a medium red circle",  # "medium" is never written
        "red circle on the left",  # no article
        "",
        "a red circle on the left and a red square on the right",  # same colour twice
        "a red circle on the left and a blue square at the top",  # not opposite positions
        "a red circle and a blue square",  # two objects need positions
        "a red circle on the left moving right",  # videos have no position
        "a red circle moving sideways",
    ],
)
def test_unparsable_captions_raise_with_the_grammar(text):
    with pytest.raises(InvalidInputError) as info:
        parse_caption(text)
    assert GRAMMAR in str(info.value)
    assert isinstance(info.value, ValueError)


def test_scene_validation():
    with pytest.raises(InvalidInputError, match="shape"):
        Sprite("hexagon", "red")
    with pytest.raises(InvalidInputError, match="background"):
        Scene.single("circle", "red", background="black")
    with pytest.raises(InvalidInputError, match="one or two"):
        Scene(tuple(Sprite("circle", c, "left") for c in ("red", "blue", "green")))
    with pytest.raises(InvalidInputError):
        parse_caption(42)


def test_sampling_is_deterministic_per_seed():
    kw = dict(sizes=True, backgrounds=True, two_shapes=True)
    a, b = sample_scenes(200, seed=7, **kw), sample_scenes(200, seed=7, **kw)
    assert a == b
    assert a != sample_scenes(200, seed=8, **kw)
    assert {len(s.sprites) for s in a} == {1, 2}
    assert {s.background for s in a} == set(BACKGROUNDS)
    assert {sp.size for s in a for sp in s.sprites} == {None, "small", "large"}
    plain = sample_scenes(100, seed=0)
    assert all(len(s.sprites) == 1 and s.background == "white" and s.sprites[0].size is None for s in plain)
    assert {s.sprites[0].position for s in plain} == set(POSITIONS)
    videos = sample_scenes(100, seed=0, video=True)
    assert {s.motion for s in videos} == set(MOTIONS)
    assert all(s.sprites[0].position is None for s in videos)


def test_dataset_is_deterministic_and_batches():
    a, b = ToyDataset(6, seed=3, backgrounds=True), ToyDataset(6, seed=3, backgrounds=True)
    for i in range(len(a)):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert ca == cb and torch.equal(xa, xb)
    assert a.captions() != ToyDataset(6, seed=4, backgrounds=True).captions()
    images, captions = next(iter(torch.utils.data.DataLoader(a, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and len(captions) == 4
    video, caption = ToyDataset(2, seed=0, video=True, num_frames=9, size=16)[0]
    assert video.shape == (9, 3, 16, 16) and "moving" in caption


def _centroid(image, background):
    """(x, y) in image fractions of the pixels that differ from the background."""
    mass = (image - torch.tensor(background)[:, None, None]).abs().sum(0)
    h, w = mass.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return float((mass * xs).sum() / mass.sum() / w), float((mass * ys).sum() / mass.sum() / h)


@pytest.mark.parametrize("antialias", [True, False])
def test_render_places_the_palette_colour_at_the_anchor(antialias):
    for position, (fx, fy) in POSITIONS.items():
        scene = Scene.single("square", "green", position, background="sky")
        image = render(scene, size=32, antialias=antialias)
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert torch.allclose(image[:, 0, 0], torch.tensor(BACKGROUNDS["sky"]))
        centre = image[:, int(fy * 32), int(fx * 32)]
        assert torch.allclose(centre, torch.tensor(COLORS["green"]))
        cx, cy = _centroid(image, BACKGROUNDS["sky"])
        assert abs(cx - fx) < 0.02 and abs(cy - fy) < 0.02
    if not antialias:  # hard edges: only the two colours appear
        assert len(torch.unique(image.flatten(1), dim=1).T) == 2


def test_sizes_scale_the_sprite():
    areas = [
        ((render(Scene.single("circle", "red", "center", s)) < 0.99).any(0)).sum() for s in ("small", None, "large")
    ]
    assert areas[0] < areas[1] < areas[2]
    assert SIZES["small"] < SIZES["medium"] < SIZES["large"]
    assert render("a red circle", size=64).shape == (3, 64, 64)


def test_render_batch_matches_render():
    scenes = sample_scenes(12, seed=1, sizes=True, backgrounds=True, two_shapes=True)
    batch = render_batch(scenes)
    assert torch.equal(batch, torch.stack([render(s) for s in scenes]))
    assert torch.equal(render_batch([scenes[0].caption()])[0], render(scenes[0].caption()))


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_render_video_moves_in_the_stated_direction(motion):
    video = render_video(f"a blue triangle moving {motion}", num_frames=8)
    assert video.shape == (8, 3, 32, 32)
    assert torch.equal(video[0], first_frame(f"a blue triangle moving {motion}"))
    assert torch.equal(video[0], render("a blue triangle"))  # frame 0 is centred
    (x0, y0), (x1, y1) = (_centroid(video[t], BACKGROUNDS["white"]) for t in (0, -1))
    dx, dy = MOTIONS[motion]
    assert x1 - x0 == pytest.approx(dx * TRAVEL, abs=0.01)
    assert y1 - y0 == pytest.approx(dy * TRAVEL, abs=0.01)


def test_render_video_options_and_errors():
    assert torch.equal(render_video("a red circle", "left"), render_video("a red circle moving left"))
    assert render_video("a red circle moving up", num_frames=9, size=16).shape == (9, 3, 16, 16)
    batch = render_video_batch(["a red circle moving up", "a small green square moving left"])
    assert batch.shape == (2, 8, 3, 32, 32)
    assert torch.equal(batch[1], render_video("a small green square moving left"))
    # Every first frame of one sprite is the same whatever the motion: I2V must read the text.
    up = first_frame("a red circle moving up")
    assert all(torch.equal(first_frame(f"a red circle moving {m}"), up) for m in MOTIONS)
    with pytest.raises(InvalidInputError, match="motion"):
        render_video("a red circle")
    with pytest.raises(InvalidInputError, match="no position"):
        render_video("a red circle on the left", "right")
    with pytest.raises(InvalidInputError, match="num_frames"):
        render_video("a red circle moving up", num_frames=1)
    with pytest.raises(InvalidInputError, match="size"):
        render("a red circle", size=4)
