"""Yes-token rewards from vision-language models (RewardDance / VQAScore style).

Ask a VLM a yes/no question about the image and read the probability of "yes" as the next token:

- VQAScore (Lin et al. 2024, arXiv 2404.01291): ``P("Yes" | image, 'Does this figure show
  "{prompt}"? Please answer yes or no.')``.
- RewardDance (arXiv 2509.08826) frames reward modelling the same way, pointwise or pairwise: given
  the generated image **and a reference image** plus task criteria, the reward is P("yes", i.e. the
  generated image is better).

``normalize=True`` reports ``P(yes) / (P(yes) + P(no))``; ``normalize=False`` reports ``P(yes)``
under the full-vocabulary softmax. "yes" and "no" each cover every single-token spelling the
tokenizer has: lower/upper/title case, with and without a leading space (``Ġ``/``▁``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.rewards.base import Reward, freeze
from visalign.rewards.checks import check_images
from visalign.rewards.loading import from_pretrained
from visalign.rewards.preprocess import ImageTransform

__all__ = ["YesTokenReward", "answer_token_ids", "DEFAULT_QUESTION", "DEFAULT_PAIRWISE_QUESTION", "DEFAULT_CRITERIA"]

DEFAULT_QUESTION = 'Does this image show "{prompt}"? Please answer yes or no.'
DEFAULT_CRITERIA = "Judge how well each image matches the prompt, its visual quality and its plausibility."
DEFAULT_PAIRWISE_QUESTION = (
    "The first image is a reference and the second image is a candidate, both generated for the "
    'prompt "{prompt}". {criteria} Is the second image better than the first? Please answer yes '
    "or no."
)


def answer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The ids of every single-token spelling of ``words``.

    For each word it tries the lower, title and upper case forms, each bare and with a leading
    space, encoded without special tokens, and keeps those that encode to exactly one token; it
    also looks up the vocabulary's ``Ġ``/``▁``-prefixed forms directly.

    Args:
        tokenizer: a transformers tokenizer.
        words: e.g. ``("yes",)``.

    Returns:
        `list[int]`: sorted distinct ids.

    Raises:
        ConfigError: no spelling is a single token.
    """
    ids: set[int] = set()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for word in words:
        forms = {word, word.lower(), word.capitalize(), word.upper()}
        for form in forms:
            for text in (form, " " + form):
                enc = tokenizer.encode(text, add_special_tokens=False)
                if len(enc) == 1 and enc[0] != unk:
                    ids.add(int(enc[0]))
            for piece in (form, "Ġ" + form, "▁" + form):
                if piece in vocab:
                    ids.add(int(vocab[piece]))
    if not ids:
        raise ConfigError(
            f"none of the spellings of {list(words)} is a single token of "
            f"{type(tokenizer).__name__}; pass other yes_words/no_words."
        )
    return sorted(ids)


class YesTokenReward(Reward):
    """P("yes") from a VLM asked whether the image fits the prompt (RewardDance, VQAScore).

    Works with any transformers image-text-to-text model (LLaVA, Qwen2-VL, ...) and its
    processor. The question is rendered with the processor's chat template when it has one
    (otherwise as ``"<image>\\n" + question``), and the next-token distribution after the
    generation prompt is read.

    Modes:
        - ``"pointwise"``: ``question`` (with ``{prompt}``) about one image.
        - ``"pairwise"``: two images per sample, the reference first (``reference_images=``, a
          (B, 3, H, W) tensor) and the generated one second, with ``pairwise_question`` (``{prompt}``
          and ``{criteria}``). The score is P(yes = the generated image is better).

    Gradients: by default (``differentiable=False``) images go through the processor's own
    (PIL) path as uint8. With ``differentiable=True`` the pixel values are built in torch
    (:class:`~visalign.rewards.preprocess.ImageTransform` from the processor's settings), so
    gradients reach the pixels; this needs a CLIP-style image processor (LLaVA-1.5 and similar).

    Args:
        model: a hub id / folder (``AutoModelForImageTextToText.from_pretrained``) or a built model.
        processor: its processor (hub id, folder or object); defaults to ``model`` when a string.
        question: the pointwise template; ``{prompt}`` is replaced by the prompt.
        mode: or ``"pairwise"`` (default "pointwise").
        criteria: the task criteria of the pairwise template.
        pairwise_question: the pairwise template (``{prompt}``, ``{criteria}``).
        normalize: ``P(yes) / (P(yes) + P(no))`` instead of ``P(yes)`` (default True).
        yes_words, no_words: the answers; all single-token spellings are summed.
        system_prompt: a system message for the chat template.
        use_chat_template: defaults to whether the processor has one.
        batch_size, torch_dtype, name, differentiable: as for every :class:`Reward` (defaults 8, fp32,
            the class name, False).
    """

    default_name = "yes_token"
    default_differentiable = False

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        question: str = DEFAULT_QUESTION,
        mode: str = "pointwise",
        criteria: str = DEFAULT_CRITERIA,
        pairwise_question: str = DEFAULT_PAIRWISE_QUESTION,
        normalize: bool = True,
        yes_words: Sequence[str] = ("yes",),
        no_words: Sequence[str] = ("no",),
        system_prompt: str | None = None,
        use_chat_template: bool | None = None,
        batch_size: int | None = 8,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = False,
    ):
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if mode not in ("pointwise", "pairwise"):
            raise ConfigError(f"mode must be 'pointwise' or 'pairwise'; got {mode!r}.")
        if processor is None and isinstance(model, (str, os.PathLike)):
            processor = model
        if processor is None:
            raise ConfigError("YesTokenReward needs the model's processor: pass processor=.")
        self.model = freeze(from_pretrained(AutoModelForImageTextToText, model, what="VLM", torch_dtype=torch_dtype))
        self.processor = from_pretrained(AutoProcessor, processor, what="VLM processor")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.yes_token_ids = answer_token_ids(tokenizer, yes_words)
        self.no_token_ids = answer_token_ids(tokenizer, no_words)
        overlap = set(self.yes_token_ids) & set(self.no_token_ids)
        if overlap:
            raise ConfigError(f"yes and no answers share token ids {sorted(overlap)}.")
        self.mode, self.question, self.criteria = mode, question, criteria
        self.pairwise_question, self.normalize = pairwise_question, normalize
        self.system_prompt = system_prompt
        if use_chat_template is None:
            use_chat_template = getattr(self.processor, "chat_template", None) is not None
        self.use_chat_template = use_chat_template
        self.transform = ImageTransform.from_processor(self.processor.image_processor) if differentiable else None
        try:
            self._keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            self._keep_last = False

    # -- prompt construction ------------------------------------------------------------------
    def render(self, prompt: str) -> str:
        """The full text fed to the model for ``prompt`` (chat template applied)."""
        n_images = 2 if self.mode == "pairwise" else 1
        template = self.pairwise_question if self.mode == "pairwise" else self.question
        text = template.replace("{prompt}", prompt).replace("{criteria}", self.criteria)
        if not self.use_chat_template:
            token = getattr(self.processor, "image_token", "<image>")
            return "\n".join([token] * n_images + [text])
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # -- scoring ------------------------------------------------------------------------------
    def probabilities(
        self, images: torch.Tensor, prompts: list[str], reference_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P(yes), P(no))``, each (B,) float32, under the full-vocabulary softmax."""
        self.place(images.device)
        batch = images.shape[0]
        if self.mode == "pairwise":
            if reference_images is None:
                raise InvalidInputError(
                    f"{self.name}: pairwise mode needs reference_images=, a "
                    f"(B, 3, H, W) tensor in [0, 1] with B={batch}."
                )
            check_images(reference_images, "image", name=f"{self.name} reference_images")
            if reference_images.shape[0] != batch:
                raise InvalidInputError(
                    f"{self.name}: got {reference_images.shape[0]} reference images for {batch} "
                    "images; pass one per image."
                )
            groups = [[reference_images[i], images[i]] for i in range(batch)]
        elif reference_images is not None:
            raise InvalidInputError(f"{self.name}: reference_images is only used with mode='pairwise'.")
        else:
            groups = [[images[i]] for i in range(batch)]
        as_uint8 = [[(im.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu() for im in g] for g in groups]
        pil_images = as_uint8 if self.mode == "pairwise" else [g[0] for g in as_uint8]
        texts = [self.render(p) for p in prompts]
        enc = self._encode(texts, pil_images)
        device = images.device
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        if self.transform is not None:
            flat = torch.stack([im for g in groups for im in g])
            pixels = self.transform(flat, dtype=dtype)
            if tuple(pixels.shape) != tuple(inputs["pixel_values"].shape):
                raise ConfigError(
                    f"{self.name}: differentiable=True builds pixel_values of shape "
                    f"{tuple(pixels.shape)} but the processor makes "
                    f"{tuple(inputs['pixel_values'].shape)}; use differentiable=False with this "
                    "processor."
                )
            inputs["pixel_values"] = pixels
        mask = inputs.get("attention_mask")
        last_is_real = mask is None or bool(mask[:, -1].all())
        if self._keep_last and last_is_real:
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]
        else:
            logits = self.model(**inputs).logits
            if mask is None:
                logits = logits[:, -1]
            else:  # the last real token of each row, whatever the padding side
                last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
                logits = logits[torch.arange(batch, device=logits.device), last]
        probs = logits.float().softmax(-1)
        p_yes = probs[:, self.yes_token_ids].sum(-1)
        p_no = probs[:, self.no_token_ids].sum(-1)
        return p_yes, p_no

    def _encode(self, texts: list[str], images: list) -> dict:
        tokenizer = getattr(self.processor, "tokenizer", None)
        side = getattr(tokenizer, "padding_side", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # the next-token position is then the last column
        try:
            return dict(self.processor(images=images, text=texts, padding=True, return_tensors="pt"))
        finally:
            if tokenizer is not None and side is not None:
                tokenizer.padding_side = side

    def score(
        self, images: torch.Tensor, prompts: list[str], reference_images: torch.Tensor | None = None
    ) -> torch.Tensor:
        p_yes, p_no = self.probabilities(images, prompts, reference_images)
        if self.normalize:
            return p_yes / (p_yes + p_no).clamp_min(torch.finfo(torch.float32).tiny)
        return p_yes
