"""Finding the adapter for a pipeline: a registry keyed by the diffusers pipeline class name.

Keys are class *names*, so registering an adapter never imports a pipeline module, and a subclass
of a registered pipeline (e.g. a user's custom ``MyFluxPipeline(FluxPipeline)``) is found through
its method resolution order.

Several adapters may share a class name: Wan 2.1, Wan 2.2 A14B (two experts) and Wan 2.2 TI2V all
load as ``WanPipeline``. Each adapter says which pipelines it handles with
:meth:`~visalign.pipelines.Policy.accepts`, and the most recently registered adapter that accepts a
pipeline handles it (so a user's adapter registered later takes precedence, as it always did).
"""

from __future__ import annotations

import os
import re

from visalign.errors import InvalidInputError, UnsupportedPipelineError

_ADAPTERS: dict[str, list[type]] = {}


def register_adapter(policy_class: type) -> type:
    """Class decorator: registers a Policy subclass for each name in its ``pipeline_class_names``.

    Registering an adapter of a family that is already registered for a name replaces it.
    """
    for name in policy_class.pipeline_class_names:
        others = [c for c in _ADAPTERS.get(name, []) if c.family != policy_class.family]
        _ADAPTERS[name] = [*others, policy_class]
    return policy_class


def supported_pipelines() -> dict[str, str]:
    """Maps each supported pipeline class name to its visalign family (several, comma-separated)."""
    return {name: ", ".join(cls.family for cls in classes) for name, classes in sorted(_ADAPTERS.items())}


def adapter_for(pipe) -> type:
    """The Policy subclass that handles ``pipe``, or a clear error listing the supported ones."""
    for klass in type(pipe).__mro__:
        candidates = _ADAPTERS.get(klass.__name__)
        if not candidates:
            continue
        for cls in reversed(candidates):
            if cls.accepts(pipe):
                return cls
        variants = "; ".join(f"{cls.family}: {(cls.__doc__ or '').strip().splitlines()[0]}" for cls in candidates)
        raise UnsupportedPipelineError(
            f"visalign's adapters for {klass.__name__} handle these variants, and none accepts this "
            f"{type(pipe).__name__}: {variants}. Load one of them, or register an adapter for yours."
        )
    listing = ", ".join(f"{name} ({family})" for name, family in supported_pipelines().items())
    raise UnsupportedPipelineError(
        f"visalign has no adapter for {type(pipe).__name__}. Supported pipelines: {listing}. "
        f"To add a family, subclass visalign.pipelines.Policy and decorate it with "
        f"@visalign.pipelines.register_adapter."
    )


def wrap(pipe, **kwargs):
    """Wraps a diffusers pipeline object in the Policy for its family.

    Args:
        pipe: a loaded diffusers pipeline (e.g. ``StableDiffusion3Pipeline``).
        **kwargs: adapter options (e.g. ``max_sequence_length``).

    Returns:
        A :class:`~visalign.pipelines.Policy` sharing the pipeline's components.
    """
    from visalign.pipelines.base import Policy

    if isinstance(pipe, Policy):
        return pipe
    return adapter_for(pipe)(pipe, **kwargs)


def load(
    pretrained_model_name_or_path: str,
    policy_kwargs: dict | None = None,
    attention_backend: str | None = None,
    **from_pretrained_kwargs,
):
    """Loads a pipeline with ``DiffusionPipeline.from_pretrained`` and wraps it.

    Args:
        pretrained_model_name_or_path: a hub id or a local folder.
        policy_kwargs: options for the adapter (see :func:`wrap`).
        attention_backend: the denoiser's attention kernel, ``"sdpa"`` (None: leave the stock one),
            ``"xformers"``, ``"flash"`` or ``"sage"`` (:mod:`visalign.pipelines.attention`). Checked before
            anything is loaded, so a missing package fails fast.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``local_files_only``, ...).

    Example::

        policy = va.load("stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16)
    """
    from diffusers import DiffusionPipeline

    from visalign.pipelines.attention import apply_attention_backend, check_attention_backend

    if attention_backend is not None:
        check_attention_backend(attention_backend)
    name = _check_local_source(pretrained_model_name_or_path)
    try:
        pipe = DiffusionPipeline.from_pretrained(name, **from_pretrained_kwargs)
    except Exception as exc:
        # "org/name" whose "org" is a local folder: maybe a mistyped local path, maybe a hub id.
        parent = os.path.dirname(name) if isinstance(name, str) else ""
        if parent and os.path.isdir(parent) and not os.path.exists(name):
            raise InvalidInputError(
                f"va.load({pretrained_model_name_or_path!r}) failed: it is not a local folder ('{parent}' exists, "
                f"but has no '{os.path.basename(name)}' in it), and loading it as a hub id failed with "
                f"{type(exc).__name__}: {exc}. Pass a local folder written by save_pretrained (one with "
                f"model_index.json) or a hub id such as 'stabilityai/stable-diffusion-3.5-medium'."
            ) from exc
        raise
    policy = wrap(pipe, **(policy_kwargs or {}))
    if attention_backend is not None:
        apply_attention_backend(policy, attention_backend)
    return policy


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path (never a hub id, which is ``name`` or ``org/name``)."""
    return (
        name in (".", "..")
        or name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or bool(_WINDOWS_DRIVE.match(name))
        or "\\" in name
        or name.count("/") >= 2
        or (os.sep != "/" and os.sep in name)
    )


def _check_local_source(name):
    """Returns ``name`` (``~`` expanded) or raises a clear error for a local path that is no pipeline folder."""
    if not isinstance(name, (str, os.PathLike)):
        raise InvalidInputError(
            f"va.load expects a hub id or a local folder as a string; got {type(name).__name__}. "
            f"To wrap an already loaded pipeline, use va.wrap(pipe)."
        )
    name = os.path.expanduser(os.fspath(name))
    if os.path.isfile(name):
        raise InvalidInputError(
            f"va.load({name!r}): this is a file, but va.load needs a pipeline folder (one with "
            f"model_index.json, as written by save_pretrained) or a hub id. For a single-file checkpoint, "
            f"load it with the pipeline class (e.g. StableDiffusion3Pipeline.from_single_file(path)) and "
            f"call va.wrap(pipe); for a LoRA file, load the base model and call pipe.load_lora_weights(path)."
        )
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "model_index.json")):
            return name
        hint = ""
        inner = sorted(
            os.path.join(name, d) for d in os.listdir(name) if os.path.exists(os.path.join(name, d, "model_index.json"))
        )
        if inner:
            hint = f" The pipeline folder seems to be {inner[0]!r}: pass that."
        elif any(f.endswith("lora_weights.safetensors") for f in os.listdir(name)):
            hint = (
                " It holds LoRA weights: load the base model with va.load(...) and call "
                "policy.pipe.load_lora_weights(folder) (on the command line: --lora FOLDER)."
            )
        raise InvalidInputError(
            f"va.load({name!r}): the folder exists but has no model_index.json, so it is not a diffusers "
            f"pipeline folder.{hint} Pass a local folder written by save_pretrained or a hub id."
        )
    if _looks_like_path(name):
        raise InvalidInputError(
            f"va.load({name!r}): the local folder {os.path.abspath(name)!r} does not exist; pass a local "
            f"folder written by save_pretrained or a hub id (such as 'stabilityai/stable-diffusion-3.5-medium')."
        )
    return name
