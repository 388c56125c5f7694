"""What every GenEval detector shares: the :class:`Detector` interface, its output, and box arithmetic in torch.

A detector takes images and, per image, the class names to look for, and returns per image a
list of :class:`DetectedObject` ``(label, box xyxy in pixels, score, colour or None)``::

    detector(images, [["cat", "dog"], ["car"]])   # -> [[DetectedObject(...), ...], [...]]

The implementations are elsewhere: OWLv2 / OWL-ViT and Grounding DINO from transformers in
:mod:`visalign.rewards.detectors`, the toy world's evaluator in :mod:`visalign.toy.geneval_detector`.
This module holds what they have in common: :func:`check_queries` (the per-image class lists),
:func:`cxcywh_to_xyxy`, :func:`box_iou_matrix` and a per-class non-maximum suppression
(:func:`nms`, :func:`batched_nms`) written here in torch, since ``torchvision.ops`` is not available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from visalign.errors import InvalidInputError

__all__ = [
    "Detector",
    "DetectedObject",
    "check_queries",
    "box_iou_matrix",
    "nms",
    "batched_nms",
    "cxcywh_to_xyxy",
]


class DetectedObject(NamedTuple):
    """One detection: what a :class:`Detector` returns per object.

    Attributes:
        label: the class name (one of the queries the detector was given).
        box: ``(x0, y0, x1, y1)`` in pixels of the scored image.
        score: the detector's confidence in [0, 1].
        color: the object's colour when the detector knows it (the toy world's evaluator does);
            ``None`` lets the reward classify the box crop with CLIP.
    """

    label: str
    box: tuple[float, float, float, float]
    score: float
    color: str | None = None


@runtime_checkable
class Detector(Protocol):
    """What :class:`~visalign.rewards.GenEvalReward` needs from a detector.

    ``detector(images, queries)``: ``images`` (B, 3, H, W) floats in [0, 1], ``queries`` B lists of
    class names; returns B lists of :class:`DetectedObject` whose ``label`` is one of that image's
    queries and whose ``box`` is in pixels of the image (x0, y0, x1, y1).

    Optional attributes: ``vocabulary``, the class names it can read (prompts are parsed with
    them; default GenEval's 80 classes), ``report_colors``, True when detections carry a colour
    (then no CLIP colour classifier is built), and ``color_model``, the CLIP that classifies
    colours otherwise (default CLIP ViT-L/14; None: none unless the reward is given one).
    """

    def __call__(self, images: torch.Tensor, queries: Sequence[Sequence[str]]) -> list[list[DetectedObject]]: ...


def check_queries(queries: Sequence[Sequence[str]], batch: int) -> list[list[str]]:
    """Each image's class names as a list of strings, duplicates dropped.

    Args:
        queries: one sequence of class names per image.
        batch: the number of images.

    Raises:
        InvalidInputError: not one list per image (a bare string counts as none).
    """
    if len(queries) != batch or any(isinstance(q, str) for q in queries):
        raise InvalidInputError(f"a detector takes one list of class names per image ({batch}); got {queries!r}.")
    return [list(dict.fromkeys(str(c) for c in q)) for q in queries]


# ----------------------------------------------------------------------------- boxes
def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) centre-size boxes to corner boxes."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), xyxy: (N, M)."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: the indices kept, highest score first.

    A box is dropped when its IoU with a kept, higher-scoring box exceeds ``iou_threshold`` (the
    convention of ``torchvision.ops.nms``; ties in score keep the lower index first).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou_matrix(boxes[order].float(), boxes[order].float())
    n = order.numel()
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(n):
        if bool(suppressed[i]):
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms` within each label (boxes of different labels never suppress each other)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # Shift each label's boxes to a region of their own, then one NMS does them all.
    span = (boxes.max() - boxes.min()).abs() + 1
    shifted = boxes + (labels.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)
