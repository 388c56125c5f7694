"""The text side of a UnifiedReward judge: the instructions it is sent and the parsers of its answers.

Pure text, no model and no network: the three modes (:data:`MODES`), the instruction template of
each (:data:`POINTWISE_TEMPLATE`, :data:`POINTWISE_V2_TEMPLATE`, :data:`PAIRWISE_TEMPLATE`, with
``{prompt}`` where the caption goes), and the parser of each mode's answer:

- :func:`parse_pointwise` (v1): "... Final Score: 4" -> 4.0 (1..5);
- :func:`parse_pointwise_v2` (v2.0): the "Alignment / Coherence / Style Score (1-5)" lines -> a dict;
- :func:`parse_pairwise`: "Image 1 is better." / "Image 2 is better." / "Both images are equally
  good." -> 1.0 / 0.0 / 0.5 for Image 1.

An answer without the expected form raises :class:`UnparseableAnswerError`, quoting the answer and
the form (:data:`EXPECTED_ANSWERS`). The reward that uses them is
:class:`~visalign.rewards.unified.UnifiedReward`.
"""

from __future__ import annotations

import re

from visalign.errors import RewardError

__all__ = [
    "MODES",
    "POINTWISE_TEMPLATE",
    "POINTWISE_V2_TEMPLATE",
    "PAIRWISE_TEMPLATE",
    "TEMPLATES",
    "EXPECTED_ANSWERS",
    "V2_PARTS",
    "UnparseableAnswerError",
    "parse_pointwise",
    "parse_pointwise_v2",
    "parse_pairwise",
]

MODES = ("pointwise", "pointwise_v2", "pairwise")

POINTWISE_TEMPLATE = (
    "You are shown an image that a model generated from the text caption below. Judge how faithfully the "
    "image shows what the caption describes, and its overall visual quality (sharpness, realism, no "
    "artefacts or distortions). Give a short justification, then a score from 1 (worst) to 5 (best) on a "
    "last line of the form 'Final Score: X'.\n"
    "Text Caption: [{prompt}]"
)
POINTWISE_V2_TEMPLATE = (
    "You are shown an image that a model generated from the text caption below. Rate it from 1 (worst) to "
    "5 (best) on three criteria: Alignment (does it show what the caption describes), Coherence (is it "
    "physically and visually consistent, free of distortions) and Style (is it aesthetically pleasing). "
    "Answer with exactly these three lines:\n"
    "Alignment Score (1-5): X\nCoherence Score (1-5): X\nStyle Score (1-5): X\n"
    "Text Caption: [{prompt}]"
)
PAIRWISE_TEMPLATE = (
    "You are shown two images that models generated from the text caption below: Image 1 first, then "
    "Image 2. Decide which image shows what the caption describes more faithfully and looks better. Give a "
    "short justification, then end with exactly one of these sentences: 'Image 1 is better.', "
    "'Image 2 is better.' or 'Both images are equally good.'\n"
    "Text Caption: [{prompt}]"
)
#: Each mode's default instruction.
TEMPLATES = {"pointwise": POINTWISE_TEMPLATE, "pointwise_v2": POINTWISE_V2_TEMPLATE, "pairwise": PAIRWISE_TEMPLATE}
#: Each mode's answer form, as error messages name it.
EXPECTED_ANSWERS = {
    "pointwise": "a line 'Final Score: X' with X from 1 to 5",
    "pointwise_v2": "three lines 'Alignment Score (1-5): X', 'Coherence Score (1-5): X', 'Style Score (1-5): X'",
    "pairwise": "one of 'Image 1 is better.', 'Image 2 is better.', 'Both images are equally good.'",
}
V2_PARTS = ("alignment", "coherence", "style")


class UnparseableAnswerError(RewardError):
    """The judge's answer does not have the form its template asks for."""


# ----------------------------------------------------------------------------- parsers
def _unparseable(mode: str, answer: str) -> UnparseableAnswerError:
    shown = answer if len(answer) <= 400 else answer[:200] + " [...] " + answer[-150:]
    return UnparseableAnswerError(
        f"cannot read a {mode} score from the judge's answer {shown!r}: expected {EXPECTED_ANSWERS[mode]}. "
        "Check that the template matches the judge (template=), that max_new_tokens leaves room for the verdict, "
        "or pass on_unparseable='zero' to score such answers 0 with a warning."
    )


_FINAL_RE = re.compile(r"final\s+score\s*\**\s*[:：]\s*\**\s*([1-5](?:\.\d+)?)(?![\d.]*\d)", re.IGNORECASE)
_V2_RE = {
    part: re.compile(part + r"\s+score\s*(?:\(\s*1\s*-\s*5\s*\))?\s*\**\s*[:：]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
    for part in V2_PARTS
}
_PAIR_RE = re.compile(r"image\s*([12])\s+is\s+better|both\s+images\s+are\s+equally\s+good", re.IGNORECASE)


def parse_pointwise(answer: str) -> float:
    """The 1–5 score after the last "Final Score:" of a v1 answer.

    Raises:
        UnparseableAnswerError: no "Final Score: X" with X in 1..5.
    """
    found = _FINAL_RE.findall(answer or "")
    if not found:
        raise _unparseable("pointwise", answer or "")
    return min(float(found[-1]), 5.0)


def parse_pointwise_v2(answer: str) -> dict[str, float]:
    """The three 1–5 sub-scores of a v2.0 answer: ``{"alignment", "coherence", "style"}``.

    Raises:
        UnparseableAnswerError: a sub-score is missing or outside 1..5.
    """
    out = {}
    for part, regex in _V2_RE.items():
        found = regex.findall(answer or "")
        if not found or not 1.0 <= float(found[-1]) <= 5.0:
            raise _unparseable("pointwise_v2", answer or "")
        out[part] = float(found[-1])
    return out


def parse_pairwise(answer: str) -> float:
    """The verdict of a pairwise answer for Image 1: 1.0 (Image 1 better), 0.0 (Image 2), 0.5 (equal).

    The last verdict sentence counts (a justification may quote the options first).

    Raises:
        UnparseableAnswerError: none of the three sentences.
    """
    found = list(_PAIR_RE.finditer(answer or ""))
    if not found:
        raise _unparseable("pairwise", answer or "")
    last = found[-1].group(1)
    return 0.5 if last is None else (1.0 if last == "1" else 0.0)
