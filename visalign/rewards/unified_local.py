"""A UnifiedReward judge run locally: :class:`LocalVLMJudge`, a transformers VLM decoding greedily.

Any image-text-to-text model and its processor; the prompt goes through the processor's chat
template when it has one. It answers ``(images, text)`` requests as
:class:`~visalign.rewards.unified.UnifiedReward` sends them; the endpoint alternative is
:class:`~visalign.rewards.unified_endpoint.ChatEndpointJudge`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.rewards.base import freeze
from visalign.rewards.loading import from_pretrained

__all__ = ["LocalVLMJudge"]


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) floats in [0, 1] -> (3, H, W) uint8 on the CPU."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class LocalVLMJudge(torch.nn.Module):
    """A transformers image-text-to-text model that answers in text (greedy decoding).

    Args:
        model: a hub id / folder (``AutoModelForImageTextToText``) or a built model.
        processor: its processor; defaults to ``model`` when a string.
        max_new_tokens: the answer's length limit (default 256: room for a justification and the verdict).
        system_prompt: a system message for the chat template.
        use_chat_template: defaults to whether the processor has one (else ``"<image>\\n" + text``).
        torch_dtype: the dtype to load the weights in.
    """

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        max_new_tokens: int = 256,
        system_prompt: str | None = None,
        use_chat_template: bool | None = None,
        torch_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if processor is None and isinstance(model, (str, os.PathLike)):
            processor = model
        if processor is None:
            raise ConfigError("a local judge needs the model's processor: pass processor=.")
        if int(max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
        self.model = freeze(from_pretrained(AutoModelForImageTextToText, model, what="VLM", torch_dtype=torch_dtype))
        self.processor = from_pretrained(AutoProcessor, processor, what="VLM processor")
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt
        if use_chat_template is None:
            use_chat_template = getattr(self.processor, "chat_template", None) is not None
        self.use_chat_template = use_chat_template

    def train(self, mode: bool = True):  # frozen: stays in eval mode
        self.training = mode
        return self

    def render(self, text: str, n_images: int) -> str:
        """The full prompt for ``text`` after ``n_images`` images (chat template applied)."""
        if not self.use_chat_template:
            token = getattr(self.processor, "image_token", "<image>")
            return "\n".join([token] * n_images + [text])
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def generate(self, requests: Sequence[tuple[Sequence[torch.Tensor], str]]) -> list[str]:
        """Answers each ``(images, text)`` request; all requests of one call have the same image count."""
        counts = {len(images) for images, _ in requests}
        if len(counts) != 1:
            raise InvalidInputError("LocalVLMJudge.generate: every request of one call needs the same image count.")
        n = counts.pop()
        texts = [self.render(text, n) for _, text in requests]
        pictures = [[_to_uint8(im) for im in images] for images, _ in requests]
        if n == 1:
            pictures = [p[0] for p in pictures]
        tokenizer = getattr(self.processor, "tokenizer", None)
        side = getattr(tokenizer, "padding_side", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generated tokens then start at one column for all rows
        try:
            enc = dict(self.processor(images=pictures, text=texts, padding=True, return_tensors="pt"))
        finally:
            if tokenizer is not None and side is not None:
                tokenizer.padding_side = side
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad if pad is not None else eos,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        decode = tokenizer.batch_decode if tokenizer is not None else self.processor.batch_decode
        return [s.strip() for s in decode(new, skip_special_tokens=True)]
