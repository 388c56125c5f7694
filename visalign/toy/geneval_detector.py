"""The toy world's exact evaluator as a GenEval detector: :class:`ToyDetector`.

It follows :class:`~visalign.rewards.detection.Detector`, so GenEval's rules can be checked end to
end on toy renders (``GenEvalReward("toy")``, which looks it up by name) without a detection model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from visalign.rewards.detection import DetectedObject, check_queries
from visalign.toy.world import SHAPES

__all__ = ["ToyDetector"]


class ToyDetector(nn.Module):
    """The toy world's exact evaluator as a detector: every object it reads, with score 1.

    :func:`visalign.toy.detect` (up to two objects, split by hue) gives each object's shape (the
    label: ``circle``, ``square`` or ``triangle``), colour and soft coverage; the box is the bounding
    box of the shape template the evaluator fitted (its area and centroid give the template's
    half-extent and centre). Objects whose shape is not among an image's queries are dropped.

    Args:
        report_colors: put the evaluator's colour in each detection (default True); with False the
            reward classifies colours with CLIP on the box crops instead.
    """

    vocabulary = SHAPES  # the class names it can read; GenEvalReward parses prompts with them
    color_model = None  # no default CLIP for toy scenes: pass clip= (e.g. the toy CLIP) with report_colors=False

    def __init__(self, report_colors: bool = True):
        super().__init__()
        self.report_colors = bool(report_colors)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, queries: Sequence[Sequence[str]]) -> list[list[DetectedObject]]:
        import math

        from visalign.toy.detection import detect
        from visalign.toy.readout import _CENTROID_DROP, _UNIT_AREA

        queries = check_queries(queries, images.shape[0])
        h, w = images.shape[-2:]
        out = []
        for dets, q in zip(detect(images.detach().float().cpu(), num_objects=2), queries):
            found = []
            for d in dets:
                if not d.found or d.shape not in q:
                    continue
                # The fitted template: half-extent r from its area, box centre above the area centroid
                # by the shape's centroid drop (a triangle's centroid sits r/3 below its box centre).
                r = math.sqrt(max(d.area, 0.0) * h * w / _UNIT_AREA[d.shape])
                cx, cy = d.centroid[0] * w, d.centroid[1] * h - _CENTROID_DROP[d.shape] * r
                color = d.color if self.report_colors else None
                found.append(DetectedObject(d.shape, (cx - r, cy - r, cx + r, cy + r), 1.0, color))
            out.append(found)
        return out
