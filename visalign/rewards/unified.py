"""UnifiedReward-style judges: a VLM writes a verdict, a parser turns it into a score.

UnifiedReward (Wang et al., arXiv 2503.05236; Qwen2.5-VL / Qwen3-VL judges, MIT) is prompted with
the caption and the image (or two images) and answers in text; the score is read from the text:

- ``mode="pointwise"`` (v1): "... Final Score: 4" → ``x / 5`` (x in 1..5);
- ``mode="pointwise_v2"`` (v2.0): "Alignment Score (1-5): a", "Coherence Score (1-5): b",
  "Style Score (1-5): c" → ``(mean(a, b, c) − 1) / 4``, with the three as named parts;
- ``mode="pairwise"``: the generated image and a reference (``reference_images=``) →
  "Image 1 is better." / "Image 2 is better." / "Both images are equally good." → 1 / 0 / 0.5
  for the generated image (``both_orders=True`` also asks with the two swapped and averages).

The judge runs either locally (any transformers image-text-to-text model and its processor,
greedy ``generate``) or behind an OpenAI-compatible chat endpoint (vLLM, SGLang, ...:
``base_url=``, the served ``model`` name, the key from an environment variable), the images sent
losslessly as base64 PNG data URLs. Only the standard library talks to the endpoint.

**An answer that cannot be parsed** raises :class:`UnparseableAnswerError` (a
:class:`~visalign.errors.RewardError`, so a trainer skips the step instead of dying), quoting the
answer and the form expected: a judge that ignores the format is usually misconfigured (another
template, another model, too few new tokens), and scoring it 0 would train the policy on noise.
``on_unparseable="zero"`` instead scores such a sample 0 with a logged warning, as Flow-GRPO does;
``reward.unparseable`` counts them.

The templates here are written for visalign, in the spirit of UnifiedReward's; the released judges
were trained on their repository's exact wording, which ``template=`` accepts (``{prompt}`` is
replaced by the caption).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError, RewardError, RewardUnavailableError
from visalign.rewards.base import Reward, freeze
from visalign.rewards.checks import check_images
from visalign.rewards.loading import from_pretrained
from visalign.rewards.result import RewardResult

__all__ = [
    "UnifiedReward",
    "UnparseableAnswerError",
    "LocalVLMJudge",
    "ChatEndpointJudge",
    "POINTWISE_TEMPLATE",
    "POINTWISE_V2_TEMPLATE",
    "PAIRWISE_TEMPLATE",
    "MODES",
    "parse_pointwise",
    "parse_pointwise_v2",
    "parse_pairwise",
    "image_data_url",
    "JUDGE_API_KEY_ENV",
]

logger = logging.getLogger(__name__)

MODES = ("pointwise", "pointwise_v2", "pairwise")
JUDGE_API_KEY_ENV = "VISALIGN_JUDGE_API_KEY"

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
_TEMPLATES = {"pointwise": POINTWISE_TEMPLATE, "pointwise_v2": POINTWISE_V2_TEMPLATE, "pairwise": PAIRWISE_TEMPLATE}
_EXPECTED = {
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
        f"cannot read a {mode} score from the judge's answer {shown!r}: expected {_EXPECTED[mode]}. Check that the "
        "template matches the judge (template=), that max_new_tokens leaves room for the verdict, or pass "
        "on_unparseable='zero' to score such answers 0 with a warning."
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


# ----------------------------------------------------------------------------- images
def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) floats in [0, 1] -> (3, H, W) uint8 on the CPU."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def image_data_url(image: torch.Tensor) -> str:
    """A (3, H, W) image in [0, 1] as a ``data:image/png;base64,...`` URL (lossless, 8-bit)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- judges
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


class ChatEndpointJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, ...).

    One request per sample, ``max_concurrency`` at a time (the server batches them). Each request is
    a user message whose content holds the images as ``{"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}`` parts followed by the text part; greedy by default
    (``temperature`` 0).

    Failures: a refused connection, a timeout, HTTP 429 or 5xx are retried ``retries`` times with
    backoff ``backoff · 2^k`` s, then raise :class:`~visalign.errors.RewardUnavailableError` (trainers
    skip the step). 401/403 (the key) and 404 (wrong ``base_url`` or model name) raise
    :class:`~visalign.errors.ConfigError` at once; 400/413/422 raise
    :class:`~visalign.errors.InvalidInputError` with the server's message.

    Args:
        base_url: the API root, e.g. ``"http://127.0.0.1:8000/v1"`` (``/chat/completions`` is appended).
        model: the served model name.
        api_key: sent as ``Authorization: Bearer KEY``; when None, read from ``api_key_env``.
        api_key_env: the environment variable holding the key (default ``VISALIGN_JUDGE_API_KEY``;
            a dedicated name, so an OpenAI key is never sent to another server by accident).
        timeout: seconds per request (default 120).
        retries, backoff: see above (defaults 3, 0.5).
        max_tokens: the answer's length limit (default 512).
        temperature: sampling temperature (default 0).
        max_concurrency: requests in flight at once (default 8).
        system_prompt: an optional system message.
        extra_body: more fields for every request body (e.g. ``{"top_p": 1}``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str = JUDGE_API_KEY_ENV,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_tokens: int = 512,
        temperature: float = 0.0,
        max_concurrency: int = 8,
        system_prompt: str | None = None,
        extra_body: dict | None = None,
    ):
        parsed = urllib.parse.urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"base_url must look like http://HOST:PORT/v1; got {base_url!r}.")
        if not isinstance(model, str) or not model:
            raise ConfigError("an endpoint judge needs model=, the name the server serves the judge under.")
        if int(retries) < 0 or float(timeout) <= 0 or float(backoff) < 0 or int(max_concurrency) < 1:
            raise ConfigError(
                f"need retries >= 0, timeout > 0, backoff >= 0, max_concurrency >= 1; got {retries}, {timeout}, "
                f"{backoff}, {max_concurrency}."
            )
        self.base_url = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self._api_key = api_key if api_key is not None else (os.environ.get(api_key_env) or None)
        if self._api_key is not None and not (self._api_key.isascii() and self._api_key.isprintable()):
            raise ConfigError("the API key must be printable ASCII (it travels in an HTTP header).")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.max_concurrency = int(max_concurrency)
        self.system_prompt, self.extra_body = system_prompt, dict(extra_body or {})
        # A judge on this machine is reached directly, whatever proxy the environment sets.
        loopback = parsed.hostname in ("localhost", "::1") or parsed.hostname.startswith("127.")
        self._opener = (
            urllib.request.build_opener(urllib.request.ProxyHandler({}))
            if loopback
            else (urllib.request.build_opener())
        )

    def request_body(self, images: Sequence[torch.Tensor], text: str) -> dict:
        """The JSON body of one chat completion request."""
        content = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
        content.append({"type": "text", "text": text})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": content})
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        body.update(self.extra_body)
        return body

    def _post_once(self, data: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def complete(self, images: Sequence[torch.Tensor], text: str) -> str:
        """The judge's answer to one request (the first choice's message text)."""
        data = json.dumps(self.request_body(images, text)).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                status, payload = self._post_once(data)
            except (TimeoutError, urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
                continue
            if status < 300:
                return _answer_text(payload, self.url)
            message = _error_message(payload)
            if status in (401, 403):
                raise ConfigError(
                    f"the judge endpoint {self.url} rejected the API key (HTTP {status}: {message}). Put the server's "
                    f"key in the environment variable {self.api_key_env} or pass api_key=."
                    + ("" if self._api_key else " No key was sent.")
                )
            if status == 404:
                raise ConfigError(
                    f"the judge endpoint {self.url} answered 404 ({message}): check base_url (the API root, e.g. "
                    f"http://HOST:PORT/v1) and that the server serves model {self.model!r}."
                )
            if status in (400, 413, 422):
                raise InvalidInputError(f"the judge endpoint {self.url} refused the request (HTTP {status}): {message}")
            if status == 429 or status >= 500:
                last = f"HTTP {status}: {message}"
                continue
            raise RewardError(f"the judge endpoint {self.url} answered HTTP {status}: {message}")
        raise RewardUnavailableError(
            f"the judge endpoint {self.url} is not available after {self.retries + 1} tries (last: {last}). Is the "
            "server running at base_url?"
        )

    def generate(self, requests: Sequence[tuple[Sequence[torch.Tensor], str]]) -> list[str]:
        """Answers each ``(images, text)`` request, ``max_concurrency`` at a time, in order."""
        if len(requests) <= 1 or self.max_concurrency == 1:
            return [self.complete(images, text) for images, text in requests]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self.complete(*r), requests))

    def __repr__(self) -> str:
        return f"ChatEndpointJudge(url={self.url!r}, model={self.model!r})"


def _answer_text(payload: bytes, url: str) -> str:
    try:
        obj = json.loads(payload)
        content = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RewardError(
            f"the judge endpoint {url} sent an answer that is not a chat completion ({type(exc).__name__}: {exc}): "
            f"{payload[:200]!r}"
        ) from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RewardError(f"the judge endpoint {url} sent message content of type {type(content).__name__}.")
    return content


def _error_message(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    except ValueError:
        return payload[:300].decode(errors="replace") or "(empty answer)"


# ----------------------------------------------------------------------------- the reward
class UnifiedReward(Reward):
    """A VLM judge's verdict as a reward (UnifiedReward's pointwise and pairwise protocols).

    Give either a local model (``model`` a hub id / folder / built image-text-to-text model, with
    ``processor``) or an endpoint (``base_url`` plus the served ``model`` name); see the module
    docstring for the modes, the score mappings and unparseable answers.

    Args:
        model: the local judge, or the served model name when ``base_url`` is given.
        processor: the local judge's processor.
        base_url: an OpenAI-compatible API root (``http://HOST:PORT/v1``); selects the endpoint route.
        mode: ``"pointwise"`` (v1, default), ``"pointwise_v2"`` or ``"pairwise"``.
        template: the instruction, with ``{prompt}``; defaults to the mode's template.
        both_orders: pairwise only: also ask with the images swapped and average (cancels the
            judge's position bias; twice the requests).
        on_unparseable: ``"raise"`` (default) or ``"zero"``.
        judge: a ready :class:`LocalVLMJudge` / :class:`ChatEndpointJudge` (instead of the above).
        api_key, api_key_env, timeout, retries, backoff, max_concurrency, temperature, system_prompt,
            extra_body: for the endpoint (:class:`ChatEndpointJudge`).
        max_new_tokens: the answer's length limit (local default 256, endpoint 512 as ``max_tokens``).
        batch_size, torch_dtype, name: as for every :class:`Reward` (defaults 8, fp32, "unified_reward").

    Conditioning:
        reference_images: pairwise mode, (B, 3, H, W) in [0, 1], one reference per sample.
    """

    default_name = "unified_reward"
    default_differentiable = False

    def __init__(
        self,
        model: Any = None,
        processor: Any = None,
        *,
        base_url: str | None = None,
        mode: str = "pointwise",
        template: str | None = None,
        both_orders: bool = False,
        on_unparseable: str = "raise",
        judge: LocalVLMJudge | ChatEndpointJudge | None = None,
        api_key: str | None = None,
        api_key_env: str = JUDGE_API_KEY_ENV,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 8,
        temperature: float = 0.0,
        max_new_tokens: int | None = None,
        system_prompt: str | None = None,
        extra_body: dict | None = None,
        batch_size: int | None = 8,
        torch_dtype: torch.dtype | str | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name, differentiable=False, batch_size=batch_size)
        if mode not in MODES:
            raise ConfigError(f"UnifiedReward mode must be one of {MODES}; got {mode!r}.")
        if on_unparseable not in ("raise", "zero"):
            raise ConfigError(f"on_unparseable must be 'raise' or 'zero'; got {on_unparseable!r}.")
        template = _TEMPLATES[mode] if template is None else template
        if "{prompt}" not in template:
            raise ConfigError("template must contain '{prompt}' where the caption goes.")
        if both_orders and mode != "pairwise":
            raise ConfigError("both_orders=True is for mode='pairwise'.")
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
        if judge is None:
            if base_url is not None:
                judge = ChatEndpointJudge(
                    base_url,
                    model,
                    api_key=api_key,
                    api_key_env=api_key_env,
                    timeout=timeout,
                    retries=retries,
                    backoff=backoff,
                    max_tokens=max_new_tokens or 512,
                    temperature=temperature,
                    max_concurrency=max_concurrency,
                    system_prompt=system_prompt,
                    extra_body=extra_body,
                )
            elif model is not None:
                judge = LocalVLMJudge(
                    model,
                    processor,
                    max_new_tokens=max_new_tokens or 256,
                    system_prompt=system_prompt,
                    torch_dtype=torch_dtype,
                )
            else:
                raise ConfigError(
                    "UnifiedReward needs a judge: model= (a local VLM, with processor=) or base_url= and model= "
                    "(an OpenAI-compatible endpoint and the served model name)."
                )
        self.judge = judge
        self.mode, self.template, self.both_orders = mode, template, bool(both_orders)
        self.on_unparseable = on_unparseable
        self.unparseable = 0
        self.last_answers: list[str] = []

    # -- prompts and parsing -----------------------------------------------------------------
    def render(self, prompt: str) -> str:
        """The instruction sent with the image(s) for ``prompt``."""
        return self.template.replace("{prompt}", prompt)

    def parse(self, answer: str) -> float | dict[str, float]:
        """The mode's parse of one answer (raises :class:`UnparseableAnswerError`)."""
        if self.mode == "pointwise":
            return parse_pointwise(answer)
        if self.mode == "pointwise_v2":
            return parse_pointwise_v2(answer)
        return parse_pairwise(answer)

    def _read(self, answer: str) -> float | dict[str, float] | None:
        try:
            return self.parse(answer)
        except UnparseableAnswerError as exc:
            if self.on_unparseable == "raise":
                raise UnparseableAnswerError(f"{self.name}: {exc}") from None
            self.unparseable += 1
            shown = answer if len(answer) <= 200 else answer[:200] + " [...]"
            logger.warning(
                "%s: scoring 0 for an answer without %s (%d so far): %r",
                self.name,
                _EXPECTED[self.mode],
                self.unparseable,
                shown,
            )
            return None

    # -- scoring -----------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: list[str], reference_images: torch.Tensor | None = None):
        return self.score_parts(images, prompts, reference_images=reference_images).total

    def score_parts(
        self, images: torch.Tensor, prompts: list[str], reference_images: torch.Tensor | None = None
    ) -> RewardResult:
        batch, device = images.shape[0], images.device
        if self.mode == "pairwise":
            if reference_images is None:
                raise InvalidInputError(
                    f"{self.name}: pairwise mode needs reference_images=, a (B, 3, H, W) tensor in [0, 1] "
                    f"with B={batch}."
                )
            check_images(reference_images, "image", name=f"{self.name} reference_images")
            if reference_images.shape[0] != batch:
                raise InvalidInputError(
                    f"{self.name}: got {reference_images.shape[0]} reference images for {batch} images; "
                    "pass one per image."
                )
            requests = [([images[i], reference_images[i]], self.render(p)) for i, p in enumerate(prompts)]
            if self.both_orders:
                requests += [([reference_images[i], images[i]], self.render(p)) for i, p in enumerate(prompts)]
        elif reference_images is not None:
            raise InvalidInputError(f"{self.name}: reference_images is only used with mode='pairwise'.")
        else:
            requests = [([images[i]], self.render(p)) for i, p in enumerate(prompts)]
        answers = self.judge.generate(requests)
        if len(answers) != len(requests):
            raise RewardError(f"{self.name}: the judge returned {len(answers)} answers for {len(requests)} requests.")
        self.last_answers = list(answers)
        parsed = [self._read(a) for a in answers]

        def vec(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        if self.mode == "pointwise":
            return RewardResult(vec([0.0 if x is None else x / 5.0 for x in parsed]))
        if self.mode == "pairwise":
            first = [0.0 if x is None else x for x in parsed[:batch]]
            if self.both_orders:  # the swapped request's verdict is for the reference
                second = [0.0 if x is None else 1.0 - x for x in parsed[batch:]]
                first = [(a + b) / 2 for a, b in zip(first, second)]
            return RewardResult(vec(first))
        raw = {p: vec([0.0 if x is None else (x[p] - 1.0) / 4.0 for x in parsed]) for p in V2_PARTS}
        weights = {p: 1.0 / len(V2_PARTS) for p in V2_PARTS}
        components = {p: weights[p] * raw[p] for p in V2_PARTS}
        total = sum(components.values())
        return RewardResult(total, components, raw, weights)

    def extra_repr(self) -> str:
        judge = repr(self.judge) if isinstance(self.judge, ChatEndpointJudge) else type(self.judge).__name__
        return f"mode={self.mode!r}, judge={judge}, {super().extra_repr()}"
