"""GenEvalReward: the parser, each rule on hand-made detections, end to end on the toy world, tiny real detectors."""

import importlib.util

import pytest
import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.rewards import GenEvalReward, call_reward
from visalign.rewards.detection import DetectedObject, batched_nms, box_iou_matrix, nms
from visalign.rewards.detectors import GroundingDinoDetector, OwlV2Detector
from visalign.rewards.geneval import CLIPColorClassifier
from visalign.rewards.geneval_rules import GenEvalRules, evaluate, relative_position
from visalign.rewards.geneval_spec import GENEVAL_COLORS, GenEvalSpec, parse_prompt
from visalign.testing.detectors import tiny_grounding_dino, tiny_owl
from visalign.toy import COLORS, Scene, Sprite, render_batch
from visalign.toy.geneval_detector import ToyDetector


def obj(label, box=(0, 0, 10, 10), score=0.95, color=None):
    return DetectedObject(label, tuple(float(v) for v in box), score, color)


# ----------------------------------------------------------------------------- parser
@pytest.mark.parametrize(
    "prompt, metadata",
    [
        ("a photo of a cat", {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}),
        ("a photo of an apple", {"tag": "single_object", "include": [{"class": "apple", "count": 1}]}),
        ("A photo of a hot dog.", {"tag": "single_object", "include": [{"class": "hot dog", "count": 1}]}),
        ("a photo of an orange", {"tag": "single_object", "include": [{"class": "orange", "count": 1}]}),
        (
            "a photo of three dogs",
            {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]},
        ),
        (
            "a photo of four wine glasses",
            {
                "tag": "counting",
                "include": [{"class": "wine glass", "count": 4}],
                "exclude": [{"class": "wine glass", "count": 5}],
            },
        ),
        (
            "a photo of two people",
            {
                "tag": "counting",
                "include": [{"class": "person", "count": 2}],
                "exclude": [{"class": "person", "count": 3}],
            },
        ),
        ("a photo of a red car", {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}),
        ("a photo of an orange cat", {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "orange"}]}),
        (
            "a photo of a dog left of a cat",
            {
                "tag": "position",
                "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
            },
        ),
        (
            "a photo of a tv remote below a computer keyboard",
            {
                "tag": "position",
                "include": [
                    {"class": "computer keyboard", "count": 1},
                    {"class": "tv remote", "count": 1, "position": ["below", 0]},
                ],
            },
        ),
        (
            "a photo of a cat and a dog",
            {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
        ),
        (
            "a photo of a red car and a blue dog",
            {
                "tag": "color_attr",
                "include": [
                    {"class": "car", "count": 1, "color": "red"},
                    {"class": "dog", "count": 1, "color": "blue"},
                ],
            },
        ),
    ],
)
def test_parser_reads_the_geneval_forms_into_geneval_metadata(prompt, metadata):
    spec = parse_prompt(prompt)
    out = spec.to_metadata()
    assert out.pop("prompt") == prompt
    assert out == metadata
    assert GenEvalSpec.from_metadata(metadata, prompt) == spec  # the metadata route gives the same spec


@pytest.mark.parametrize(
    "prompt, why",
    [
        ("a cat sitting on a mat in the sun", "known classes"),
        ("a photo of a unicorn", "not one of the 80 known classes"),
        ("a photo of three dogs left of a cat", "two single objects"),
        ("a photo of a cat and a dog and a bird", "at most two objects"),
        ("a photo of", "names no object"),
        ("photo cat", "does not start with"),
        ("a photo of zero cats", "does not start with"),
    ],
)
def test_an_unparseable_prompt_says_why_and_shows_the_accepted_forms(prompt, why):
    with pytest.raises(InvalidInputError, match=why) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert "GenEval prompts take these forms" in message and "a photo of three dogs" in message


def test_parser_with_an_open_vocabulary():
    spec = parse_prompt("a photo of two unicorns", classes=None)
    assert spec.include[0].cls == "unicorn" and spec.include[0].count == 2
    with pytest.raises(InvalidInputError, match="object name"):
        parse_prompt("a photo of a cat that sits on a warm mat", classes=None)


def test_metadata_is_checked_and_counting_gets_its_exclusion():
    spec = GenEvalSpec.from_metadata('{"tag": "counting", "include": [{"class": "dog", "count": 2}]}')
    assert spec.exclude[0].cls == "dog" and spec.exclude[0].count == 3
    bad = [
        {"include": [{"class": "dog", "count": 1}]},
        {"tag": "colors"},
        {"tag": "colors", "include": [{"class": "dog", "count": 0}]},
        {"tag": "colors", "include": [{"count": 1}]},
        {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]},
        {"tag": "position", "include": [{"class": "a"}, {"class": "b", "position": ["near", 0]}]},
        "{not json",
    ]
    for metadata in bad:
        with pytest.raises(InvalidInputError, match="GenEval metadata"):
            GenEvalSpec.from_metadata(metadata)


# ----------------------------------------------------------------------------- rules
def test_confidence_thresholds_are_strict_and_counting_uses_0_9():
    one_cat = parse_prompt("a photo of a cat")
    assert evaluate(one_cat, [obj("cat", score=0.3)]).strict == 0.0  # GenEval keeps scores > 0.3
    assert evaluate(one_cat, [obj("cat", score=0.31)]).strict == 1.0
    two_cats = parse_prompt("a photo of two cats")
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10)]
    assert evaluate(two_cats, [obj("cat", b, 0.85) for b in boxes]).strict == 0.0
    assert evaluate(two_cats, [obj("cat", b, 0.95) for b in boxes]).strict == 1.0
    assert evaluate(two_cats, [obj("cat", b, 0.95) for b in boxes] + [obj("cat", score=0.85)]).strict == 1.0


def test_at_most_16_objects_per_class_are_kept():
    spec = GenEvalSpec.from_metadata({"tag": "single_object", "include": [{"class": "cat", "count": 17}]})
    many = [obj("cat", (i, 0, i + 1, 1), 0.5 + i / 100) for i in range(20)]
    result = evaluate(spec, many)
    assert result.clauses[0].found == 16 and result.strict == 0.0
    assert [o.score for o in result.objects["cat"]] == sorted((o.score for o in many), reverse=True)[:16]


@pytest.mark.parametrize("n, strict, partial", [(1, 0.0, 1 / 3), (2, 0.0, 2 / 3), (3, 1.0, 1.0), (4, 0.0, 2 / 3)])
def test_counting_passes_at_count_and_fails_at_count_plus_one(n, strict, partial):
    spec = parse_prompt("a photo of three dogs")
    result = evaluate(spec, [obj("dog", (10 * i, 0, 10 * i + 8, 8)) for i in range(n)])
    assert result.strict == strict and result.partial == pytest.approx(partial)  # 1 - |n - 3| / 3
    if n == 4:
        assert "expected dog<4, found 4" in result.reason


def test_presence_and_two_objects_with_partial_credit():
    spec = parse_prompt("a photo of a cat and a dog")
    assert evaluate(spec, [obj("cat"), obj("dog")]).strict == 1.0
    assert evaluate(spec, [obj("cat"), obj("cat", (20, 0, 30, 10)), obj("dog")]).strict == 1.0  # extras are fine
    half = evaluate(spec, [obj("cat")])
    assert half.strict == 0.0 and half.partial == 0.5 and "expected dog>=1, found 0" in half.reason
    assert evaluate(spec, [obj("bird")]).partial == 0.0


def test_colour_is_checked_on_the_most_confident_objects():
    spec = parse_prompt("a photo of a red car")
    assert evaluate(spec, [obj("car", color="red")]).strict == 1.0
    wrong = evaluate(spec, [obj("car", color="blue")])
    assert wrong.strict == 0.0 and "expected red car>=1, found 0 red; and 1 blue" in wrong.reason
    # GenEval reads the colour of the first `count` objects only: the confident blue car decides.
    mixed = [obj("car", score=0.5, color="red"), obj("car", (20, 0, 30, 10), 0.9, color="blue")]
    assert evaluate(spec, mixed).strict == 0.0
    two_red = GenEvalSpec.from_metadata({"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]})
    result = evaluate(two_red, [obj("car", color="red"), obj("car", (20, 0, 30, 10), color="blue")])
    assert result.strict == 0.0 and result.partial == 0.5
    with pytest.raises(InvalidInputError, match="colour"):
        evaluate(spec, [obj("car")])  # no colour from the detector and no classifier


def box(cx, cy, w, h):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        # Horizontal, both 10 wide: shrink 0.1 * (10 + 10) = 2. Offset -20 -> (-20 + 2) / 20 = -0.9.
        (box(0, 0, 10, 10), box(20, 0, 10, 10), {"left of"}),
        (box(20, 0, 10, 10), box(0, 0, 10, 10), {"right of"}),
        # Offset -4 -> (-4 + 2) / 4 = -0.5 exactly: not below -0.5, so no relation.
        (box(0, 0, 10, 10), box(4, 0, 10, 10), set()),
        # Offset -4.2 -> -2.2 / 4.2 = -0.524: left of.
        (box(0, 0, 10, 10), box(4.2, 0, 10, 10), {"left of"}),
        # Offset -1.5 -> shrunk to 0 on x (floored), no relation.
        (box(0, 0, 10, 10), box(1.5, 0, 10, 10), set()),
        # Diagonal (-10, -10), boxes 10x10: each axis (-10 + 2) / 14.14 = -0.566: left of and above.
        (box(0, 0, 10, 10), box(10, 10, 10, 10), {"left of", "above"}),
        # Same offset, boxes 20x20: shrink 4, (-6) / 14.14 = -0.424 on each axis: nothing.
        (box(0, 0, 20, 20), box(10, 10, 20, 20), set()),
        # (-10, +3), boxes 10x10: x (-8) / 10.44 = -0.766 left of; y (3 - 2) / 10.44 = 0.096.
        (box(0, 3, 10, 10), box(10, 0, 10, 10), {"left of"}),
        # y down: A's centre 30 px lower, heights 10 + 40 -> shrink 5: (30 - 5) / 30 = 0.83 below.
        (box(0, 30, 10, 10), box(0, 0, 10, 40), {"below"}),
        # Same centre: no relation at all.
        (box(5, 5, 10, 10), box(5, 5, 4, 4), set()),
    ],
)
def test_position_rule_at_the_thresholds(a, b, expected):
    assert relative_position(a, b) == expected


def test_position_clause_needs_every_pair_and_a_matched_target():
    spec = parse_prompt("a photo of a dog left of a cat")
    cat, dog_left, dog_right = (
        obj("cat", box(50, 0, 10, 10)),
        obj("dog", box(0, 0, 10, 10)),
        obj("dog", box(90, 0, 10, 10)),
    )
    assert evaluate(spec, [cat, dog_left]).strict == 1.0
    wrong = evaluate(spec, [cat, dog_right])
    assert (
        wrong.strict == 0.0 and wrong.partial == 0.5 and "expected dog left of target, found right of" in wrong.reason
    )
    assert evaluate(spec, [dog_left]).reason.endswith("no target for dog to be left of")
    # The target clause must pass as a whole (here its colour fails), as in GenEval.
    red_cat = GenEvalSpec.from_metadata(
        {
            "tag": "position",
            "include": [
                {"class": "cat", "count": 1, "color": "red"},
                {"class": "dog", "count": 1, "position": ["left of", 0]},
            ],
        }
    )
    blue = obj("cat", box(50, 0, 10, 10), color="blue")
    result = evaluate(red_cat, [blue, dog_left])
    assert result.strict == 0.0 and "no target for dog" in result.reason
    assert result.partial == 0.5  # the dog is left of the cat: its clause keeps its credit


def test_exclusion_of_another_class_and_rule_level_overlap_suppression():
    spec = GenEvalSpec.from_metadata(
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    )
    assert evaluate(spec, [obj("cat")]).strict == 1.0
    result = evaluate(spec, [obj("cat"), obj("dog")])
    assert result.strict == 0.0 and result.partial == 0.5
    two = parse_prompt("a photo of two cats")
    duplicates = [obj("cat", (0, 0, 10, 10)), obj("cat", (1, 0, 11, 10), 0.94)]
    assert evaluate(two, duplicates).strict == 1.0  # GenEval's default keeps overlapping boxes
    assert evaluate(two, duplicates, GenEvalRules(max_overlap=0.5)).strict == 0.0


def test_nms_in_torch():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.3])
    iou = box_iou_matrix(boxes, boxes)
    assert iou[0, 1] == pytest.approx(90 / 110) and iou[0, 2] == 0 and iou[0, 3] == 1
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.95).tolist() == [1, 0, 2]  # 0.818 < 0.95 keeps both; box 3 duplicates box 0
    labels = torch.tensor([0, 1, 0, 0])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 0, 2]  # different labels never suppress
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


# ----------------------------------------------------------------------------- end to end: the toy world
def two(a, b):
    return Scene((a, b))


TOY_CASES = [
    # (scene, prompt, strict) -- presence, colour, position, counting, two objects, colour attributes
    (Scene.single("circle", "red"), "a photo of a circle", 1.0),
    (Scene.single("circle", "red"), "a photo of a square", 0.0),
    (Scene.single("circle", "red"), "a photo of a red circle", 1.0),
    (Scene.single("circle", "blue"), "a photo of a red circle", 0.0),
    (
        two(Sprite("circle", "red", "left"), Sprite("square", "blue", "right")),
        "a photo of a circle left of a square",
        1.0,
    ),
    (
        two(Sprite("square", "red", "left"), Sprite("circle", "blue", "right")),
        "a photo of a circle left of a square",
        0.0,
    ),
    (
        two(Sprite("triangle", "green", "top"), Sprite("circle", "blue", "bottom")),
        "a photo of a triangle above a circle",
        1.0,
    ),
    (
        two(Sprite("triangle", "green", "top"), Sprite("circle", "blue", "bottom")),
        "a photo of a triangle below a circle",
        0.0,
    ),
    (two(Sprite("circle", "red", "left"), Sprite("circle", "blue", "right")), "a photo of two circles", 1.0),
    (Scene.single("circle", "red", "left"), "a photo of two circles", 0.0),
    (two(Sprite("circle", "red", "left"), Sprite("circle", "blue", "right")), "a photo of one circle", 0.0),
    (two(Sprite("circle", "red", "left"), Sprite("square", "blue", "right")), "a photo of a circle and a square", 1.0),
    (Scene.single("circle", "red"), "a photo of a circle and a square", 0.0),
    (
        two(Sprite("circle", "red", "top"), Sprite("square", "blue", "bottom")),
        "a photo of a red circle and a blue square",
        1.0,
    ),
    (
        two(Sprite("circle", "blue", "top"), Sprite("square", "red", "bottom")),
        "a photo of a red circle and a blue square",
        0.0,
    ),
]


@pytest.fixture(scope="module")
def toy_batch():
    return render_batch([s for s, _, _ in TOY_CASES]), [p for _, p, _ in TOY_CASES], [v for _, _, v in TOY_CASES]


def test_toy_world_end_to_end_strict_scores(toy_batch):
    images, prompts, expected = toy_batch
    reward = GenEvalReward("toy", batch_size=4)
    scores = reward(images, prompts)
    assert scores.tolist() == expected
    assert not reward.differentiable


def test_toy_world_partial_credit_and_report(toy_batch):
    images, prompts, expected = toy_batch
    reward = GenEvalReward("toy", partial=True)
    scores = reward(images, prompts).tolist()
    assert [s == 1.0 for s in scores] == [e == 1.0 for e in expected]  # partial is 1 exactly when strict is
    by_prompt = dict(zip(prompts[-3:-1], scores[-3:-1]))
    assert by_prompt["a photo of a circle and a square"] == 0.5  # the circle is there, the square is not
    report = reward.report(images[5:6], prompts[5:6])[0]
    assert report.strict == 0.0 and "expected circle left of target, found right of target" in report.reason
    assert [o.label for o in report.objects["circle"]] == ["circle"]


def test_toy_world_metadata_routes_give_the_same_scores(toy_batch):
    images, prompts, expected = toy_batch
    reward = GenEvalReward("toy")
    specs = [reward.parse(p).to_metadata() for p in prompts]
    assert reward(images, prompts, metadata=specs).tolist() == expected
    # GenEval's prompt file as a trainer passes it: one column per key; the counting rows carry exclude.
    columns = {
        "tag": [s["tag"] for s in specs],
        "include": [s["include"] for s in specs],
        "exclude": [s.get("exclude") for s in specs],
    }
    assert call_reward(reward, images, None, **columns).total.tolist() == expected
    with pytest.raises(InvalidInputError, match="neither a prompt nor GenEval metadata"):
        reward(images[:1], None)
    with pytest.raises(InvalidInputError, match="cannot parse the GenEval prompt"):
        reward(images[:1], ["a cat sitting on a mat"])


def test_toy_world_colour_by_zero_shot_clip_on_the_box_crops():
    from visalign.recipes import toy_model_path

    scenes = [
        Scene.single(s, c, p)
        for s, c, p in [
            ("circle", "red", "left"),
            ("square", "blue", "center"),
            ("triangle", "yellow", "right"),
            ("circle", "purple", "top"),
        ]
    ]
    images = render_batch(scenes)
    clip = CLIPColorClassifier(toy_model_path("clip"), colors=tuple(COLORS))
    reward = GenEvalReward(ToyDetector(report_colors=False), clip=clip, classes=("circle", "square", "triangle"))
    right = [f"a photo of a {s.sprites[0].color} {s.sprites[0].shape}" for s in scenes]
    wrong = [
        "a photo of a green circle",
        "a photo of a red square",
        "a photo of a blue triangle",
        "a photo of a orange circle",
    ]
    assert reward(images, right).tolist() == [1.0] * 4
    assert reward(images, wrong).tolist() == [0.0] * 4
    assert clip.text_classifier("circle").shape[0] == len(COLORS)
    with pytest.raises(ConfigError, match="colour classifier"):
        GenEvalReward(ToyDetector(report_colors=False))(images[:1], right[:1])


def test_recipe_name_builds_the_toy_reward(toy_batch):
    from visalign.recipes import build_reward, check_reward_spec

    check_reward_spec({"type": "geneval", "detector": "toy"})
    reward = build_reward({"type": "geneval", "detector": "toy", "partial": True})
    assert isinstance(reward, GenEvalReward) and reward.partial
    with pytest.raises(ConfigError, match="unknown detector"):
        build_reward({"type": "geneval", "detector": "yolo"})


# ----------------------------------------------------------------------------- tiny real detectors
def check_structure(dets, queries, h, w, nms_iou):
    assert len(dets) == len(queries)
    for found, q in zip(dets, queries):
        assert found and all(isinstance(d, DetectedObject) and d.label in q and d.color is None for d in found)
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
        for d in found:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h and 0 <= d.score <= 1
        for label in set(d.label for d in found):
            boxes = torch.tensor([d.box for d in found if d.label == label])
            iou = box_iou_matrix(boxes, boxes).fill_diagonal_(0)
            assert bool((iou <= nms_iou).all())


@pytest.mark.parametrize(
    "v2",
    [
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                importlib.util.find_spec("scipy") is None, reason="OWLv2's PIL processor needs scipy (geneval extra)"
            ),
        ),
        False,
    ],
    ids=["owlv2", "owlvit"],
)
def test_tiny_owl_detector_runs_end_to_end(v2, clip_pair):
    model, processor = tiny_owl(v2)
    detector = OwlV2Detector(model, processor, min_score=0.0, nms_iou=0.5)
    images = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    queries = [["cat", "dog"], ["car"]]
    dets = detector(images, queries)
    check_structure(dets, queries, 24, 40, 0.5)
    # Without NMS every patch's box comes back: its score is the sigmoid of its best real query, and
    # its box the predicted one scaled back to pixels (OWLv2: of the padded 40x40 square).
    raw = OwlV2Detector(model, processor, min_score=0.0, nms_iou=1.0)(images, queries)
    assert len(raw[0]) == (32 // 8) ** 2
    tokens = processor.tokenizer(["a photo of a cat", "a photo of a dog", "a photo of a car", " "],
                                 padding="max_length", max_length=16, return_tensors="pt")  # fmt: skip
    pixels = processor.image_processor(images=[(x * 255).round().byte() for x in images], return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels["pixel_values"])
    # Image 1 has one real query ("car"): every patch's score is its sigmoid, every box its prediction.
    scale = torch.tensor([40.0, 40, 40, 40] if v2 else [40.0, 24, 40, 24])
    cx, cy, bw, bh = out.pred_boxes[1].unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * scale
    boxes = torch.min(boxes.clamp_min(0), torch.tensor([40.0, 24, 40, 24]))
    expected = sorted(zip(boxes.tolist(), out.logits[1, :, 0].sigmoid().tolist()))
    got = sorted((list(d.box), d.score) for d in raw[1])
    assert torch.allclose(torch.tensor([b for b, _ in got]), torch.tensor([b for b, _ in expected]), atol=1e-4)
    assert torch.allclose(torch.tensor([c for _, c in got]), torch.tensor([c for _, c in expected]), atol=1e-5)
    # The whole reward with the real path: tiny detector and tiny CLIP colours, thresholds at 0.
    reward = GenEvalReward(detector, clip=clip_pair[0], clip_processor=clip_pair[1], rules={"threshold": 0.0})
    result = reward.report(images, ["a photo of a red cat", "a photo of a car"])
    assert [r.strict for r in result][1] == 1.0 and result[0].objects["cat"]
    scores = reward(images, ["a photo of a red cat", "a photo of a car"])
    assert scores.shape == (2,) and set(scores.tolist()) <= {0.0, 1.0}
    assert all(c in GENEVAL_COLORS for c in reward.color_classifier(images[0], "cat", [d.box for d in dets[0][:2]]))


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="OWLv2's PIL processor needs scipy")
def test_owlv2_loads_from_a_saved_folder_through_the_recipe_name(tmp_path):
    from visalign.recipes import build_reward

    model, processor = tiny_owl(True)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reward = build_reward(
        {"type": "geneval", "detector": "owlv2", "model": str(tmp_path), "clip": None, "rules": {"threshold": 0.0}}
    )
    assert type(reward.detector.image_processor).__name__ == "Owlv2ImageProcessorPil"
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert reward(images, ["a photo of a cat", "a photo of a cat and a dog"]).tolist() == [1.0, 1.0]


def test_tiny_grounding_dino_detector_runs_end_to_end():
    model, processor = tiny_grounding_dino()
    detector = GroundingDinoDetector(model, processor, min_score=0.0, nms_iou=0.5)
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    queries = [["cat", "dog"], ["hot dog"]]
    dets = detector(images, queries)
    check_structure(dets, queries, 40, 56, 0.5)
    text, spans = detector._text(["hot dog", "cat"])
    assert text == "hot dog . cat ." and [text[a:b] for a, b in spans] == ["hot dog", "cat"]
    reward = GenEvalReward(detector, clip=None, rules={"threshold": 0.0, "counting_threshold": 0.0})
    scores = reward(images, ["a photo of a cat and a dog", "a photo of two hot dogs"])
    assert scores.shape == (2,) and set(scores.tolist()) <= {0.0, 1.0}


def test_detector_configuration_errors(clip_pair):
    with pytest.raises(ConfigError, match="OWLv2 or OWL-ViT"):
        OwlV2Detector(clip_pair[0], clip_pair[1])
    with pytest.raises(ConfigError, match="unknown detector"):
        GenEvalReward("yolo")
    with pytest.raises(ConfigError, match="no model"):
        GenEvalReward("toy", model="x")
