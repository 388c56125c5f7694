"""Real-size architectures without weights: the published configs of real denoisers and VAEs.

Each ``<name>.json`` in this folder holds the ``config.json`` values a real checkpoint publishes for
its denoiser and VAE (and, for memory plans, its text encoders); README.md cites where each value
comes from. :func:`build` instantiates them with random weights, on the meta device when only
shapes are needed (parameter counts, FLOPs, memory plans), or at reduced depth (fewer blocks, the
same width) as a CPU proxy::

    >>> from visalign import architectures as arch
    >>> sum(p.numel() for p in arch.build("flux1-dev").parameters())      # meta: no memory used
    11901408320
    >>> proxy = arch.build("sd35-medium", device="cpu", depth=2)           # 2 of 24 blocks, real width
    >>> pipe = arch.build_pipeline("sd35-medium", depth=1)                  # stock pipeline, tiny text encoders

Names: ``sd35-medium``, ``flux1-dev``, ``wan21-t2v-1.3b``, ``wan21-t2v-14b`` (:data:`ARCHITECTURES`);
:data:`KNOWN_MODELS` maps the hub ids of the real checkpoints to them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import torch

from visalign.errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "KNOWN_MODELS",
    "block_lists",
    "build",
    "build_pipeline",
    "config",
    "num_blocks",
    "parameter_count",
    "resolve",
    "spec",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
ARCHITECTURES: tuple[str, ...] = tuple(sorted(f[:-5] for f in os.listdir(_HERE) if f.endswith(".json")))
#: The attributes holding each denoiser's repeated blocks (the units diffusers checkpoints and FSDP wraps).
BLOCK_ATTRIBUTES = ("transformer_blocks", "single_transformer_blocks", "blocks")


@functools.cache
def _load(name: str) -> str:
    with open(os.path.join(_HERE, f"{name}.json"), encoding="utf-8") as f:
        return f.read()


def spec(name: str) -> dict:
    """The JSON record of architecture ``name`` (a fresh copy): hub id, family, component configs."""
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"Unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)} (hub ids: {', '.join(KNOWN_MODELS)})."
        )
    return json.loads(_load(name))


KNOWN_MODELS: dict[str, str] = {json.loads(_load(n))["hub_id"]: n for n in ARCHITECTURES}


def resolve(model: str | None = None, architecture: str | None = None) -> str:
    """The architecture name for an explicit ``architecture`` or a recipe's ``model`` (a known hub id).

    Raises:
        ConfigError: neither names a known architecture; the message lists the known ones.
    """
    if architecture is not None:
        return spec(architecture)["name"]
    key = str(model or "").rstrip("/")
    for hub_id, name in KNOWN_MODELS.items():
        if key.lower() == hub_id.lower():
            return name
    known = ", ".join(f"{hub} ({name})" for hub, name in KNOWN_MODELS.items())
    raise ConfigError(
        f"No known architecture for model {model!r}. Known hub ids: {known}. For a fine-tune or a local "
        f"copy of one of them, add `architecture: NAME` to the recipe (NAME one of "
        f"{', '.join(ARCHITECTURES)})."
    )


def config(name: str, part: str = "denoiser", depth: int | None = None) -> dict:
    """The constructor config of one component, with the denoiser cut to ``depth`` blocks.

    Args:
        name: an architecture name.
        part: ``"denoiser"``, ``"vae"`` or a text-encoder component (``"text_encoder"``, ``"text_encoder_2"``, ...).
        depth: denoiser blocks to keep (same width). FLUX keeps ``depth`` double-stream and ``2·depth``
            single-stream blocks (the real 19:38 ratio); SD3 keeps its dual-attention blocks among the first.
    """
    record = spec(name)
    parts = {"denoiser": record["denoiser"], "vae": record["vae"], **record["text_encoders"]}
    if part not in parts:
        raise ConfigError(f"{name} has no part {part!r}; use one of {', '.join(parts)}.")
    cfg = dict(parts[part]["config"])
    if depth is not None and part == "denoiser":
        full = cfg["num_layers"]
        if not 1 <= int(depth) <= full:
            raise ConfigError(f"depth={depth} for {name}: use 1 to {full} (the full model), or None.")
        cfg["num_layers"] = int(depth)
        if "num_single_layers" in cfg:
            cfg["num_single_layers"] = min(cfg["num_single_layers"], 2 * int(depth))
        if "dual_attention_layers" in cfg:
            cfg["dual_attention_layers"] = [i for i in cfg["dual_attention_layers"] if i < int(depth)]
    return cfg


def _component_class(class_name: str):
    import diffusers
    import transformers

    return getattr(diffusers, class_name, None) or getattr(transformers, class_name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(
    name: str,
    part: str = "denoiser",
    device: str | torch.device = "meta",
    depth: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.nn.Module:
    """Instantiates one component of architecture ``name`` with random weights, in eval mode.

    Args:
        name: an architecture name (:data:`ARCHITECTURES`).
        part: ``"denoiser"``, ``"vae"`` or a text-encoder component name.
        device: ``"meta"`` (the default) allocates nothing: shapes, counts and FLOPs only.
        depth: keep this many denoiser blocks (see :func:`config`); None builds the full model.
        dtype: the weights' dtype; parameters are created in it directly (a bf16 FLUX never
            exists in fp32 first).
        seed: seeds the random weights (ignored on meta).
    """
    record = spec(name)
    parts = {"denoiser": record["denoiser"], "vae": record["vae"], **record["text_encoders"]}
    cfg = config(name, part, depth)
    cls = _component_class(parts.get(part, {}).get("class", ""))
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _default_dtype(dtype), device:
        torch.manual_seed(seed)
        if cls.__module__.startswith("transformers"):
            model = cls(cls.config_class(**cfg))
        else:
            model = cls(**cfg)
    return model.to(dtype=dtype).eval()


@functools.lru_cache(maxsize=64)
def parameter_count(name: str, part: str = "denoiser", depth: int | None = None, buffers: bool = False) -> int:
    """Parameters (plus floating buffers if ``buffers``) of one component, counted on the meta device."""
    model = build(name, part, depth=depth)
    count = sum(p.numel() for p in model.parameters())
    if buffers:
        count += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return count


def block_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The denoiser's lists of repeated blocks (what gradient checkpointing and FSDP wrap)."""
    return [getattr(model, a) for a in BLOCK_ATTRIBUTES if isinstance(getattr(model, a, None), torch.nn.ModuleList)]


def num_blocks(model: torch.nn.Module) -> int:
    return sum(len(blocks) for blocks in block_lists(model))


_TINY_TEXT_WIDTHS = {  # text-encoder overrides whose output widths match the real denoisers' inputs
    "sd3": {
        "text_encoder": {"hidden_size": 768, "projection_dim": 768},
        "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280},
        "text_encoder_3": {"d_model": 4096},
    },
    "flux": {"text_encoder": {"hidden_size": 768, "projection_dim": 768}, "text_encoder_2": {"d_model": 4096}},
    "wan-t2v": {"text_encoder": {"d_model": 4096}},
}


def build_pipeline(
    name: str,
    depth: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A stock diffusers pipeline around the real-size denoiser and VAE of ``name``, with random weights.

    The real text encoders (T5-XXL, UMT5-XXL, CLIP-G: 5–6B parameters) cannot be built usefully
    without weights, so the pipeline has the tiny text encoders of :mod:`visalign.testing`, widened
    to the widths the real denoiser reads (4096 for T5, 768/1280 for CLIP). Everything from the
    embeddings on (denoiser, scheduler, VAE) is the real architecture. The scheduler is
    flow-matching Euler with the checkpoint's shift (Wan ships UniPC; PITFALLS explains why Euler).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from visalign.testing import tiny_pipeline

    record = spec(name)
    family = record["family"]
    pipe = tiny_pipeline(
        family,
        seed=seed,
        **_TINY_TEXT_WIDTHS[family],
        transformer=build(name, "denoiser", device=device, depth=depth, dtype=dtype, seed=seed),
        vae=build(name, "vae", device=device, dtype=dtype, seed=seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(**record["scheduler"]),
    )
    return pipe.to(device=device, dtype=dtype)
