"""GenEval's rules, pure: the checks on one image's detected objects against a :class:`GenEvalSpec`.

GenEval (Ghosh et al., arXiv 2310.11513) scores an image against a structured prompt by detecting
objects and checking each clause. The spec (what the image must show) comes from
:mod:`visalign.rewards.geneval_spec`; this module holds the scoring, which needs no model:

- :class:`GenEvalRules` keeps, per class, the detections above the confidence threshold (0.3, or
  0.9 for the ``counting`` tag), at most 16, most confident first, and :func:`evaluate` applies
  the clauses: every ``include`` clause needs ``count`` objects of its class (with the colour and
  the position relative to an earlier clause when it asks), and an ``exclude`` clause fails when
  ``count`` or more objects of its class are found (so counting fails at count + 1).
- :func:`relative_position` is GenEval's position rule on two xyxy boxes; :func:`box_iou` the
  overlap of two boxes.

Two scores come out of :func:`evaluate`: ``strict`` (GenEval's 0/1) and ``partial``, the mean over
clauses of a credit in [0, 1] built on Flow-GRPO's ``1 − |n − k| / k`` for counts (docs/math.md §7).

The spec's names (:func:`parse_prompt`, :class:`GenEvalSpec`, the vocabulary) and
:class:`~visalign.rewards.detection.DetectedObject` are importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from visalign.errors import InvalidInputError
from visalign.rewards.detection import DetectedObject
from visalign.rewards.geneval_spec import (
    Clause,
    GenEvalSpec,
)

__all__ = ["ClauseResult", "GenEvalResult", "GenEvalRules", "box_iou", "evaluate", "relative_position"]


# ----------------------------------------------------------------------------- geometry
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0 when both are empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """GenEval's position rule: where box A lies relative to box B (xyxy, y down).

    offset = centre(A) − centre(B); each axis is shrunk towards 0 by ``threshold · (dim A + dim B)``
    on that axis (never past 0), then divided by the length of the *unshrunk* offset. A is
    "left of" B when the x part is below −0.5, "right of" above 0.5, "above" when the y part is
    below −0.5, "below" above 0.5; several relations may hold, or none (overlapping boxes).
    """
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dims = (abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1]))
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [math.copysign(max(abs(o) - threshold * d, 0.0), o) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class GenEvalRules:
    """GenEval's thresholds (``evaluate_images.py`` defaults).

    Attributes:
        threshold: keep detections scoring above this (0.3).
        counting_threshold: the same for ``counting`` specs (0.9).
        max_objects: keep at most this many per class, most confident first (16).
        max_overlap: drop a detection whose IoU with a kept one of its class reaches this; 1.0 (the
            default) keeps every box, as GenEval does (Mask2Former's output needs no NMS; the
            transformers detectors here run their own NMS first).
        position_threshold: the shrink factor of :func:`relative_position` (0.1).
    """

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1

    def select(self, detections: Sequence[DetectedObject], spec: GenEvalSpec) -> dict[str, list[DetectedObject]]:
        """Per class of the spec, the detections kept, most confident first."""
        limit = self.counting_threshold if spec.tag == "counting" else self.threshold
        out: dict[str, list[DetectedObject]] = {}
        for name in spec.classes:
            ranked = sorted((d for d in detections if d.label == name and d.score > limit), key=lambda d: -d.score)
            ranked = ranked[: self.max_objects]
            kept: list[DetectedObject] = []
            while ranked:
                best = ranked.pop(0)
                kept.append(best)
                if self.max_overlap < 1:
                    ranked = [d for d in ranked if box_iou(best.box, d.box) < self.max_overlap]
            if kept:
                out[name] = kept
        return out


@dataclass
class ClauseResult:
    """How one clause fared: ``passed`` (GenEval's rule) and ``credit`` (partial credit in [0, 1]).

    ``credit`` is ``None`` for an exclusion of a class an include clause counts (its count credit
    already covers it); ``found`` is how many objects of the class were kept.
    """

    kind: str  # "include" or "exclude"
    clause: Clause
    found: int
    passed: bool
    credit: float | None
    reason: str = ""


@dataclass
class GenEvalResult:
    """The verdict on one image: ``strict`` (0/1, GenEval) and ``partial`` (mean clause credit)."""

    spec: GenEvalSpec
    strict: float
    partial: float
    clauses: list[ClauseResult] = field(default_factory=list)
    objects: dict[str, list[DetectedObject]] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """GenEval's explanation of a failure ('' when correct)."""
        return "\n".join(c.reason for c in self.clauses if c.reason)


ColorFn = Callable[[str, Sequence[DetectedObject]], Sequence[str]]


def _detected_colors(cls: str, objects: Sequence[DetectedObject]) -> list[str]:
    missing = [o for o in objects if o.color is None]
    if missing:
        raise InvalidInputError(
            f"the prompt asks for a colour of {cls!r} but the detector gave no colour and no colour "
            "classifier was set; use GenEvalReward's CLIP colour classifier (clip=...)."
        )
    return [str(o.color) for o in objects]


def evaluate(
    spec: GenEvalSpec,
    detections: Sequence[DetectedObject],
    rules: GenEvalRules | None = None,
    colors_of: ColorFn | None = None,
) -> GenEvalResult:
    """Applies GenEval's rules to one image's detections.

    **Strict** (GenEval's ``evaluate``): each include clause takes the first ``count`` objects of its
    class (most confident first) and fails when there are fewer; with a colour, all of them must
    have it; with a position, each must stand in the relation to every object of the target clause,
    which must itself have passed. An exclude clause fails when ``count`` or more objects of its class
    were kept. The image is correct (1.0) when no clause fails.

    **Partial credit**: with ``n`` objects of the class kept, ``k`` the count and ``e`` the class's
    exclusion count (if any), an include clause earns
    ``max(0, 1 − (max(0, k − n) + max(0, n − e + 1)) / k)``, which is Flow-GRPO's ``1 − |n − k| / k``
    for a counting clause (``e = k + 1``) and ``min(n, k) / k`` otherwise (extra objects are allowed,
    as in the strict rule), times the fraction of its counted objects with the right colour, times
    the fraction of (object, target object) pairs in the right relation. An exclusion of a class no
    include clause counts earns 1 or 0. The score is the mean over clauses; it is 1 exactly when the
    strict score is 1.

    Args:
        spec: what the image must show.
        detections: the detector's objects for this image.
        rules: the thresholds (default :class:`GenEvalRules`).
        colors_of: ``(class, objects) -> colour names``; by default the detections' own colours.
    """
    rules = rules or GenEvalRules()
    colors_of = colors_of or _detected_colors
    objects = rules.select(detections, spec)
    exclusion = {}
    for c in spec.exclude:
        exclusion[c.cls] = min(c.count, exclusion.get(c.cls, c.count))
    included = {c.cls for c in spec.include}
    results: list[ClauseResult] = []
    matched: list[list[DetectedObject] | None] = []
    for req in spec.include:
        everything = objects.get(req.cls, [])
        found = everything[: req.count]
        n, k = len(everything), req.count
        ok, reasons = True, []
        over = max(0, n - exclusion[req.cls] + 1) if req.cls in exclusion else 0
        credit = max(0.0, 1.0 - (max(0, k - n) + over) / k)
        if len(found) < k:
            ok = False
            reasons.append(f"expected {req.cls}>={k}, found {len(found)}")
        if req.color is not None and found:
            colors = list(colors_of(req.cls, found))
            hits = colors.count(req.color)
            credit *= hits / len(found)
            if ok and hits < k:
                ok = False
                tally = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                reasons.append(f"expected {req.color} {req.cls}>={k}, found {hits} {req.color}; and {tally}")
        if req.position is not None:
            relation, target_index = req.position
            target_all = objects.get(spec.include[target_index].cls, [])[: spec.include[target_index].count]
            pairs = [(o, t) for o in found for t in target_all]
            good = sum(relation in relative_position(o.box, t.box, rules.position_threshold) for o, t in pairs)
            credit *= good / len(pairs) if pairs else 0.0
            if ok:
                target = matched[target_index]
                if target is None:
                    ok = False
                    reasons.append(f"no target for {req.cls} to be {relation}")
                else:
                    for o in found:
                        bad = next(
                            (
                                t
                                for t in target
                                if relation not in relative_position(o.box, t.box, rules.position_threshold)
                            ),
                            None,
                        )
                        if bad is not None:
                            ok = False
                            rels = relative_position(o.box, bad.box, rules.position_threshold)
                            reasons.append(
                                f"expected {req.cls} {relation} target, found {' and '.join(sorted(rels))} target"
                            )
                            break
        matched.append(found if ok else None)
        results.append(ClauseResult("include", req, n, ok, credit, "\n".join(reasons)))
    for req in spec.exclude:
        n = len(objects.get(req.cls, []))
        ok = n < req.count
        reason = "" if ok else f"expected {req.cls}<{req.count}, found {n}"
        # An exclusion of an included class is already in that clause's count credit.
        credit = None if req.cls in included else float(ok)
        results.append(ClauseResult("exclude", req, n, ok, credit, reason))
    strict = float(all(r.passed for r in results))
    credits = [r.credit for r in results if r.credit is not None]
    return GenEvalResult(spec, strict, sum(credits) / len(credits), results, objects)
