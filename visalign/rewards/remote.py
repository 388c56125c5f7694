"""A reward scored by another process or machine: :class:`RemoteReward`, the client of ``visalign serve-reward``.

Serve any reward from its own environment (e.g. one with open_clip and a CUDA torch, or on a GPU
box of its own) and score against it from a training run as if it were local::

    visalign serve-reward ocr --port 8765                       # in the reward's environment
    reward = va.rewards.RemoteReward("http://127.0.0.1:8765")    # in the trainer's
    reward(images, prompts)                                      # (B,) float32, like any reward

The client needs nothing beyond the standard library; the server needs the ``serve`` extra.

**Protocol (version 1)**: JSON over HTTP, no pickle and no code on the wire.

- ``GET /health`` → ``{"status": "ok", "protocol": 1, "name", "differentiable", "input_kind",
  "accepted_conditioning" (a list, or null for any), "max_body_bytes", "auth" (whether a key is required)}``.
- ``POST /score`` with ``{"protocol": 1, "images": ARRAY, "prompts": [str] | null, "conditioning": {name: VALUE}}``
  → ``{"protocol": 1, "total": [B floats], "components": {name: [B]}, "raw": {name: [B]},
  "weights": {name: float}, "generator": STATE | null}``.
- ``ARRAY`` is ``{"dtype": "uint8" | "float32" | ..., "shape": [...], "data": base64 of the C-order,
  little-endian bytes}``: lossless. Images travel as uint8 by default (``round(255·x)``, the 8-bit
  image any saved sample is; 4× smaller than float32) or as float32 (``image_dtype="float32"``: the
  exact tensor). A ``VALUE`` is any JSON value; a tensor or numpy array inside it travels as
  ``{"__array__": ARRAY}`` and a ``torch.Generator`` as ``{"__generator__": base64 state}`` (its
  state after scoring comes back, so chunked scoring draws as it would locally).
- Authentication: ``Authorization: Bearer KEY`` when the server has a key (required off loopback).
- Errors: ``{"error": type name, "message": ...}`` with 400 (malformed request), 401 (missing or
  wrong key), 413 (body over the server's limit), 422 (the reward rejected the input), 500 (the
  reward failed), 503 (busy).

**Failures.** Connection errors and 5xx answers are retried ``retries`` times with exponential
backoff; then :class:`~visalign.errors.RewardUnavailableError` (a ``RewardError``: trainers skip
the step and go on, so a restarting server costs steps, not the run). A rejected key (401) and an
oversized payload (413) are configuration mistakes that retrying cannot fix: they raise
:class:`~visalign.errors.ConfigError` at once. Input the server's reward rejects (422) raises
:class:`~visalign.errors.InvalidInputError` with the server's message.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import time
import urllib.parse
from typing import Any

import numpy as np
import torch

from visalign.errors import ConfigError, InvalidInputError, RewardError, RewardUnavailableError
from visalign.rewards.base import Reward
from visalign.rewards.result import RewardResult

__all__ = [
    "RemoteReward",
    "PROTOCOL_VERSION",
    "API_KEY_ENV",
    "encode_array",
    "decode_array",
    "encode_value",
    "decode_value",
]

PROTOCOL_VERSION = 1
API_KEY_ENV = "VISALIGN_REWARD_API_KEY"
# dtypes that may travel as arrays (numpy names); nothing else is decoded.
ARRAY_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")
MAX_ARRAY_RANK = 8


# ----------------------------------------------------------------------------- wire format
def encode_array(array: torch.Tensor | np.ndarray) -> dict:
    """A tensor or array as ``{"dtype", "shape", "data"}``: base64 of its little-endian C-order bytes."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
    array = np.ascontiguousarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        raise InvalidInputError(
            f"RemoteReward: arrays of dtype {array.dtype} cannot travel; use one of {ARRAY_DTYPES}."
        )
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def decode_array(obj: Any) -> np.ndarray:
    """The array of :func:`encode_array`; checks dtype, shape and byte count (raises InvalidInputError)."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise InvalidInputError(
            'an array must be {"dtype": ..., "shape": [...], "data": base64}; '
            f"got {type(obj).__name__} with keys {sorted(obj) if isinstance(obj, dict) else '-'}."
        )
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in ARRAY_DTYPES:
        raise InvalidInputError(f"array dtype {dtype!r} is not accepted; use one of {ARRAY_DTYPES}.")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_ARRAY_RANK
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise InvalidInputError(
            f"array shape must be a list of at most {MAX_ARRAY_RANK} non-negative ints; got {shape!r}."
        )
    if not isinstance(data, str):
        raise InvalidInputError("array data must be a base64 string.")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise InvalidInputError(f"array data is not valid base64 ({exc}).") from exc
    dt = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * dt.itemsize  # Python ints: no overflow on absurd shapes
    if len(raw) != expected:
        raise InvalidInputError(f"array of shape {shape} and dtype {dtype} needs {expected} bytes; got {len(raw)}.")
    return np.frombuffer(raw, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=True)


def encode_value(value: Any, where: str = "conditioning") -> Any:
    """A conditioning value as JSON: JSON types as they are, tensors/arrays and generators tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return {"__array__": encode_array(value)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Generator):
        if value.device.type != "cpu":
            raise InvalidInputError(
                f"RemoteReward: {where} is a {value.device.type} generator; only CPU generators travel."
            )
        return {"__generator__": base64.b64encode(value.get_state().numpy().tobytes()).decode()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode_value(v, f"{where}.{k}") for k, v in value.items()}
    raise InvalidInputError(
        f"RemoteReward: {where} is a {type(value).__name__}, which cannot travel to a reward server. Conditioning "
        "must be JSON values (str, numbers, lists, dicts), tensors or numpy arrays, or a CPU torch.Generator."
    )


def decode_value(value: Any) -> Any:
    """The value of :func:`encode_value`: tagged arrays become CPU tensors, generator states generators."""
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return torch.from_numpy(decode_array(value["__array__"]))
        if set(value) == {"__generator__"}:
            return _generator_from_state(value["__generator__"])
        return {k: decode_value(v) for k, v in value.items()}
    return value


def _generator_from_state(state: Any) -> torch.Generator:
    if not isinstance(state, str):
        raise InvalidInputError("a generator state must be a base64 string.")
    try:
        raw = base64.b64decode(state, validate=True)
        g = torch.Generator()
        g.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except (ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"not a torch.Generator state ({exc}).") from exc
    return g


def encode_images(images: torch.Tensor, dtype: str = "uint8") -> dict:
    """Pixels in [0, 1] as an array: uint8 (``round(255·x)``, clamped) or the exact float32."""
    images = images.detach()
    if dtype == "uint8":
        return encode_array((images.float().clamp(0, 1) * 255).round().to(torch.uint8))
    if dtype == "float32":
        return encode_array(images.float())
    raise ConfigError(f"image_dtype must be 'uint8' or 'float32'; got {dtype!r}.")


def decode_images(obj: Any) -> torch.Tensor:
    """The float32 pixels of :func:`encode_images` (uint8 / 255, floats as they are)."""
    array = decode_array(obj)
    if array.dtype == np.uint8:
        return torch.from_numpy(array).float() / 255
    if array.dtype.kind != "f":
        raise InvalidInputError(f"images must be uint8 or floats; got {array.dtype}.")
    return torch.from_numpy(array).float()


# ----------------------------------------------------------------------------- client
class RemoteReward(Reward):
    """A reward computed by a ``visalign serve-reward`` server, used like a local one.

    ``reward(images, prompts, **conditioning)`` sends the batch (in chunks of ``batch_size``) and
    returns the server reward's scores, float32 (B,) on the images' device; ``reward.evaluate(...)``
    (and so trainers and ``visalign score``) also get its named parts: a served
    :class:`~visalign.rewards.Combined` logs each component as a local one does. Not differentiable.
    The server is first contacted on the first call, so a trainer may start before its reward server.

    Args:
        url (`str`): the server, e.g. ``"http://127.0.0.1:8765"``.
        api_key (`str`, *optional*): the server's key; sent as ``Authorization: Bearer KEY``. When None,
            read from the environment variable ``api_key_env``.
        api_key_env (`str`, defaults to ``"VISALIGN_REWARD_API_KEY"``): where to find the key when
            ``api_key`` is None (keeps keys out of recipes and command lines). No variable, no key.
        timeout (`float`, defaults to 120): seconds to wait for an answer (connecting: at most 10 s).
        retries (`int`, defaults to 3): retries after a failed try (connection refused or reset, a 5xx
            answer), with backoff ``backoff · 2^k`` seconds (capped at 30 s).
        backoff (`float`, defaults to 0.5): the first retry's delay in seconds.
        batch_size (`int`, *optional*): the most samples per request; lower it when the server answers 413.
        image_dtype (`str`, defaults to ``"uint8"``): ``"uint8"`` sends 8-bit images (what a saved sample
            is; scores equal the server reward's on ``round(255·x)/255``), ``"float32"`` the exact tensor.
        name (`str`, defaults to ``"remote"``): the name in logs.

    Raises (when scoring):
        RewardUnavailableError: the server is not reachable, or failed, after ``retries`` retries.
        ConfigError: the server rejected the API key (401) or the payload's size (413).
        InvalidInputError: the server's reward rejected the input (422), e.g. a prompt without quoted text.
    """

    default_name = "remote"
    default_differentiable = False
    input_kind = "any"
    needs_prompts = False

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        api_key_env: str = API_KEY_ENV,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        batch_size: int | None = None,
        image_dtype: str = "uint8",
        name: str | None = None,
        check_range: bool = True,
    ):
        super().__init__(name=name, differentiable=False, batch_size=batch_size, check_range=check_range)
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"RemoteReward: url must look like http://HOST:PORT; got {url!r}.")
        if int(retries) < 0 or float(timeout) <= 0 or float(backoff) < 0:
            raise ConfigError(
                f"RemoteReward: need retries >= 0, timeout > 0, backoff >= 0; got {retries}, {timeout}, {backoff}."
            )
        if image_dtype not in ("uint8", "float32"):
            raise ConfigError(f"RemoteReward: image_dtype must be 'uint8' or 'float32'; got {image_dtype!r}.")
        self.url = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))
        self._parsed = parsed
        self.api_key_env = api_key_env
        self._api_key = api_key if api_key is not None else (os.environ.get(api_key_env) or None)
        if self._api_key is not None and not (self._api_key.isascii() and self._api_key.isprintable()):
            raise ConfigError("RemoteReward: the API key must be printable ASCII (it travels in an HTTP header).")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.image_dtype = image_dtype
        self._health: dict | None = None

    # -- HTTP ----------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
        return cls(self._parsed.hostname, self._parsed.port, timeout=min(self.timeout, 10.0))

    def _request_once(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        conn = self._connection()
        try:
            try:
                conn.connect()
            except TimeoutError as exc:  # nothing answered at all: retried like a refused connection
                raise ConnectionError(f"connecting timed out after {min(self.timeout, 10.0):g} s") from exc
            conn.sock.settimeout(self.timeout)
            headers = {"Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            try:
                conn.request(method, self._parsed.path.rstrip("/") + path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The server may have answered (413, 401) and closed before reading the whole body:
                # its answer is still worth reading.
                pass
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        tries, last = self.retries + 1, ""
        for attempt in range(tries):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                status, data = self._request_once(method, path, body)
            except TimeoutError:
                raise RewardUnavailableError(
                    f"reward server at {self.url} did not answer {method} {path} within {self.timeout:g} s; raise "
                    "RemoteReward(timeout=...) or lower batch_size."
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if status < 400:
                return _json(data, self.url)
            answer = _error_message(data)
            if status == 401:
                raise ConfigError(
                    f"reward server at {self.url} rejected the API key ({answer}). Pass the server's key as "
                    f"RemoteReward(url, api_key=...) or in the environment variable {self.api_key_env}."
                    + ("" if self._api_key else " No key was sent.")
                )
            if status == 413:
                per_request = "the whole batch" if self.batch_size is None else f"{self.batch_size} images"
                raise ConfigError(
                    f"reward server at {self.url} refused the request as too large (413: {answer}). Lower "
                    f"RemoteReward(batch_size=...) (each request now carries {per_request}), or restart the server "
                    "with a larger --max-body-mb."
                )
            if status in (400, 422):
                raise InvalidInputError(f"reward server at {self.url}: {answer}")
            if status >= 500:
                last = f"HTTP {status}: {answer}"
                continue
            raise RewardError(f"reward server at {self.url} answered {method} {path} with HTTP {status}: {answer}")
        if last.startswith("HTTP 5"):
            raise RewardUnavailableError(f"reward server at {self.url} failed {tries} tries; last answer {last}")
        raise RewardUnavailableError(
            f"reward server at {self.url} is not reachable after {tries} tries ({last}); start it with "
            f"`visalign serve-reward SPEC --host {self._parsed.hostname} --port {self._parsed.port or 80}` "
            "(SPEC: a reward name, a JSON spec or module:attr)."
        )

    # -- server facts --------------------------------------------------------------------------
    def health(self, refresh: bool = False) -> dict:
        """The server's ``GET /health`` answer (cached after the first success)."""
        if self._health is None or refresh:
            health = self._request("GET", "/health")
            if health.get("protocol") != PROTOCOL_VERSION:
                raise ConfigError(
                    f"reward server at {self.url} speaks protocol {health.get('protocol')!r}; this client "
                    f"speaks {PROTOCOL_VERSION}. Use the same visalign version on both sides."
                )
            self._health = health
        return self._health

    @property
    def accepted_conditioning(self) -> set[str] | None:
        """The conditioning the server's reward takes (asks the server once)."""
        accepted = self.health().get("accepted_conditioning")
        return None if accepted is None else set(accepted)

    # -- scoring -------------------------------------------------------------------------------
    def score_parts(self, images: torch.Tensor, prompts: list[str] | None, **conditioning) -> RewardResult:
        generator = conditioning.get("generator")
        payload = {
            "protocol": PROTOCOL_VERSION,
            "images": encode_images(images, self.image_dtype),
            "prompts": prompts,
            "conditioning": {k: encode_value(v, f"conditioning '{k}'") for k, v in conditioning.items()},
        }
        answer = self._request("POST", "/score", payload)
        batch = images.shape[0]
        try:

            def vec(values):
                out = torch.tensor(values, dtype=torch.float32, device=images.device)
                if tuple(out.shape) != (batch,):
                    raise ValueError(f"shape {tuple(out.shape)} for {batch} samples")
                return out

            result = RewardResult(
                vec(answer["total"]),
                {k: vec(v) for k, v in answer.get("components", {}).items()},
                {k: vec(v) for k, v in answer.get("raw", {}).items()},
                {k: float(v) for k, v in answer.get("weights", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RewardError(f"reward server at {self.url} sent an answer this client cannot read ({exc}).") from exc
        if isinstance(generator, torch.Generator) and answer.get("generator"):
            # Advance the local generator as the server's copy was, so the next chunk draws as it would locally.
            generator.set_state(_generator_from_state(answer["generator"]).get_state())
        return result

    def extra_repr(self) -> str:
        return f"url={self.url!r}, {super().extra_repr()}, image_dtype={self.image_dtype!r}"


def _json(data: bytes, url: str) -> dict:
    try:
        out = json.loads(data)
    except ValueError as exc:
        raise RewardError(f"reward server at {url} answered with something other than JSON: {data[:200]!r}") from exc
    if not isinstance(out, dict):
        raise RewardError(f"reward server at {url} answered {type(out).__name__}; expected a JSON object.")
    return out


def _error_message(data: bytes) -> str:
    try:
        obj = json.loads(data)
        if isinstance(obj, dict):
            message = obj.get("message") or obj.get("detail") or obj
            return f"{obj.get('error', 'error')}: {message}" if obj.get("error") else str(message)
    except ValueError:
        pass
    return data[:300].decode(errors="replace") or "(empty answer)"
