"""Attention backends: which kernel computes the denoiser's attention.

``attention_backend`` is ``"sdpa"`` (PyTorch's ``scaled_dot_product_attention``, the default;
``"native"`` is the same, diffusers' name for it), ``"xformers"``, ``"flash"`` (flash-attn 2) or
``"sage"`` (SageAttention). Every trainer config has the field, ``va.load(..., attention_backend=)``
and the CLI take it, and :func:`apply_attention_backend` sets it on a policy::

    apply_attention_backend(policy, "flash")     # MissingDependencyError if flash-attn is not installed

It goes through diffusers' attention dispatcher (``diffusers.models.attention_dispatch``): FLUX and
Wan processors call ``dispatch_attention_fn`` and carry an ``_attention_backend``, which is set per
model, so two policies in one process can use different kernels (diffusers'
``set_attention_backend`` also changes the process-wide default; this does not). In diffusers 0.42
SD3's joint-attention processor calls ``F.scaled_dot_product_attention`` directly, so for a backend
other than sdpa it is replaced by :class:`DispatchJointAttnProcessor`, the same computation through
the dispatcher. UNet families (SD 1.x/2.x, SDXL) do not use the dispatcher: ``xformers`` goes through
diffusers' ``enable_xformers_memory_efficient_attention``, and flash/sage raise a ConfigError.
Only the denoiser is changed (not the VAE). ``"sdpa"`` restores the stock processors.
"""

from __future__ import annotations

import copy
import importlib

import torch

from visalign.errors import ConfigError, MissingDependencyError

__all__ = [
    "ATTENTION_BACKENDS",
    "DispatchJointAttnProcessor",
    "apply_attention_backend",
    "check_attention_backend",
    "resolve_attention_backend",
]

#: visalign's names → diffusers' AttentionBackendName values.
ATTENTION_BACKENDS = {"sdpa": "native", "native": "native", "xformers": "xformers", "flash": "flash", "sage": "sage"}
#: The package each backend imports, and the visalign extra that installs it.
_PACKAGES = {"xformers": ("xformers", "xformers"), "flash": ("flash_attn", "flash"), "sage": ("sageattention", "sage")}


def resolve_attention_backend(name: str | None) -> str:
    """visalign's canonical name (``sdpa``, ``xformers``, ``flash`` or ``sage``); None means sdpa."""
    key = "sdpa" if name is None else str(name).strip().lower()
    if key not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"Unknown attention_backend {name!r}; use one of {', '.join(ATTENTION_BACKENDS)} "
            "(sdpa is PyTorch's scaled_dot_product_attention, the default)."
        )
    return "sdpa" if ATTENTION_BACKENDS[key] == "native" else key


def check_attention_backend(name: str | None) -> str:
    """Resolves ``name`` and raises :class:`MissingDependencyError` when its package is not usable here."""
    backend = resolve_attention_backend(name)
    if backend == "sdpa":
        return backend
    package, extra = _PACKAGES[backend]
    hint = f"Install it with `pip install 'visalign[{extra}]'` (a CUDA machine), or use attention_backend='sdpa'."
    try:
        importlib.import_module(package)
    except Exception as exc:  # ImportError, or a broken build raising something else
        raise MissingDependencyError(
            f"attention_backend={backend!r} needs the package '{package}', which could not "
            f"be imported ({type(exc).__name__}: {exc}). {hint}"
        ) from exc
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:  # diffusers' own check: the installed version is one its dispatcher supports
        _check_attention_backend_requirements(AttentionBackendName(ATTENTION_BACKENDS[backend]))
    except RuntimeError as exc:
        raise MissingDependencyError(f"attention_backend={backend!r}: {exc} {hint}") from exc
    return backend


class DispatchJointAttnProcessor:
    """SD3's joint attention (what diffusers' ``JointAttnProcessor2_0`` computes) through the dispatcher.

    Image and text tokens are projected, query/key normalised, concatenated along the sequence and
    attended together in the (batch, tokens, heads, head_dim) layout ``dispatch_attention_fn`` takes;
    the result is split back and projected. Also serves SD3.5's second, image-only attention.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = heads(to_q(x)), heads(to_k(x)), heads(to_v(x))
            return (norm_q(q) if norm_q is not None else q), (norm_k(k) if norm_k is not None else k), v

        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        tokens = q.shape[1]
        if encoder_hidden_states is not None:
            cq, ck, cv = project(
                encoder_hidden_states,
                attn.add_q_proj,
                attn.add_k_proj,
                attn.add_v_proj,
                attn.norm_added_q,
                attn.norm_added_k,
            )
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        out = dispatch_attention_fn(q, k, v, backend=self._attention_backend).flatten(2, 3).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :tokens]))
        if encoder_hidden_states is None:
            return image
        context = out[:, tokens:]
        return image, (context if attn.context_pre_only else attn.to_add_out(context))


def _attention_modules(model: torch.nn.Module):
    return [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def _restore_stock(model: torch.nn.Module) -> None:
    for module in _attention_modules(model):
        if hasattr(module, "_visalign_stock_processor"):
            module.set_processor(module.__dict__.pop("_visalign_stock_processor"))


def _use_dispatcher(model: torch.nn.Module, backend: str) -> list[str]:
    """Points every dispatcher processor of ``model`` at ``backend`` (a diffusers name); returns the
    class names of processors that cannot use the dispatcher.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    value, unsupported = AttentionBackendName(backend), []
    for module in _attention_modules(model):
        processor = module.processor
        if isinstance(processor, JointAttnProcessor2_0):
            module._visalign_stock_processor = processor
            processor = DispatchJointAttnProcessor()
            module.set_processor(processor)
        if hasattr(processor, "_attention_backend"):
            if not hasattr(module, "_visalign_stock_processor"):
                module._visalign_stock_processor = processor
                processor = copy.copy(processor)  # never touch a processor object another model shares
                module.set_processor(processor)
            processor._attention_backend = value
        else:
            unsupported.append(type(processor).__name__)
    return sorted(set(unsupported))


def apply_attention_backend(policy, name: str | None) -> str:
    """Sets the attention backend of a policy's denoiser (or of a diffusers model); returns the canonical name.

    Args:
        policy: a :class:`~visalign.pipelines.Policy`, or a diffusers model (e.g. ``pipe.transformer``).
        name: ``"sdpa"`` (default; also ``"native"`` or None), ``"xformers"``, ``"flash"`` or ``"sage"``.

    Raises:
        ConfigError: an unknown name, or a backend the model's attention cannot use (flash/sage on a UNet).
        MissingDependencyError: the backend's package is not installed; the message names the extra.
    """
    backend = check_attention_backend(name)
    models = list(policy.trainable_denoisers().values()) if hasattr(policy, "trainable_denoisers") else [policy]
    for model in models:  # both experts of a two-expert family
        _apply_to_model(model, backend)
    if models[0] is not policy:
        policy.attention_backend = backend
    return backend


def _apply_to_model(model, backend: str) -> None:
    _restore_stock(model)
    if backend != "sdpa":
        unsupported = _use_dispatcher(model, ATTENTION_BACKENDS[backend])
        if unsupported and backend == "xformers":
            for module in _attention_modules(model):
                module.__dict__.setdefault("_visalign_stock_processor", module.processor)
            model.enable_xformers_memory_efficient_attention()
        elif unsupported:
            _restore_stock(model)
            raise ConfigError(
                f"attention_backend={backend!r}: {type(model).__name__} uses attention processors "
                f"({', '.join(unsupported)}) that do not go through diffusers' attention dispatcher; "
                "on this model use 'sdpa' or 'xformers'."
            )
