"""The transformers detectors for :class:`~visalign.rewards.GenEvalReward`: OWLv2 / OWL-ViT and Grounding DINO.

Both follow :class:`~visalign.rewards.detection.Detector`: images and, per image, the class names to
look for in; per image a list of :class:`~visalign.rewards.detection.DetectedObject` out::

    detector(images, [["cat", "dog"], ["car"]])   # -> [[DetectedObject(...), ...], [...]]

- :class:`OwlV2Detector`: OWLv2 (or OWL-ViT v1) from transformers, text queries = the classes;
- :class:`GroundingDinoDetector`: Grounding DINO from transformers, one ``"cat . dog ."`` text per image.

Both use the PIL image processors (no torchvision; OWLv2's needs scipy, the ``geneval`` extra),
keep boxes scoring at least ``min_score`` and run the per-class non-maximum suppression of
:mod:`visalign.rewards.detection`.

The other detector names live next door and are importable from here too: the interface and the
box arithmetic (:mod:`visalign.rewards.detection`), the toy world's evaluator
(:class:`visalign.toy.geneval_detector.ToyDetector`) and the tiny random models for tests and
benchmarks (:mod:`visalign.testing.detectors`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visalign.errors import ConfigError, InvalidInputError, require
from visalign.rewards.base import freeze
from visalign.rewards.detection import (
    DetectedObject,
    Detector,
    batched_nms,
    box_iou_matrix,
    check_queries,
    cxcywh_to_xyxy,
    nms,
)
from visalign.rewards.loading import from_pretrained

__all__ = [
    "Detector",
    "DetectedObject",
    "OwlV2Detector",
    "GroundingDinoDetector",
    "box_iou_matrix",
    "nms",
    "batched_nms",
    "cxcywh_to_xyxy",
]


def _uint8_images(images: torch.Tensor) -> list[torch.Tensor]:
    """(B, 3, H, W) floats in [0, 1] -> B uint8 CHW CPU tensors (what the PIL processors take)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(f"a detector takes images shaped (B, 3, H, W) in [0, 1]; got {shape}.")
    return list((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())


def _collect(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, names: list[str], min_score: float, iou: float
) -> list[DetectedObject]:
    """One image's detections above ``min_score`` after per-class NMS, best first."""
    keep = scores >= min_score
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = batched_nms(boxes, scores, labels, iou) if iou < 1 else torch.argsort(scores, descending=True)
    return [
        DetectedObject(names[int(labels[i])], tuple(float(v) for v in boxes[i].tolist()), float(scores[i]))
        for i in order.tolist()
    ]


class _TransformersDetector(nn.Module):
    """Shared loading and placement of a frozen transformers detector and its processor parts."""

    default_model = ""

    def __init__(self, model: Any, processor: Any, *, min_score: float, nms_iou: float, torch_dtype: Any):
        super().__init__()
        from transformers import AutoModelForZeroShotObjectDetection

        if not 0 <= float(min_score) <= 1 or not 0 < float(nms_iou) <= 1:
            raise ConfigError(f"need 0 <= min_score <= 1 and 0 < nms_iou <= 1; got {min_score}, {nms_iou}.")
        self.min_score, self.nms_iou = float(min_score), float(nms_iou)
        self.model = freeze(
            from_pretrained(AutoModelForZeroShotObjectDetection, model, what="detector", torch_dtype=torch_dtype)
        )
        if processor is None and isinstance(model, (str, os.PathLike)):
            processor = model
        if processor is None:
            raise ConfigError(
                f"{type(self).__name__} needs the model's processor (or a hub id / folder holding one): "
                "pass processor=."
            )
        self.image_processor, self.tokenizer = self._processor_parts(processor)

    def _image_processor_class(self):
        raise NotImplementedError

    def _processor_parts(self, processor: Any) -> tuple[Any, Any]:
        if isinstance(processor, (str, os.PathLike)):
            from transformers import AutoTokenizer

            cls = self._image_processor_class()
            return (
                from_pretrained(cls, processor, what="detector image processor"),
                from_pretrained(AutoTokenizer, processor, what="detector tokenizer"),
            )
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise ConfigError(
                f"{type(self).__name__}: processor= must have .image_processor and .tokenizer (a transformers "
                f"processor), or be a hub id / folder; got {type(processor).__name__}."
            )
        return image_processor, tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True):  # the detector stays in eval mode
        self.training = mode
        return self


class OwlV2Detector(_TransformersDetector):
    """OWLv2 (Minderer et al., arXiv 2306.09683) or OWL-ViT v1 from transformers, queried with the class names.

    Each image is asked ``query_template.format(class)`` for each of its classes; every image patch
    predicts a box and a logit per query, a box's score is the sigmoid of its best query's logit and
    its label that query's class. Boxes scoring at least ``min_score`` go through per-class NMS.

    Preprocessing is the model's PIL image processor (OWLv2: pad to a square with grey at the bottom
    and right, resize, normalise; its boxes are relative to the padded square, which is undone
    here). OWLv2's PIL processor needs scipy: ``pip install "visalign[geneval]"``.

    Args:
        model: a hub id / folder (``AutoModelForZeroShotObjectDetection``) or a built
            ``Owlv2ForObjectDetection`` / ``OwlViTForObjectDetection``.
        processor: a processor (with ``.image_processor`` and ``.tokenizer``) or a hub id / folder;
            defaults to ``model`` when that is a string.
        query_template: how a class becomes a text query (default ``"a photo of a {}"``, OWL's usage).
        min_score: the lowest box score returned (default 0.1; GenEval's rules then keep > 0.3).
        nms_iou: per-class NMS IoU threshold (default 0.5; 1 turns NMS off).
        torch_dtype: the dtype to load the weights in.
    """

    default_model = "google/owlv2-base-patch16-ensemble"

    def __init__(
        self,
        model: Any = default_model,
        processor: Any = None,
        *,
        query_template: str = "a photo of a {}",
        min_score: float = 0.1,
        nms_iou: float = 0.5,
        torch_dtype: torch.dtype | None = None,
    ):
        super().__init__(model, processor, min_score=min_score, nms_iou=nms_iou, torch_dtype=torch_dtype)
        model_type = getattr(self.model.config, "model_type", "")
        if model_type not in ("owlv2", "owlvit"):
            raise ConfigError(f"OwlV2Detector takes an OWLv2 or OWL-ViT model; got model_type {model_type!r}.")
        self.padded_square = model_type == "owlv2"
        if self.padded_square and type(self.image_processor).__name__.startswith("Owlv2"):
            require("scipy", "geneval", "OwlV2Detector (OWLv2's PIL image processor resizes with scipy)")
        if "{}" not in query_template:
            raise ConfigError(f"query_template must contain '{{}}' for the class name; got {query_template!r}.")
        self.query_template = query_template
        text_cfg = getattr(self.model.config, "text_config", None)
        self.max_length = int(getattr(text_cfg, "max_position_embeddings", 16) or 16)

    def _image_processor_class(self):
        import transformers

        return transformers.Owlv2ImageProcessorPil if self._is_v2_source() else transformers.OwlViTImageProcessorPil

    def _is_v2_source(self) -> bool:
        return getattr(self.model.config, "model_type", "owlv2") == "owlv2"

    @torch.no_grad()
    def forward(self, images: torch.Tensor, queries: Sequence[Sequence[str]]) -> list[list[DetectedObject]]:
        pil = _uint8_images(images)
        queries = check_queries(queries, len(pil))
        width = max(1, max(len(q) for q in queries))
        texts = [self.query_template.format(c) for q in queries for c in q + [""] * (width - len(q))]
        texts = [t if t.strip() else " " for t in texts]
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        device, dtype = self.device, self.dtype
        out = self.model(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            pixel_values=pixels.to(device, dtype),
        )
        logits = out.logits.float()  # (B, patches, width)
        real = torch.tensor([[j < len(q) for j in range(width)] for q in queries], device=logits.device)
        logits = logits.masked_fill(~real[:, None, :], float("-inf"))
        scores, labels = logits.sigmoid().max(-1)
        boxes = cxcywh_to_xyxy(out.pred_boxes.float())
        results = []
        for i, q in enumerate(queries):
            h, w = images.shape[-2:]
            scale = [max(h, w)] * 4 if self.padded_square else [w, h, w, h]
            b = boxes[i] * torch.tensor(scale, dtype=boxes.dtype, device=boxes.device)
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], -1)
            results.append(_collect(b.cpu(), scores[i].cpu(), labels[i].cpu(), q, self.min_score, self.nms_iou))
        return results


class GroundingDinoDetector(_TransformersDetector):
    """Grounding DINO (Liu et al., arXiv 2303.05499) from transformers.

    Each image gets one text, its classes joined as ``"cat . dog ."``. The model scores every query
    box against every text token; a class's score for a box is the highest sigmoid over the class's
    tokens, the box's label is the best class and its score that maximum. Boxes scoring at least
    ``min_score`` (Grounding DINO's ``box_threshold``) go through per-class NMS. Preprocessing is
    ``GroundingDinoImageProcessorPil`` (resize keeping the aspect, normalise, pad with a pixel mask);
    the tokenizer must be a fast one (its offsets locate each class's tokens).

    Args:
        model: a hub id / folder or a built ``GroundingDinoForObjectDetection``.
        processor: a processor (``.image_processor``, ``.tokenizer``) or a hub id / folder; defaults
            to ``model`` when that is a string.
        min_score: the lowest box score returned (default 0.1).
        nms_iou: per-class NMS IoU threshold (default 0.5; 1 turns NMS off).
        torch_dtype: the dtype to load the weights in.
    """

    default_model = "IDEA-Research/grounding-dino-tiny"

    def __init__(
        self,
        model: Any = default_model,
        processor: Any = None,
        *,
        min_score: float = 0.1,
        nms_iou: float = 0.5,
        torch_dtype: torch.dtype | None = None,
    ):
        super().__init__(model, processor, min_score=min_score, nms_iou=nms_iou, torch_dtype=torch_dtype)
        model_type = getattr(self.model.config, "model_type", "")
        if model_type != "grounding-dino":
            raise ConfigError(f"GroundingDinoDetector takes a Grounding DINO model; got model_type {model_type!r}.")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("GroundingDinoDetector needs a fast tokenizer (it reads token offsets).")

    def _image_processor_class(self):
        from transformers import GroundingDinoImageProcessorPil

        return GroundingDinoImageProcessorPil

    def _text(self, classes: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """``"cat . dog ."`` and each class's character span in it."""
        text, spans = "", []
        for c in classes:
            start = len(text)
            text += c.lower()
            spans.append((start, len(text)))
            text += " . "
        return text.strip(), spans

    @torch.no_grad()
    def forward(self, images: torch.Tensor, queries: Sequence[Sequence[str]]) -> list[list[DetectedObject]]:
        pil = _uint8_images(images)
        queries = check_queries(queries, len(pil))
        texts, spans = zip(*(self._text(q or ["object"]) for q in queries))
        enc = self.tokenizer(list(texts), padding=True, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")
        max_len = int(getattr(self.model.config, "max_text_len", 256))
        if enc["input_ids"].shape[1] > max_len:
            raise InvalidInputError(
                f"GroundingDinoDetector: the class list {queries} needs {enc['input_ids'].shape[1]} tokens; "
                f"the model reads at most {max_len}."
            )
        pixels = self.image_processor(images=pil, return_tensors="pt")
        device, dtype = self.device, self.dtype
        out = self.model(
            pixel_values=pixels["pixel_values"].to(device, dtype),
            pixel_mask=pixels["pixel_mask"].to(device) if "pixel_mask" in pixels else None,
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            token_type_ids=torch.zeros_like(enc["input_ids"]).to(device),
        )
        probs = out.logits.float().sigmoid().cpu()  # (B, boxes, max_text_len)
        boxes = cxcywh_to_xyxy(out.pred_boxes.float()).cpu()
        h, w = images.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype)
        results = []
        for i, q in enumerate(queries):
            if not q:
                results.append([])
                continue
            per_class = []
            for start, end in spans[i]:
                tokens = [
                    t
                    for t, (a, b) in enumerate(offsets[i].tolist())
                    if b > a and a >= start and b <= end and t < probs.shape[-1] and enc["attention_mask"][i, t]
                ]
                if not tokens:
                    raise InvalidInputError(f"GroundingDinoDetector: the class {q[len(per_class)]!r} has no tokens.")
                per_class.append(probs[i][:, tokens].max(-1).values)
            scores, labels = torch.stack(per_class, -1).max(-1)
            b = (boxes[i] * scale).clamp_min(0)
            b = torch.stack(
                [b[:, 0].clamp(max=w), b[:, 1].clamp(max=h), b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)], -1
            )
            results.append(_collect(b, scores, labels, q, self.min_score, self.nms_iou))
        return results
