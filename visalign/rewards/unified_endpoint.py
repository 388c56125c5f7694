"""A UnifiedReward judge behind an OpenAI-compatible chat endpoint: :class:`ChatEndpointJudge`.

The client of a served judge (vLLM, SGLang, ...): one ``POST {base_url}/chat/completions`` per
sample, the images sent losslessly as base64 PNG data URLs (:func:`image_data_url`), the key read
from an environment variable (:data:`JUDGE_API_KEY_ENV` by default), retries with backoff on
connection errors, 429 and 5xx. Only the standard library talks to the endpoint. The local
alternative is :class:`~visalign.rewards.unified_local.LocalVLMJudge`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from visalign.errors import ConfigError, InvalidInputError, RewardError, RewardUnavailableError

__all__ = ["ChatEndpointJudge", "JUDGE_API_KEY_ENV", "image_data_url"]

JUDGE_API_KEY_ENV = "VISALIGN_JUDGE_API_KEY"


def image_data_url(image: torch.Tensor) -> str:
    """A (3, H, W) image in [0, 1] as a ``data:image/png;base64,...`` URL (lossless, 8-bit)."""
    from PIL import Image

    from visalign.media import to_uint8

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
