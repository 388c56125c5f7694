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

Names (:data:`ARCHITECTURES`): ``sd35-medium``, ``flux1-dev``, ``flux1-kontext-dev``, ``flux2-dev``,
``flux2-klein-4b``, ``flux2-klein-9b``, ``qwen-image``, ``qwen-image-edit``, ``z-image-turbo``,
``wan21-t2v-1.3b``, ``wan21-t2v-14b``, ``wan22-t2v-a14b``, ``wan22-i2v-a14b``, ``wan22-ti2v-5b``,
``hunyuan-video15-480p``, ``hunyuan-video15-480p-i2v``; :data:`KNOWN_MODELS` maps the hub ids of the real checkpoints to them.
Wan 2.2 A14B has two experts of the same shape: part ``"denoiser_2"`` is the low-noise one.
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
#: The attributes holding each denoiser's repeated blocks (the units diffusers checkpoints and FSDP wraps):
#: SD3, FLUX.1/.2, Qwen-Image and HunyuanVideo 1.5 use the first two, Wan ``blocks``, Z-Image ``layers``
#: plus its two refiner stacks (the same block class).
BLOCK_ATTRIBUTES = (
    "transformer_blocks",
    "single_transformer_blocks",
    "blocks",
    "noise_refiner",
    "context_refiner",
    "layers",
)
#: The config key holding a denoiser's (double-stream) block count, by class; the default is ``num_layers``.
_LAYER_KEYS = {"ZImageTransformer2DModel": "n_layers"}


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


def _hub_ids(name: str) -> list[str]:
    record = json.loads(_load(name))
    return [record["hub_id"], *record.get("aliases", [])]


#: Hub id → architecture name; a checkpoint with the same architecture under another id (e.g.
#: ``Qwen/Qwen-Image-Edit-2509``, the distilled ``FLUX.2-klein-9B``) is listed in its JSON's ``aliases``.
KNOWN_MODELS: dict[str, str] = {hub_id: n for n in ARCHITECTURES for hub_id in _hub_ids(n)}


def _parts(record: dict) -> dict:
    """The record's components by part name: denoiser (and ``denoiser_2``), vae, text encoders."""
    experts = {"denoiser_2": record["denoiser_2"]} if "denoiser_2" in record else {}
    return {"denoiser": record["denoiser"], **experts, "vae": record["vae"], **record["text_encoders"]}


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
        part: ``"denoiser"`` (``"denoiser_2"``: Wan 2.2 A14B's low-noise expert), ``"vae"`` or a
            text-encoder component (``"text_encoder"``, ``"text_encoder_2"``, ...).
        depth: denoiser blocks to keep (same width), counted in its main stack (``num_layers``;
            Z-Image's ``n_layers``). FLUX.1 and FLUX.2 keep ``depth`` double-stream blocks and the
            single-stream ones in the real ratio (FLUX.1-dev 19:38, FLUX.2 [dev] 8:48); SD3 keeps its
            dual-attention blocks among the first. Refiner stacks (Z-Image, HunyuanVideo 1.5) stay whole.

    Raises:
        ConfigError: an unknown part, or ``depth`` outside 1 to the full block count.
    """
    record = spec(name)
    parts = _parts(record)
    if part not in parts:
        raise ConfigError(f"{name} has no part {part!r}; use one of {', '.join(parts)}.")
    cfg = dict(parts[part]["config"])
    if depth is not None and part in ("denoiser", "denoiser_2"):
        key = _LAYER_KEYS.get(parts[part]["class"], "num_layers")
        full, depth = cfg[key], int(depth)
        if not 1 <= depth <= full:
            raise ConfigError(f"depth={depth} for {name}: use 1 to {full} (the full model), or None.")
        cfg[key] = depth
        if "num_single_layers" in cfg:
            cfg["num_single_layers"] = min(cfg["num_single_layers"], round(depth * cfg["num_single_layers"] / full))
        if "dual_attention_layers" in cfg:
            cfg["dual_attention_layers"] = [i for i in cfg["dual_attention_layers"] if i < depth]
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
        part: ``"denoiser"`` (or ``"denoiser_2"``), ``"vae"`` or a text-encoder component name.
        device: ``"meta"`` (the default) allocates nothing: shapes, counts and FLOPs only.
        depth: keep this many denoiser blocks (see :func:`config`); None builds the full model.
        dtype: the weights' dtype; parameters are created in it directly (a bf16 FLUX never
            exists in fp32 first).
        seed: seeds the random weights (ignored on meta).
    """
    cfg = config(name, part, depth)
    cls = _component_class(_parts(spec(name))[part]["class"])
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

    Raises:
        ConfigError: the family has no tiny-text-encoder recipe here (SD3, FLUX.1 and Wan 2.1 do).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from visalign.testing import tiny_pipeline

    record = spec(name)
    family = record["family"]
    if family not in _TINY_TEXT_WIDTHS:
        supported = [n for n in ARCHITECTURES if spec(n)["family"] in _TINY_TEXT_WIDTHS]
        raise ConfigError(
            f"build_pipeline has no tiny text encoders for {name} (family {family}); it builds "
            f"{', '.join(supported)}. Use build({name!r}) for the denoiser, VAE or text encoders alone."
        )
    pipe = tiny_pipeline(
        family,
        seed=seed,
        **_TINY_TEXT_WIDTHS[family],
        transformer=build(name, "denoiser", device=device, depth=depth, dtype=dtype, seed=seed),
        vae=build(name, "vae", device=device, dtype=dtype, seed=seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(**record["scheduler"]),
    )
    return pipe.to(device=device, dtype=dtype)
