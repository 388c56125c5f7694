"""Object detectors for :class:`~visalign.rewards.GenEvalReward`: one interface, three implementations.

A detector takes images and, per image, the class names to look for, and returns per image a
list of :class:`~visalign.rewards.geneval_rules.DetectedObject` ``(label, box xyxy in pixels, score,
colour or None)``::

    detector(images, [["cat", "dog"], ["car"]])   # -> [[DetectedObject(...), ...], [...]]

- :class:`OwlV2Detector`: OWLv2 (or OWL-ViT v1) from transformers, text queries = the classes;
- :class:`GroundingDinoDetector`: Grounding DINO from transformers, one ``"cat . dog ."`` text per image;
- :class:`ToyDetector`: the toy world's exact evaluator (:func:`visalign.toy.detect`), which also
  reports each object's colour, so GenEval's rules can be checked end to end on toy renders.

Both transformers detectors use the PIL image processors (no torchvision; OWLv2's needs scipy, the
``geneval`` extra), keep boxes scoring at least ``min_score`` and run a per-class non-maximum
suppression written here in torch (:func:`nms`), since ``torchvision.ops`` is not available.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from visalign.errors import ConfigError, InvalidInputError, require
from visalign.rewards.base import freeze
from visalign.rewards.geneval_rules import DetectedObject
from visalign.rewards.loading import from_pretrained

__all__ = [
    "Detector",
    "DetectedObject",
    "OwlV2Detector",
    "GroundingDinoDetector",
    "ToyDetector",
    "box_iou_matrix",
    "nms",
    "batched_nms",
    "cxcywh_to_xyxy",
    "tiny_owl",
    "tiny_grounding_dino",
]


@runtime_checkable
class Detector(Protocol):
    """What :class:`~visalign.rewards.GenEvalReward` needs from a detector.

    ``detector(images, queries)``: ``images`` (B, 3, H, W) floats in [0, 1], ``queries`` B lists of
    class names; returns B lists of :class:`DetectedObject` whose ``label`` is one of that image's
    queries and whose ``box`` is in pixels of the image (x0, y0, x1, y1).
    """

    def __call__(self, images: torch.Tensor, queries: Sequence[Sequence[str]]) -> list[list[DetectedObject]]: ...


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


def _uint8_images(images: torch.Tensor) -> list[torch.Tensor]:
    """(B, 3, H, W) floats in [0, 1] -> B uint8 CHW CPU tensors (what the PIL processors take)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(f"a detector takes images shaped (B, 3, H, W) in [0, 1]; got {shape}.")
    return list((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())


def _check_queries(queries: Sequence[Sequence[str]], batch: int) -> list[list[str]]:
    if len(queries) != batch or any(isinstance(q, str) for q in queries):
        raise InvalidInputError(f"a detector takes one list of class names per image ({batch}); got {queries!r}.")
    return [list(dict.fromkeys(str(c) for c in q)) for q in queries]


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
        queries = _check_queries(queries, len(pil))
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
        queries = _check_queries(queries, len(pil))
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

    def __init__(self, report_colors: bool = True):
        super().__init__()
        self.report_colors = bool(report_colors)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, queries: Sequence[Sequence[str]]) -> list[list[DetectedObject]]:
        import math

        from visalign.toy import detect
        from visalign.toy.readout import _CENTROID_DROP, _UNIT_AREA

        queries = _check_queries(queries, images.shape[0])
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


# ----------------------------------------------------------------------------- tiny models (tests, benchmarks)
def tiny_owl(v2: bool = True, seed: int = 0):
    """A tiny random OWLv2 (or OWL-ViT v1 with ``v2=False``) at 32 px and its processor, offline.

    1-layer towers, width 32, 8-px patches (16 boxes per image), the tiny word-level CLIP tokenizer
    of :mod:`visalign.testing.rewards`. OWLv2's PIL image processor needs scipy.

    Returns:
        `(model, processor)`, the model in eval mode.
    """
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessorPil,
        OwlViTProcessor,
    )

    from visalign.testing.rewards import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(model_max_length=16)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(seed)
    size = {"height": 32, "width": 32}
    if v2:
        model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
        return model.eval(), Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size=size), tokenizer=tok)
    model = OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tok)
    return model.eval(), processor


#: The words of :func:`tiny_grounding_dino`'s word-level tokenizer (any other word is [UNK]).
TINY_GDINO_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "cat", "dog", "hot", "car", "person", "circle", "square")


def tiny_grounding_dino(seed: int = 0):
    """A tiny random Grounding DINO (Swin 2 stages of 1 block, 1-layer BERT, 1 encoder and 2 decoder
    layers, 20 queries) with a word-level fast tokenizer and the PIL image processor at 64-96 px.

    Returns:
        `(model, processor)`, the model in eval mode.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        PreTrainedTokenizerFast,
        SwinConfig,
    )

    words = TINY_GDINO_WORDS
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_level.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4, image_size=64,
                                   out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, num_feature_levels=2,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32, use_timm_backbone=False,
        use_pretrained_backbone=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    return GroundingDinoForObjectDetection(config).eval(), GroundingDinoProcessor(image_processor, tok)
