"""Finding the adapter for a pipeline: a registry keyed by the diffusers pipeline class name.

Keys are class *names*, so registering an adapter never imports a pipeline module, and a subclass
of a registered pipeline (e.g. a user's custom ``MyFluxPipeline(FluxPipeline)``) is found through
its method resolution order.
"""

from __future__ import annotations

from visalign.errors import UnsupportedPipelineError

_ADAPTERS: dict[str, type] = {}


def register_adapter(policy_class: type) -> type:
    """Class decorator: registers a Policy subclass for each name in its ``pipeline_class_names``."""
    for name in policy_class.pipeline_class_names:
        _ADAPTERS[name] = policy_class
    return policy_class


def supported_pipelines() -> dict[str, str]:
    """Maps each supported pipeline class name to its visalign family."""
    return {name: cls.family for name, cls in sorted(_ADAPTERS.items())}


def adapter_for(pipe) -> type:
    """The Policy subclass that handles ``pipe``, or a clear error listing the supported ones."""
    for klass in type(pipe).__mro__:
        if klass.__name__ in _ADAPTERS:
            return _ADAPTERS[klass.__name__]
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


def load(pretrained_model_name_or_path: str, policy_kwargs: dict | None = None, **from_pretrained_kwargs):
    """Loads a pipeline with ``DiffusionPipeline.from_pretrained`` and wraps it.

    Args:
        pretrained_model_name_or_path: a hub id or a local folder.
        policy_kwargs: options for the adapter (see :func:`wrap`).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``local_files_only``, ...).

    Example::

        policy = va.load("stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16)
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **from_pretrained_kwargs)
    return wrap(pipe, **(policy_kwargs or {}))
