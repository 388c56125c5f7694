"""OCR reward: how well an image renders the text its prompt quotes (Flow-GRPO's text-rendering reward).

The rule is Flow-GRPO's (``flow_grpo/ocr.py``)::

    target     = the text between the first pair of double quotes of the prompt
    recognised = every line the OCR engine reads in the image, joined
    both lower-cased with spaces removed
    dist       = 0                                   if target is a substring of recognised
               = min(levenshtein(recognised, target), len(target))   otherwise
    reward     = 1 - dist / len(target)              in [0, 1]; an unreadable image scores 0

So ``A sign that says "Open 24 hours"`` scores 1 when "OPEN 24 HOURS" (or "open24hours, come in")
is read, and partial credit for each character to fix otherwise.

The OCR engine is `rapidocr <https://pypi.org/project/rapidocr/>`_, whose PP-OCR detection and
recognition ONNX models ship inside its wheel and run offline on the CPU with onnxruntime
(``pip install "visalign[ocr]"``). It is built once, on the first call. Any object called as
``engine(bgr_uint8_hwc_array)`` that returns something with a ``txts`` attribute (a tuple of lines,
or ``None``) can replace it.

The reward is **not differentiable** (``differentiable=False``): OCR reads text off pixels through
a detector, a crop and a CTC decoder. Use it for GRPO-style training, best-of-N and FK steering;
a backward through its scores raises :class:`~visalign.errors.NotDifferentiableError`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from visalign.errors import InvalidInputError, RewardError, require
from visalign.rewards.base import Reward, check_prompts

__all__ = ["OCRReward", "levenshtein", "quoted_text", "ocr_similarity"]

_QUOTED = re.compile(r'"([^"]*)"')


def levenshtein(a: str, b: str) -> int:
    """The edit distance between ``a`` and ``b``: the fewest single-character insertions,
    deletions and substitutions that turn one into the other.

    Two-row dynamic programme, O(len(a)·len(b)) time and O(min(len)) memory.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete ca
                    current[j - 1] + 1,  # insert cb
                    previous[j - 1] + (ca != cb),
                )
            )  # substitute (free when equal)
        previous = current
    return previous[-1]


def quoted_text(prompt: str) -> str:
    """The text between the first pair of double quotes of ``prompt`` (what the image should show).

    Raises:
        InvalidInputError: the prompt has no ``"..."`` pair, or the quoted text is empty.
    """
    match = _QUOTED.search(prompt)
    if match is None:
        curly = any(q in prompt for q in "\u201c\u201d\u2018\u2019'")
        hint = (
            ' It has typographic or single quotes; the OCR reward reads only straight double quotes (").'
            if curly
            else ""
        )
        raise InvalidInputError(
            f"OCRReward: the prompt {prompt!r} quotes no text to render. The OCR reward compares the text "
            f"between the first pair of double quotes with what the image shows; write prompts as "
            f'... "TEXT" ..., e.g. \'A neon sign that says "Open 24 hours"\'.{hint}'
        )
    if not _normalise(match.group(1)):
        raise InvalidInputError(
            f'OCRReward: the prompt {prompt!r} quotes empty text (""), so there is nothing to read. Put the '
            f'text to render between the quotes: ... "TEXT" ....'
        )
    return match.group(1)


def _normalise(text: str) -> str:
    """Lower-cased, spaces removed: the comparison form of both texts."""
    return text.replace(" ", "").lower()


def ocr_similarity(recognised: str | None, target: str) -> float:
    """Flow-GRPO's score of the ``recognised`` text against the ``target`` (see the module docstring).

    Args:
        recognised: every line the OCR read, joined (``None`` or ``""`` when it read nothing).
        target: the quoted text of the prompt.

    Returns:
        `float` in [0, 1]: 1 when the target appears in the recognised text (case and spaces
        ignored), else ``1 - min(levenshtein, len(target)) / len(target)``; 0 when nothing was read.
    """
    target = _normalise(target)
    if not target:
        raise InvalidInputError('OCRReward: the target text is empty; quote the text to render: ... "TEXT" ....')
    found = _normalise(recognised or "")
    if target in found:
        return 1.0
    dist = min(levenshtein(found, target), len(target))
    return 1.0 - dist / len(target)


class OCRReward(Reward):
    """Scores how well each image renders the text quoted in its prompt (Flow-GRPO's OCR reward).

    ``reward(images, prompts)`` returns, per image, ``1 - edit distance / len(target)`` between the
    prompt's quoted text and the text the OCR engine reads (1 = rendered exactly, 0 = nothing of it
    readable). Every prompt must quote its text: ``'A storefront with the sign "Bakery"'``.

    Not differentiable (see the module docstring). Needs the ``ocr`` extra.

    Args:
        engine (*optional*): an OCR engine called as ``engine(bgr_uint8_hwc)`` returning an object
            with ``txts`` (a tuple of strings, or None). Defaults to ``rapidocr.RapidOCR`` with its
            bundled PP-OCR models, built on the first call.
        params: options for ``rapidocr.RapidOCR(params=...)`` when ``engine`` is
            None, e.g. ``{"Global.text_score": 0.5, "EngineConfig.onnxruntime.intra_op_num_threads": 4}``.
            The defaults turn the angle classifier off (as Flow-GRPO does) and logging down to errors.
        name: the name in logs (default "ocr").
        batch_size: images scored per chunk (the engine reads one image at a time).

    Raises:
        MissingDependencyError: rapidocr or onnxruntime is not installed (``pip install "visalign[ocr]"``).
        InvalidInputError: a prompt quotes no text (``... "TEXT" ...`` is expected).
    """

    default_name = "ocr"
    default_differentiable = False
    input_kind = "image"
    needs_prompts = True

    DEFAULT_PARAMS = {"Global.log_level": "error", "Global.use_cls": False}

    def __init__(
        self,
        engine: Any = None,
        *,
        params: dict | None = None,
        name: str | None = None,
        batch_size: int | None = None,
        check_range: bool = True,
    ):
        super().__init__(name=name, differentiable=False, batch_size=batch_size, check_range=check_range)
        if engine is None:
            # Fail at construction, not at the first training step, when the extra is missing.
            require("onnxruntime", "ocr", "OCRReward")
            require("rapidocr", "ocr", "OCRReward")
        elif not callable(engine):
            raise InvalidInputError(
                f"OCRReward: engine must be callable on an image array; got {type(engine).__name__}."
            )
        self._engine = engine
        self.params = {**self.DEFAULT_PARAMS, **(params or {})}

    @property
    def engine(self):
        """The OCR engine, built on first use (about a second for rapidocr's models)."""
        if self._engine is None:
            rapidocr = require("rapidocr", "ocr", "OCRReward")
            self._engine = rapidocr.RapidOCR(params=dict(self.params))
        return self._engine

    def read(self, image: np.ndarray) -> str | None:
        """Every line the engine reads in one RGB uint8 (H, W, 3) image, joined; None when it reads none."""
        out = self.engine(np.ascontiguousarray(image[..., ::-1]))  # rapidocr takes arrays as BGR
        lines = getattr(out, "txts", None)
        return "".join(lines) if lines else None

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str] | None = None, **conditioning):
        # Every prompt is checked before any image is read, so a bad prompt fails at once.
        if isinstance(images, torch.Tensor) and images.dim() > 0:
            for prompt in check_prompts(prompts, images.shape[0], name=self.name) or []:
                quoted_text(prompt)
        return super().evaluate(images, prompts, **conditioning)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from visalign.media import to_uint8

        targets = [quoted_text(p) for p in prompts]
        arrays = to_uint8(images)
        scores, failures = [], []
        for array, target in zip(arrays, targets):
            try:
                recognised = self.read(array)
            except Exception as exc:  # an engine failure on one image scores it 0, as in Flow-GRPO
                failures.append(exc)
                recognised = None
            scores.append(ocr_similarity(recognised, target))
        if failures and len(failures) == len(targets):
            raise RewardError(
                f"OCRReward: the OCR engine failed on every image of the batch "
                f"({type(failures[0]).__name__}: {failures[0]})."
            ) from failures[0]
        if failures:
            warnings.warn(
                f"OCRReward: the OCR engine failed on {len(failures)} of {len(targets)} images, which "
                f"score 0 ({type(failures[0]).__name__}: {failures[0]}).",
                RuntimeWarning,
                stacklevel=2,
            )
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def extra_repr(self) -> str:
        engine = "rapidocr (lazy)" if self._engine is None else type(self._engine).__name__
        return f"{super().extra_repr()}, engine={engine}"
