"""OCRReward: Flow-GRPO's text-rendering reward, with rapidocr's bundled PP-OCR models (the ``ocr`` extra).

The rule's pieces (Levenshtein, the quoted target, the similarity) are checked against hand-computed
numbers; the reward itself reads text rendered with PIL through the real OCR engine, offline.
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from visalign.errors import InvalidInputError, MissingDependencyError, NotDifferentiableError
from visalign.rewards import OCRReward, RewardResult, call_reward
from visalign.rewards.ocr import levenshtein, ocr_similarity, quoted_text


def _rapidocr_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import rapidocr  # noqa: F401
    except Exception:
        return False
    return True


needs_rapidocr = pytest.mark.skipif(
    not _rapidocr_available(),
    reason="rapidocr/onnxruntime are not importable (install the 'ocr' extra: pip install -e '.[ocr]')",
)

PROMPT = 'A shop sign that says "Hello World"'


def render(text: str, size=(320, 96), font_size=40) -> torch.Tensor:
    """Black text in PIL's built-in scalable font on white, as a float (3, H, W) image in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=font_size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError) as exc:
        pytest.skip(f"this Pillow has no scalable default font ({exc})")
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, (size[1] - font_size) // 2), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize(
    "a, b, d",
    [
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("a", "b", 1),
        ("kitten", "sitting", 3),  # k→s, e→i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("intention", "execution", 5),
        ("helloworld", "hello", 5),  # five deletions
        ("ab", "ba", 2),  # no transpositions in Levenshtein
    ],
)
def test_levenshtein_hand_computed(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_quoted_text_is_the_first_double_quoted_span():
    assert quoted_text(PROMPT) == "Hello World"
    assert quoted_text('a "first" and a "second"') == "first"


def test_prompt_without_quoted_text_names_the_prompt_and_the_expected_form():
    with pytest.raises(InvalidInputError, match=r"'a cat on a mat'.*\.\.\. \"TEXT\" \.\.\."):
        quoted_text("a cat on a mat")
    with pytest.raises(InvalidInputError, match="straight double quotes"):
        quoted_text("a sign that says \u201cOpen\u201d")
    with pytest.raises(InvalidInputError, match="empty"):
        quoted_text('a blank sign ""')
    with pytest.raises(InvalidInputError, match="empty"):
        quoted_text('a blank sign "   "')  # nothing left once spaces are removed


def test_similarity_rule_by_hand():
    assert ocr_similarity("HELLO WORLD, come in", "hello world") == 1.0  # substring, case and spaces ignored
    assert ocr_similarity("helo", "hello") == pytest.approx(1 - 1 / 5)  # one insertion
    assert ocr_similarity("abd", "abc") == pytest.approx(1 - 1 / 3)
    assert ocr_similarity("hello", "Hello World") == pytest.approx(1 - 5 / 10)
    assert ocr_similarity("a much longer unrelated line", "abc") == 0.0  # the distance is capped at len(target)
    assert ocr_similarity(None, "abc") == 0.0 and ocr_similarity("", "abc") == 0.0  # unreadable
    with pytest.raises(InvalidInputError):
        ocr_similarity("x", " ")


# ----------------------------------------------------------------------------- the reward, with a custom engine
class Reader:
    """An OCR engine of the documented contract: engine(bgr uint8 HWC) -> object with .txts."""

    def __init__(self, lines):
        self.lines, self.seen = lines, []

    def __call__(self, image):
        self.seen.append(image)
        return SimpleNamespace(txts=self.lines)


def test_engine_gets_bgr_uint8_and_lines_are_joined():
    red = torch.zeros(1, 3, 8, 10)
    red[:, 0] = 1.0
    reader = Reader(("HELLO", "World"))
    reward = OCRReward(reader)
    result = call_reward(reward, red, [PROMPT])
    assert isinstance(result, RewardResult) and result.total.tolist() == [1.0]
    (seen,) = reader.seen
    assert seen.dtype == np.uint8 and seen.shape == (8, 10, 3)
    assert (seen[..., 2] == 255).all() and (seen[..., 0] == 0).all()  # red is the last channel in BGR
    assert OCRReward(Reader(None))(red, [PROMPT]).tolist() == [0.0]  # nothing read


def test_bad_prompt_fails_before_any_image_is_read():
    reader = Reader(("x",))
    with pytest.raises(InvalidInputError, match="'no quotes here'"):
        OCRReward(reader)(torch.rand(2, 3, 8, 8), [PROMPT, "no quotes here"])
    assert reader.seen == []


def test_not_differentiable_and_says_so():
    reward = OCRReward(Reader(("hello",)))
    assert reward.differentiable is False and "differentiable=False" in repr(reward)
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    with pytest.raises(NotDifferentiableError, match="'ocr'"):
        reward(x, [PROMPT]).sum().backward()


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # makes `import rapidocr` fail, as when it is absent
    with pytest.raises(MissingDependencyError, match=r'pip install "visalign\[ocr\]"'):
        OCRReward()


def test_recipes_and_cli_know_the_name():
    from visalign.recipes import build_reward, check_reward_spec

    check_reward_spec("ocr")
    check_reward_spec({"text": {"type": "ocr", "batch_size": 2}})
    if _rapidocr_available():
        assert isinstance(build_reward("ocr"), OCRReward)
        assert build_reward({"type": "ocr", "batch_size": 2}).batch_size == 2


# ----------------------------------------------------------------------------- the real OCR engine
@pytest.fixture(scope="module")
def ocr():
    # one onnxruntime thread: the test machines have two shared cores
    return OCRReward(
        params={"EngineConfig.onnxruntime.intra_op_num_threads": 1, "EngineConfig.onnxruntime.inter_op_num_threads": 1}
    )


@needs_rapidocr
def test_real_ocr_scores_rendered_text(ocr):
    images = torch.stack([render("Hello World"), render("Goodbye"), torch.ones(3, 96, 320), render("Hello")])
    scores = ocr(images, [PROMPT] * 4)
    right, wrong, blank, partial = scores.tolist()
    assert right >= 0.9, scores
    assert wrong < right and wrong < 0.5, scores
    assert blank == 0.0, scores
    assert 0.3 <= partial <= 0.7 and partial < right, scores  # "hello" of "helloworld": 1 - 5/10 when read exactly
    assert scores.dtype == torch.float32 and scores.shape == (4,)


@needs_rapidocr
def test_cli_scores_a_folder_with_ocr(tmp_path):
    from PIL import Image

    from visalign.cli import main

    array = (render("Bakery").permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array).save(tmp_path / "sign.png")
    (tmp_path / "prompts.csv").write_text('file,prompt\nsign.png,"A storefront sign ""Bakery"""\n')
    assert main(["score", str(tmp_path), "--reward", "ocr"]) == 0
    line = (tmp_path / "rewards.csv").read_text().splitlines()[1]
    assert line.startswith("sign.png,") and float(line.rsplit(",", 1)[1]) >= 0.9, line


def test_bad_settings_and_inputs():
    with pytest.raises(InvalidInputError, match="engine must be callable"):
        OCRReward(engine=42)
    reward = OCRReward(Reader(("x",)))
    with pytest.raises(InvalidInputError, match="SegmentalVideoReward"):
        reward(torch.rand(1, 2, 3, 8, 8), [PROMPT])  # a video: read frame by frame through the video wrapper
    with pytest.raises(InvalidInputError, match="one prompt per image"):
        reward(torch.rand(2, 3, 8, 8), [PROMPT])
