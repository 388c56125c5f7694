"""Serve a reward over HTTP for :class:`~visalign.rewards.RemoteReward` clients: ``visalign serve-reward``.

    visalign serve-reward ocr --port 8765                                   # a built-in reward name
    visalign serve-reward '{"type": "CLIPScore", "model": "openai/clip-vit-large-patch14"}' --device cuda:1
    visalign serve-reward mypkg.rewards:make_reward --port 8765             # module:attr, a reward or factory
    VISALIGN_REWARD_API_KEY=... visalign serve-reward ocr --host 0.0.0.0     # off loopback a key is required

The reward runs in this process's environment (so a reward whose packages clash with the trainer's,
like open_clip's CUDA torchvision, lives in its own venv) and on its own device. The wire protocol
is documented in :mod:`visalign.rewards.remote`. Needs the ``serve`` extra (fastapi, uvicorn).

**Safety.** Requests are JSON: images are raw arrays (dtype whitelisted, byte count checked),
never pickles or code. A body over ``max_body_bytes`` is refused with 413 from its
``Content-Length`` (or as soon as the stream passes the limit) before it is read. The server binds
loopback (127.0.0.1) by default; binding any other address requires an API key, read from an
environment variable (``VISALIGN_REWARD_API_KEY``, or the one ``--api-key-env`` names; never from
the command line, where ``ps`` shows it) and compared in constant time. Requests are scored one at
a time (rewards are not assumed thread-safe).

In Python, :class:`RewardServer` runs the same server in a background thread (tests, notebooks)::

    with RewardServer(reward) as server:          # 127.0.0.1, a free port
        remote = RemoteReward(server.url)
"""

from __future__ import annotations

import base64
import hmac
import importlib
import inspect
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError, VisalignError, require
from visalign.rewards.base import Reward, as_reward, call_reward, is_differentiable, reward_name
from visalign.rewards.remote import API_KEY_ENV, PROTOCOL_VERSION, decode_images, decode_value

__all__ = [
    "create_app",
    "load_reward",
    "check_bind",
    "is_loopback",
    "RewardServer",
    "serve",
    "DEFAULT_PORT",
    "DEFAULT_MAX_BODY_MB",
]

DEFAULT_PORT = 8765
DEFAULT_MAX_BODY_MB = 256
_MODULE_ATTR = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
logger = logging.getLogger("visalign.serve_reward")


# ----------------------------------------------------------------------------- what to serve
def load_reward(spec: Any):
    """The reward a ``serve-reward`` SPEC names.

    Args:
        spec: a built-in reward name (``brightness``, ``ocr``, a :mod:`visalign.rewards` class such as
            ``CLIPScore``), a JSON spec as in a recipe's ``reward:`` (a string starting with ``{``, or a
            dict), or ``module:attr`` naming a reward object, a reward class or a factory (a callable
            with no required arguments that returns a reward). The current directory is importable.
    """
    from visalign.recipes import build_reward

    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise ConfigError(f"reward spec {spec!r} starts with '{{' but is not valid JSON ({exc}).") from exc
    if isinstance(spec, str) and _MODULE_ATTR.match(spec):
        return _import_reward(spec)
    return build_reward(spec)


def _import_reward(spec: str):
    module_name, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import {module_name!r} for reward {spec!r} ({exc}); run from the folder that holds "
            "it or install it."
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{module_name} has no attribute {attr!r} (reward spec {spec!r}).")
        obj = getattr(obj, part)
    if isinstance(obj, Reward):
        return obj
    if isinstance(obj, type) or (callable(obj) and _takes_no_arguments(obj)):
        obj = obj()  # a reward class or a factory
    if not callable(obj):
        raise ConfigError(
            f"{spec} gave a {type(obj).__name__}; expected a reward (a visalign Reward or a callable "
            "(images, prompts) -> Tensor[B]) or a factory returning one."
        )
    return obj


def _takes_no_arguments(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params
    )


# ----------------------------------------------------------------------------- binding and keys
def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so it counts as exposed


def check_bind(host: str, api_key: str | None, api_key_env: str = API_KEY_ENV) -> None:
    """Refuses to expose a reward beyond this machine without an API key.

    Raises:
        ConfigError: ``host`` is not loopback and there is no key.
    """
    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"refusing to serve on {host} without an API key: any machine that reaches it could use the reward. Set "
            f"one in the environment variable {api_key_env} (or name another with --api-key-env NAME) and give the "
            "same key to RemoteReward(url, api_key=...), or bind 127.0.0.1 (the default)."
        )


def api_key_from_env(name: str = API_KEY_ENV) -> str | None:
    """The key in environment variable ``name``, or None when it is unset or empty."""
    return os.environ.get(name) or None


# ----------------------------------------------------------------------------- the app
def create_app(
    reward,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
    device: str | torch.device | None = None,
):
    """The FastAPI app that serves ``reward`` (``GET /health``, ``POST /score``; see :mod:`.remote`).

    Args:
        reward: a visalign Reward or any callable reward.
        api_key: when set, every ``/score`` request must send ``Authorization: Bearer <api_key>``.
        max_body_bytes: the largest request body accepted; larger ones get 413 before being read.
        device: where the images are put before scoring (default: cuda if available, else cpu).
    """
    fastapi = require("fastapi", "serve", "visalign serve-reward")
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and api_key.strip()):
        raise ConfigError("the API key must be printable ASCII, not blank (clients send it in an HTTP header).")
    served = as_reward(reward)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lock = threading.Lock()
    key = api_key.encode() if api_key else None
    name = reward_name(reward)
    app = fastapi.FastAPI(title=f"visalign reward server: {name}", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, kind: str, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers or None)

    @app.get("/health")
    def health() -> dict:
        accepted = served.accepted_conditioning
        return {
            "status": "ok",
            "protocol": PROTOCOL_VERSION,
            "name": name,
            "differentiable": is_differentiable(reward),
            "input_kind": served.input_kind,
            "accepted_conditioning": None if accepted is None else sorted(accepted),
            "max_body_bytes": max_body_bytes,
            "auth": key is not None,
        }

    def score_payload(payload: Any) -> dict:
        if not isinstance(payload, dict) or "images" not in payload:
            raise _BadRequest('the body must be a JSON object {"protocol": 1, "images": {...}, "prompts": [...]}.')
        if payload.get("protocol") != PROTOCOL_VERSION:
            raise _BadRequest(
                f"protocol {payload.get('protocol')!r} is not spoken here (this server speaks "
                f"{PROTOCOL_VERSION}); use the same visalign version on both sides."
            )
        try:
            images = decode_images(payload["images"]).to(device)
            prompts = payload.get("prompts")
            conditioning = payload.get("conditioning") or {}
            if not isinstance(conditioning, dict):
                raise InvalidInputError("conditioning must be a JSON object {name: value}.")
            conditioning = {k: _to_device(decode_value(v), device) for k, v in conditioning.items()}
        except InvalidInputError as exc:
            raise _BadRequest(str(exc)) from exc
        with lock, torch.no_grad():
            result = call_reward(served, images, prompts, **conditioning)
        out = {
            "protocol": PROTOCOL_VERSION,
            "total": result.total.detach().cpu().tolist(),
            "components": {k: v.detach().cpu().tolist() for k, v in result.components.items()},
            "raw": {k: v.detach().cpu().tolist() for k, v in result.raw.items()},
            "weights": {k: float(v) for k, v in result.weights.items()},
            "generator": None,
        }
        generator = conditioning.get("generator")
        if isinstance(generator, torch.Generator):  # its state after scoring goes back to the client
            out["generator"] = base64.b64encode(generator.get_state().numpy().tobytes()).decode()
        return out

    async def score(request):  # a plain Starlette endpoint: the body is read here, under the size limit
        if key is not None:
            sent = request.headers.get("authorization", "")
            token = sent[7:].encode() if sent.lower().startswith("bearer ") else b""
            if not hmac.compare_digest(token, key):
                return error(
                    401,
                    "Unauthorized",
                    "missing or wrong API key (send `Authorization: Bearer KEY`).",
                    **{"WWW-Authenticate": "Bearer"},
                )
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error(400, "BadRequest", f"invalid Content-Length {length!r}.")
            if int(length) > max_body_bytes:
                return _too_large(error, int(length), max_body_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _too_large(error, len(body), max_body_bytes)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            return error(400, "BadRequest", f"the body is not JSON ({exc}).")
        start = time.perf_counter()
        try:
            out = await run_in_threadpool(score_payload, payload)
        except _BadRequest as exc:
            return error(400, "BadRequest", str(exc))
        except VisalignError as exc:
            status = 422 if isinstance(exc, ValueError) else 500
            return error(status, type(exc).__name__, str(exc))
        except Exception as exc:  # the reward's own failure: report it, keep serving
            logger.exception("reward %s failed", name)
            return error(500, type(exc).__name__, str(exc))
        out["seconds"] = time.perf_counter() - start
        return JSONResponse(out)

    app.add_route("/score", score, methods=["POST"])
    return app


class _BadRequest(Exception):
    """A malformed /score request (400)."""


def _too_large(error, size: int, limit: int):
    return error(
        413,
        "PayloadTooLarge",
        f"the request body ({_size(size)}) is over this server's limit of {_size(limit)} (--max-body-mb).",
        Connection="close",
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- running it
def _bound_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {host}:{port} ({exc}); pick another --port (0 picks a free one).") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, log_level: str):
    uvicorn = require("uvicorn", "serve", "visalign serve-reward")
    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5, access_log=log_level == "debug")
    return uvicorn.Server(config)


def serve(
    reward,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    api_key_env: str = API_KEY_ENV,
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
    device: str | None = None,
    log_level: str = "info",
    announce=print,
) -> None:
    """Serves ``reward`` until interrupted (what ``visalign serve-reward`` runs).

    Checks the binding first (:func:`check_bind`), binds (``port=0`` picks a free port), then
    announces ``serving <name> on http://HOST:PORT`` (with the real port) and serves.
    """
    check_bind(host, api_key, api_key_env)
    app = create_app(reward, api_key=api_key, max_body_bytes=max_body_bytes, device=device)
    server = _uvicorn_server(app, log_level)
    sock = _bound_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    announce(
        f"visalign serve-reward: serving '{reward_name(reward)}' on http://{shown}:{bound} "
        f"(GET /health, POST /score; API key {'required' if api_key else 'not required'}; "
        f"max body {max_body_bytes / 2**20:g} MiB)"
    )
    sys.stdout.flush()
    server.run(sockets=[sock])


class RewardServer:
    """``serve-reward`` in a background thread of this process: for tests, notebooks and one-box setups.

    Args:
        reward: the reward to serve.
        host (`str`, defaults to ``"127.0.0.1"``) and port (`int`, defaults to 0, a free port).
        api_key, max_body_bytes, device: as for :func:`create_app`.

    Use as a context manager, or call :meth:`start` and :meth:`stop`; ``url`` is the address to
    give :class:`~visalign.rewards.RemoteReward`.
    """

    def __init__(
        self,
        reward,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
        device: str | None = None,
        log_level: str = "warning",
    ):
        check_bind(host, api_key)
        self.host, self.port = host, port
        self._server = _uvicorn_server(
            create_app(reward, api_key=api_key, max_body_bytes=max_body_bytes, device=device), log_level
        )
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> RewardServer:
        self._sock = _bound_socket(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            daemon=True,
            name=f"visalign-reward-server-{self.port}",
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server on {self.url} did not start within {timeout:g} s.")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
