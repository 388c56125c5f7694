"""FSDP2 full fine-tuning through ``accelerate launch``: the checks, the CPU path and the gathers.

Launched with an FSDP accelerate config (``configs/accelerate/fsdp.yaml``, or
``configs/accelerate/fsdp_cpu_2proc.yaml`` on a machine without GPUs)::

    accelerate launch --config_file configs/accelerate/fsdp.yaml -m visalign train RECIPE.yaml use_lora=false

``accelerator.prepare`` shards the trained denoiser in place with ``fully_shard`` (one FSDP unit
per block class named in ``fsdp_transformer_layer_cls_to_wrap``, plus the root), so every trainable
parameter becomes a ``DTensor`` holding this rank's shard. This module holds what the trainer needs
around that:

- :func:`fsdp_plugin_from_launch` reads accelerate's FSDP settings up front and turns what visalign
  cannot run into a :class:`~visalign.errors.ConfigError`; :func:`check_wrap_classes` checks the
  block classes against the model before anything is sharded;
- :func:`enable_cpu_fsdp`: accelerate treats FSDP as a GPU-only distributed type, while torch's
  FSDP2 runs on CPU over gloo; this makes the tests' 2-process CPU runs real FSDP runs;
- :func:`shard_frozen_copy` shards the frozen reference copy of full fine-tuning like the policy;
- :func:`full_tensor` / :func:`shard_like` move lagged copies of the weights between their sharded
  (live) form and the full form their checkpoints hold, and :func:`gathered_policy` gathers the
  trained denoisers into ordinary modules for ``save_pretrained`` and ``save_lora``.
"""

from __future__ import annotations

import os

import torch

from visalign.errors import ConfigError

__all__ = [
    "GatheredCheckpoint",
    "check_wrap_classes",
    "enable_cpu_fsdp",
    "fsdp_plugin_from_launch",
    "fsdp_requested",
    "full_tensor",
    "is_sharded",
    "gathered_policy",
    "shard_frozen_copy",
    "shard_like",
]

_HOW_TO_FIX = "Edit the fsdp_config of your accelerate config (see configs/accelerate/fsdp.yaml and docs/memory.md)."


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin_from_launch(use_lora: bool):
    """accelerate's FSDP plugin built from the launch environment, or a ConfigError saying what to change.

    Built here rather than inside ``Accelerator()`` so that a setting visalign cannot run fails
    before any process group or model work, with a message in visalign's terms.

    Args:
        use_lora: the run's ``use_lora``, for the message of the FSDP1 refusal.

    Raises:
        ConfigError: ``fsdp_version`` is not 2, or accelerate rejects a setting (the message quotes it).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        # FSDP1 wraps the denoiser in a FullyShardedDataParallel module and flattens its parameters,
        # which breaks the policy's plain `denoiser`, the trainable-parameter list and LoRA export; the
        # trainer is built on FSDP2's in-place, per-parameter sharding.
        lora = (
            " (and its LoRA adapters, which FSDP1 would flatten together with the frozen weights)" if use_lora else ""
        )
        raise ConfigError(
            f"The accelerate config asks for FSDP version {version}; visalign shards the denoiser{lora} with "
            f"FSDP2 only. Set `fsdp_version: 2` under fsdp_config. {_HOW_TO_FIX}"
        )
    try:
        return FullyShardedDataParallelPlugin()
    except (ValueError, TypeError) as exc:  # accelerate validates the FSDP_* settings in __post_init__
        raise ConfigError(f"accelerate rejected the FSDP settings of the launch: {exc}. {_HOW_TO_FIX}") from exc


def enable_cpu_fsdp(accelerator, plugin, mixed_precision: str = "no") -> None:
    """Turns a multi-CPU (gloo) accelerator into an FSDP one, so that ``prepare`` calls ``fully_shard``.

    accelerate only sets its FSDP distributed type on GPU-like devices: on a machine without them a
    multi-process launch becomes ``MULTI_CPU`` (plain DDP over gloo) and the FSDP plugin is dropped.
    torch's FSDP2 itself runs on CPU (its all-gathers and reduce-scatters go through gloo), so the
    shared state is switched to FSDP with the launch's plugin, as ``AcceleratorState`` does on GPUs.
    Everything else (the gloo process group, the CPU device, the ranks) stays as accelerate set it.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise RuntimeError("visalign could not switch accelerate to FSDP2 on CPU; please report this.")


def _class_names(module: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules()}


def check_wrap_classes(plugin, module: torch.nn.Module) -> None:
    """Checks, before sharding, that the FSDP wrap settings can shard ``module`` (the training module).

    accelerate would otherwise fail inside ``prepare`` with "Could not find the transformer layer
    class", or (with no wrap policy) put the whole denoiser into one FSDP unit, which all-gathers
    every weight at once and saves no memory.

    Raises:
        ConfigError: a class named in ``fsdp_transformer_layer_cls_to_wrap`` is not in the model, or
            no block is wrapped; the message lists the denoiser's block classes.
    """
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    from visalign.architectures import BLOCK_ATTRIBUTES, block_lists

    # Every submodule's block lists: a training module may hold several denoisers (both Wan 2.2 experts).
    blocks = sorted({type(b).__name__ for sub in module.modules() for blocks in block_lists(sub) for b in blocks})
    suggestion = ",".join(blocks) if blocks else "the class names of the model's repeated blocks"
    policy = plugin.auto_wrap_policy
    policy = getattr(policy, "func", policy)
    if policy is size_based_auto_wrap_policy:
        return
    if policy is not transformer_auto_wrap_policy:
        raise ConfigError(
            f"fsdp_auto_wrap_policy is NO_WRAP: the whole {type(module).__name__} would be one FSDP unit, so every "
            f"rank would gather all of its weights at once and sharding would save no memory. Set "
            f"`fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` and `fsdp_transformer_layer_cls_to_wrap: {suggestion}`. "
            f"{_HOW_TO_FIX}"
        )
    names = plugin.transformer_cls_names_to_wrap
    if not names:  # accelerate then wraps the model's `_no_split_modules`
        names = [n for n in getattr(module, "_no_split_modules", None) or [] if n in _class_names(module)]
        if not names:
            raise ConfigError(
                f"fsdp_transformer_layer_cls_to_wrap is empty and {type(module).__name__} names no block classes "
                f"to split on, so nothing would be sharded block by block. Set "
                f"`fsdp_transformer_layer_cls_to_wrap: {suggestion}`. {_HOW_TO_FIX}"
            )
        return
    present = _class_names(module)
    # Unstripped, as accelerate looks them up: "A, B" (a space after the comma) names " B", which no class has.
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap names {', '.join(map(repr, missing))}, which the {type(module).__name__} being "
            f"trained does not contain. Its blocks (in {', '.join(a for a in BLOCK_ATTRIBUTES)}) are: "
            f"{', '.join(blocks) or 'none found'}. Set `fsdp_transformer_layer_cls_to_wrap: {suggestion}`. {_HOW_TO_FIX}"
        )


def shard_frozen_copy(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """Shards a frozen copy of the training module (the reference of full fine-tuning) like the policy.

    accelerate's FSDP2 ``prepare`` takes one model, so the reference goes through the same
    ``fsdp2_prepare_model`` (the same wrap policy, mesh and precision) without an optimizer;
    unsharded, every rank would hold a full second copy of the denoiser, which FSDP is there to avoid.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, module)


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (a collective: every rank must call it), else ``tensor``."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut into this rank's shard the way ``like`` (a sharded parameter) is, on its device and dtype.

    Every rank holds the whole tensor (read from a checkpoint), so each takes its own shard locally
    (``src_data_rank=None``): no communication.
    """
    full = full.to(device=like.device, dtype=like.dtype)
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _unsharded_class(module: torch.nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps it in place for a subclass ``FSDP<Class>``."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    while issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if issubclass(b, torch.nn.Module) and b is not FSDPModule)
    return cls


def gathered_policy(accelerator, policy):
    """A policy over unsharded copies of the trained denoisers with their full weights, on the main process.

    For the exports (``save_pretrained``, ``save_lora``), which read ordinary tensors and deep-copy
    the pipeline (FSDP modules refuse both). Gathers the full state dict of the training module (a
    collective: every rank must call it); on the main process, builds each trainable denoiser anew
    from its config (with its LoRA adapters, if any), loads its weights, and wraps a shallow copy
    of the pipeline that holds these copies. Returns None on the other ranks.
    """
    import copy

    from visalign.pipelines import wrap

    training = policy.training_module()
    state = accelerator.get_state_dict(training)  # full weights, on CPU, on the main process only
    if not accelerator.is_main_process:
        return None
    prefixes = {id(m): name for name, m in training.named_modules()}
    pipe = copy.copy(policy.pipe)  # the other components are shared, not copied
    for name, denoiser in policy.trainable_denoisers().items():
        cls = _unsharded_class(denoiser)
        if not hasattr(cls, "from_config"):
            raise ConfigError(f"Exporting under FSDP needs a diffusers model; {name} is a {cls.__name__}.")
        plain = cls.from_config(denoiser.config)
        for adapter, lora in (getattr(denoiser, "peft_config", None) or {}).items():
            plain.add_adapter(lora, adapter_name=adapter)
        prefix = prefixes[id(denoiser)]
        prefix = f"{prefix}." if prefix else ""
        # assign: the copy takes the trained tensors as they are (fp32 trainable weights, a bf16 frozen base).
        plain.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, assign=True)
        # Around DiffusionPipeline.__setattr__, which would re-register the component in the config.
        pipe.__dict__[name] = plain.eval()
    return wrap(pipe)


class GatheredCheckpoint:
    """Checkpoints an object that holds copies of sharded parameters (an EMA) as whole tensors.

    accelerate writes registered objects from the main process only; the shard copies of the other
    ranks would be lost. :meth:`state_dict` gathers them (a collective, as accelerate calls it on
    every rank) and :meth:`load_state_dict` cuts each rank's shard back out.

    Args:
        obj: the object with ``state_dict()``/``load_state_dict()``, e.g. diffusers' ``EMAModel``.
        key: the entry of its state dict that holds one tensor per parameter (``"shadow_params"``).
        parameters: the sharded parameters those tensors copy, in the same order.
    """

    def __init__(self, obj, key: str, parameters):
        self.obj, self.key, self.parameters = obj, key, list(parameters)

    def state_dict(self) -> dict:
        state = dict(self.obj.state_dict())
        state[self.key] = [full_tensor(t.detach()).cpu() for t in state[self.key]]
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        state[self.key] = [shard_like(t, p.detach()) for t, p in zip(state[self.key], self.parameters)]
        self.obj.load_state_dict(state)
