"""GenEval-style compositional reward without mmdetection: :class:`GenEvalReward`.

GenEval (Ghosh et al., arXiv 2310.11513) checks object presence, counts, colours and relative
positions with a detector; Flow-GRPO trains against it. Here the rules are GenEval's
(:mod:`visalign.rewards.geneval_rules`), the detector is anything that follows
:class:`~visalign.rewards.detectors.Detector` (OWLv2 or Grounding DINO from transformers, or the
toy world's exact evaluator), and colours come from zero-shot CLIP on the box crops
(:class:`CLIPColorClassifier`) unless the detector reports them::

    reward = GenEvalReward("owlv2")                      # OWLv2 + CLIP ViT-L/14 (downloads both)
    reward(images, ["a photo of three dogs", "a photo of a red car"])        # strict 0/1 per image
    reward(images, prompts, metadata=[{...}, {...}])     # GenEval metadata instead of parsing
    GenEvalReward("toy")(toy_images, ["a photo of a circle left of a square"])

The thresholds were calibrated by GenEval for Mask2Former; with OWLv2 or Grounding DINO they are a
starting point to re-tune (``rules=GenEvalRules(threshold=..., counting_threshold=...)``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from visalign.errors import ConfigError, InvalidInputError
from visalign.rewards.base import Reward
from visalign.rewards.clip import CLIPEmbedder, _features
from visalign.rewards.detection import DetectedObject, Detector
from visalign.rewards.detectors import GroundingDinoDetector, OwlV2Detector
from visalign.rewards.geneval_rules import GenEvalResult, GenEvalRules, evaluate
from visalign.rewards.geneval_spec import GENEVAL_CLASSES, GENEVAL_COLORS, GenEvalSpec, parse_prompt

__all__ = ["GenEvalReward", "CLIPColorClassifier", "COLOR_TEMPLATES", "DEFAULT_CLIP"]

#: GenEval's three zero-shot templates; the text embeddings of the three are averaged per colour.
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
)
#: The CLIP GenEval classifies colours with (ViT-L/14, OpenAI weights).
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DETECTORS = ("owlv2", "grounding_dino", "toy")


class CLIPColorClassifier(nn.Module):
    """Zero-shot colour of box crops with CLIP, as GenEval does it.

    For each object class, each colour's text embedding is the normalised mean of the normalised
    embeddings of :data:`COLOR_TEMPLATES` (``{c}`` the colour, ``{cls}`` the class); a crop gets the
    colour whose embedding has the highest cosine with the crop's image embedding. Crops are the
    box (rounded outwards to whole pixels, at least one pixel) and go through the CLIP processor's
    own preprocessing (shortest side, centre crop, normalisation).

    Args:
        clip: a :class:`~visalign.rewards.CLIPEmbedder`, or a hub id / folder / built ``CLIPModel``.
        processor: the CLIP processor when ``clip`` is not an embedder (defaults to ``clip`` when a string).
        colors: the candidate colours (default GenEval's ten).
        templates: the zero-shot templates.
    """

    def __init__(
        self,
        clip: Any = DEFAULT_CLIP,
        processor: Any = None,
        *,
        colors: Sequence[str] = GENEVAL_COLORS,
        templates: Sequence[str] = COLOR_TEMPLATES,
        torch_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.clip = clip if isinstance(clip, CLIPEmbedder) else CLIPEmbedder(clip, processor, torch_dtype=torch_dtype)
        if not colors or not templates:
            raise ConfigError("CLIPColorClassifier needs at least one colour and one template.")
        self.colors, self.templates = tuple(colors), tuple(templates)
        self._text: dict[str, torch.Tensor] = {}

    def text_classifier(self, cls: str) -> torch.Tensor:
        """(colours, D) normalised text embeddings for ``cls`` (cached per class)."""
        if cls not in self._text:
            prompts = [t.format(c=c, cls=cls) for c in self.colors for t in self.templates]
            feats = self.clip.text_features(prompts).view(len(self.colors), len(self.templates), -1)
            mean = feats.mean(1)
            self._text[cls] = mean / mean.norm(dim=-1, keepdim=True)
        return self._text[cls]

    @torch.no_grad()
    def forward(self, image: torch.Tensor, cls: str, boxes: Sequence[Sequence[float]]) -> list[str]:
        """The colour of each box of one image (3, H, W) in [0, 1]."""
        if not boxes:
            return []
        h, w = image.shape[-2:]
        crops = []
        for box in boxes:
            x0, y0 = int(max(0, min(w - 1, box[0] // 1))), int(max(0, min(h - 1, box[1] // 1)))
            x1, y1 = int(max(x0 + 1, min(w, -(-box[2] // 1)))), int(max(y0 + 1, min(h, -(-box[3] // 1))))
            crops.append(self.clip.transform(image[None, :, y0:y1, x0:x1].float(), dtype=self.clip.dtype))
        device = next(self.clip.model.parameters()).device
        feats = _features(self.clip.model.get_image_features(pixel_values=torch.cat(crops).to(device))).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        best = (feats @ self.text_classifier(cls).to(feats.device).T).argmax(-1)
        return [self.colors[i] for i in best.tolist()]


class GenEvalReward(Reward):
    """GenEval's compositional score: detect the prompt's objects, then check GenEval's rules.

    Each sample's spec comes from its GenEval metadata when given (``metadata=`` a dict or JSON
    string per sample, or the columns ``tag`` / ``include`` / ``exclude`` of GenEval's
    ``evaluation_metadata.jsonl``, which trainers pass on from a prompt file), else from parsing the
    prompt (:func:`~visalign.rewards.geneval_rules.parse_prompt`). The detector is asked for the
    spec's classes, the detections go through :class:`GenEvalRules` (confidence 0.3, 0.9 for
    counting, at most 16 per class), colours come from the detector or from CLIP on the box crops.

    The score is GenEval's strict 0/1, or with ``partial=True`` the mean clause credit (Flow-GRPO's
    ``1 − |n − k| / k`` for counts, see :func:`~visalign.rewards.geneval_rules.evaluate`).
    :meth:`report` gives the full verdict per image (clauses, reasons, detections). Not
    differentiable. The score has no named parts: the clauses differ from prompt to prompt.

    Args:
        detector: ``"owlv2"``, ``"grounding_dino"``, ``"toy"``, or a :class:`Detector` (e.g. a built
            :class:`~visalign.rewards.detectors.OwlV2Detector`).
        model: the detector's hub id / folder / built model, for the named detectors (defaults:
            ``google/owlv2-base-patch16-ensemble``, ``IDEA-Research/grounding-dino-tiny``).
        processor: the detector's processor, when ``model`` is a built model.
        clip: the colour classifier: a :class:`CLIPColorClassifier`, a CLIP hub id / folder / built
            ``CLIPModel`` (with ``clip_processor``), ``None`` for none (then prompts with a colour
            need a detector that reports colours), or ``"auto"`` (default): none for the toy detector
            (it reports colours), GenEval's CLIP ViT-L/14 for any other (loaded when the reward is built).
        clip_processor: the CLIP processor when ``clip`` is a built model.
        partial: score partial credit instead of GenEval's 0/1 (default False).
        rules: the thresholds (default :class:`GenEvalRules`: GenEval's).
        classes: the class vocabulary prompts are parsed with; ``"auto"`` (default): GenEval's 80
            classes, or the toy world's shapes for the toy detector; ``None``: any noun phrase.
        colors: the colour words of prompts and the colour classifier (default GenEval's ten).
        detector_kwargs: extra options of the named detector (``min_score``, ``nms_iou``, ...).
        batch_size, torch_dtype, name: as for every :class:`Reward` (defaults 16, fp32, "geneval").

    Raises (when scoring):
        InvalidInputError: a prompt none of the GenEval forms parses (the message shows them), or
            malformed metadata.
    """

    default_name = "geneval"
    default_differentiable = False
    needs_prompts = False

    def __init__(
        self,
        detector: str | Detector = "owlv2",
        *,
        model: Any = None,
        processor: Any = None,
        clip: Any = "auto",
        clip_processor: Any = None,
        partial: bool = False,
        rules: GenEvalRules | Mapping[str, Any] | None = None,
        classes: Sequence[str] | str | None = "auto",
        colors: Sequence[str] = GENEVAL_COLORS,
        detector_kwargs: Mapping[str, Any] | None = None,
        batch_size: int | None = 16,
        torch_dtype: torch.dtype | str | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name, differentiable=False, batch_size=batch_size)
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
        self.detector = self._build_detector(detector, model, processor, dict(detector_kwargs or {}), torch_dtype)
        if clip == "auto":
            reads_colors = getattr(self.detector, "report_colors", False)
            clip = None if reads_colors else getattr(self.detector, "color_model", DEFAULT_CLIP)
        if clip is None or isinstance(clip, CLIPColorClassifier):
            self.color_classifier = clip
        else:
            self.color_classifier = CLIPColorClassifier(clip, clip_processor, colors=colors, torch_dtype=torch_dtype)
        if isinstance(rules, Mapping):
            rules = GenEvalRules(**rules)
        self.rules = rules or GenEvalRules()
        if classes == "auto":
            classes = getattr(self.detector, "vocabulary", None) or GENEVAL_CLASSES
        self.classes = None if classes is None else tuple(classes)
        self.colors = tuple(colors)
        self.partial = bool(partial)

    @staticmethod
    def _build_detector(detector, model, processor, kwargs, torch_dtype) -> Detector:
        if not isinstance(detector, str):
            if not callable(detector):
                raise ConfigError(f"detector must be one of {DETECTORS} or a Detector; got {type(detector).__name__}.")
            if model is not None or processor is not None or kwargs:
                raise ConfigError("model=, processor= and detector_kwargs= are for the named detectors only.")
            return detector
        if detector == "toy":  # the toy world's exact evaluator (visalign.toy.geneval_detector), found by name
            if model is not None or processor is not None:
                raise ConfigError("the toy detector has no model: drop model= and processor=.")
            return importlib.import_module("visalign.toy.geneval_detector").ToyDetector(**kwargs)
        if detector in ("owlv2", "owlvit"):
            return OwlV2Detector(model or OwlV2Detector.default_model, processor, torch_dtype=torch_dtype, **kwargs)
        if detector in ("grounding_dino", "grounding-dino", "groundingdino"):
            model = model or GroundingDinoDetector.default_model
            return GroundingDinoDetector(model, processor, torch_dtype=torch_dtype, **kwargs)
        raise ConfigError(f"unknown detector {detector!r}; use one of {DETECTORS} or pass a Detector.")

    # -- specs -------------------------------------------------------------------------------
    def parse(self, prompt: str) -> GenEvalSpec:
        """The spec of a GenEval-style prompt, with this reward's vocabulary."""
        return parse_prompt(prompt, classes=self.classes, colors=self.colors)

    def specs(
        self,
        batch: int,
        prompts: Sequence[str] | None,
        metadata: Sequence[Any] | None = None,
        tag: Sequence[Any] | None = None,
        include: Sequence[Any] | None = None,
        exclude: Sequence[Any] | None = None,
    ) -> list[GenEvalSpec]:
        """One spec per sample: from ``metadata``, else from the ``tag``/``include``/``exclude`` columns,
        else parsed from the prompt.
        """
        columns = {"metadata": metadata, "tag": tag, "include": include, "exclude": exclude}
        for key, value in columns.items():
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != batch):
                raise InvalidInputError(
                    f"{self.name}: {key}= must be a list with one entry per sample ({batch}); got "
                    f"{type(value).__name__}{'' if not isinstance(value, (list, tuple)) else f' of {len(value)}'}."
                )
        out = []
        for i in range(batch):
            prompt = prompts[i] if prompts is not None else None
            meta = metadata[i] if metadata is not None else None
            if meta is None and include is not None and include[i] is not None:
                meta = {"tag": tag[i] if tag is not None else None, "include": include[i]}
                if exclude is not None and exclude[i] is not None:
                    meta["exclude"] = exclude[i]
                if isinstance(meta["include"], str):  # a CSV column holds JSON text
                    meta["include"] = _json_column(meta["include"], "include")
                if isinstance(meta.get("exclude"), str):
                    meta["exclude"] = _json_column(meta["exclude"], "exclude")
            if meta is not None:
                out.append(GenEvalSpec.from_metadata(meta, prompt))
            elif prompt is not None:
                out.append(self.parse(prompt))
            else:
                raise InvalidInputError(
                    f"{self.name}: sample {i} has neither a prompt nor GenEval metadata; pass prompts or metadata=."
                )
        return out

    # -- scoring -----------------------------------------------------------------------------
    def _colors_of(self, image: torch.Tensor):
        def colors_of(cls: str, objects: Sequence[DetectedObject]) -> list[str]:
            if all(o.color is not None for o in objects):
                return [str(o.color) for o in objects]
            if self.color_classifier is None:
                raise ConfigError(
                    f"{self.name}: a prompt asks for the colour of {cls!r} but the detector reports no colours "
                    "and this reward has no colour classifier; pass clip= (a CLIP hub id, folder or model)."
                )
            guessed = self.color_classifier(image, cls, [o.box for o in objects])
            return [str(o.color) if o.color is not None else g for o, g in zip(objects, guessed)]

        return colors_of

    def report(self, images: torch.Tensor, prompts: Sequence[str] | None = None, **conditioning) -> list[GenEvalResult]:
        """The full verdict per image: strict and partial scores, each clause, GenEval's reasons and
        the detections kept. Takes the arguments of calling the reward.
        """
        from visalign.rewards.checks import check_images, check_prompts

        images = check_images(images, "image", name=self.name)
        prompts = check_prompts(prompts, images.shape[0], name=self.name, required=False)
        self.place(images.device)
        with torch.no_grad():
            return self._report(images, prompts, **conditioning)

    def _report(self, images, prompts, metadata=None, tag=None, include=None, exclude=None) -> list[GenEvalResult]:
        specs = self.specs(images.shape[0], prompts, metadata, tag, include, exclude)
        detections = self.detector(images, [s.classes for s in specs])
        if len(detections) != len(specs):
            raise InvalidInputError(
                f"{self.name}: the detector returned {len(detections)} lists for {len(specs)} images."
            )
        return [
            evaluate(spec, list(dets), self.rules, self._colors_of(images[i]))
            for i, (spec, dets) in enumerate(zip(specs, detections))
        ]

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str] | None,
        metadata: Sequence[Any] | None = None,
        tag: Sequence[Any] | None = None,
        include: Sequence[Any] | None = None,
        exclude: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        results = self._report(images, prompts, metadata, tag, include, exclude)
        values = [r.partial if self.partial else r.strict for r in results]
        return torch.tensor(values, dtype=torch.float32, device=images.device)

    def extra_repr(self) -> str:
        return f"detector={type(self.detector).__name__}, partial={self.partial}, {super().extra_repr()}"


def _json_column(value: str, what: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        raise InvalidInputError(f"GenEval metadata column {what!r} is not valid JSON: {value[:200]!r}") from None
