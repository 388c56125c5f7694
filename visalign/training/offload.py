"""Keeping the reference and EMA / lagged copies of the weights in host memory (``offload_copies``).

Full fine-tuning with a KL term keeps a frozen copy of the whole denoiser, an EMA keeps another,
DiffusionNFT's old policy, AWM's EMA anchor and online DPO's refreshed reference one more each. With
``offload_copies=True`` every such copy lives in CPU memory (pinned when the model runs on CUDA,
so that host→device copies are asynchronous) and visits the device only for the pass that uses it:

- the frozen reference model: :func:`on_device` points its weights at device copies for the
  reference pass and back at the host tensors afterwards (one host→device copy per pass, nothing
  copied back: the reference never changes);
- lagged weights (:class:`~visalign.training.lagged.LaggedWeights`): the swap copies the host
  tensors into the live parameters and restores the live values from a device-side clone;
  the decay update runs on the CPU (one device→host copy of θ per update);
- the trainer's EMA (:class:`OffloadableEMA`): updated on the CPU, copied in for EMA evaluation.

Before a copy is made, :func:`check_offload_memory` checks that the host can hold every copy and that
the device can hold the model plus the largest copy brought in for a pass, and raises
:class:`~visalign.errors.InsufficientMemoryError` with the numbers otherwise; the arithmetic is the
pure :func:`check_fits`.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch

from visalign.errors import ConfigError, InsufficientMemoryError

__all__ = [
    "OffloadableEMA",
    "check_fits",
    "check_offload_memory",
    "check_trainer_copies",
    "copy_placement",
    "device_free_bytes",
    "host_available_bytes",
    "host_clone",
    "host_copy",
    "on_device",
    "tensor_bytes",
]

GiB = 2**30

_FIXES = {
    "host memory": (
        "Free host memory, train LoRA (use_lora=true: its copies are the adapter only), shard the model "
        "with FSDP over more GPUs or hosts, train a smaller model, or keep the copies on the GPU "
        "(offload_copies=false) if it can hold them."
    ),
    "GPU memory": (
        "A pass brings one copy onto the GPU beside the model. Train LoRA (use_lora=true), shard the model "
        "with FSDP, train a smaller model, or free GPU memory (other processes, a smaller rollout batch)."
    ),
}


def copy_placement(device: torch.device | str, offload: bool) -> tuple[torch.device, bool]:
    """Where a copy of weights that live on ``device`` is kept: ``(device of the copy, pinned)``.

    Without offload the copy stays beside the weights. Offloaded, it lives on the CPU, pinned when the
    weights are on CUDA (page-locked memory is what lets host→device copies run asynchronously).
    """
    device = torch.device(device)
    if not offload:
        return device, False
    return torch.device("cpu"), device.type == "cuda"


def host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """A copy of ``tensor`` in CPU memory (pinned if ``pin`` and CUDA is available), same dtype and strides."""
    # Pinning needs a CUDA runtime; without one the copy is ordinary (there is nothing to overlap with).
    pin = pin and torch.cuda.is_available()
    out = torch.empty_like(tensor, device="cpu", pin_memory=pin) if pin else torch.empty_like(tensor, device="cpu")
    return out.copy_(tensor.detach())


def host_clone(module: torch.nn.Module, pin: bool) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are in CPU memory from the start.

    Copying to the device first and then to the host would need room for a second model on the
    device, which is what offloading avoids; pre-filling deepcopy's memo with host copies makes the
    copy tensor by tensor on the host instead.
    """
    memo: dict = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(host_copy(p, pin), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = host_copy(b, pin)
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device | str, non_blocking: bool = True):
    """Within this block ``module``'s weights are device copies of its host tensors; after it, the host tensors again.

    One host→device copy per entry and nothing copied back: use it for weights that a pass only
    reads (the frozen reference). The device copies are freed when the block ends. With a CPU
    ``device`` it changes nothing.
    """
    device = torch.device(device)
    tensors = [*module.parameters(), *module.buffers()]
    held = [t.data for t in tensors]
    try:
        for t in tensors:
            # From pinned memory the copy is asynchronous; kernels on the same stream wait for it.
            t.data = t.data.to(device, non_blocking=non_blocking)
        yield module
    finally:
        for t, host in zip(tensors, held):
            t.data = host


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def host_available_bytes() -> int | None:
    """Memory the host can still give (``MemAvailable`` of /proc/meminfo, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_free_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA ``device`` (``torch.cuda.mem_get_info``); None for other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)[0]


def check_fits(needed: int, available: int | None, what: str, where: str = "host memory") -> None:
    """Raises :class:`InsufficientMemoryError` when ``needed`` bytes of ``where`` exceed ``available``.

    Args:
        needed: bytes that must fit.
        available: bytes available; None (unknown) passes.
        what: what needs them, for the message (e.g. "offload_copies keeps the reference model (3.2 GiB)").
        where: "host memory" or "GPU memory"; picks the advice in the message.
    """
    if available is None or needed <= available:
        return
    fix = _FIXES.get(where, _FIXES["host memory"])
    raise InsufficientMemoryError(
        f"{what}: {needed / GiB:.2f} GiB of {where} is needed, but only {available / GiB:.2f} GiB is available. {fix}"
    )


def check_offload_memory(
    copies: dict[str, int],
    device: torch.device | str,
    largest_pass: int,
    processes: int = 1,
    host_available: int | None = None,
    device_free: int | None = None,
) -> None:
    """Checks, before the copies are made, that offloading them can work on this machine.

    Args:
        copies: bytes of each copy kept on the host, by name ("the reference model": ...).
        device: where the model runs.
        largest_pass: bytes of the largest copy brought onto the device for one pass.
        processes: training processes on this host, each holding its own copies.
        host_available, device_free: the measured figures (default: :func:`host_available_bytes`,
            :func:`device_free_bytes`); given for tests.

    Raises:
        InsufficientMemoryError: the host cannot hold every copy, or (CUDA) the device's free memory,
            with the model already on it, cannot hold the largest copy for a pass.
    """
    total = sum(copies.values())
    if not total:
        return
    listing = ", ".join(f"{name} ({size / GiB:.2f} GiB)" for name, size in copies.items())
    per = f" per process x {processes} processes on this host" if processes > 1 else ""
    check_fits(
        total * processes,
        host_available if host_available is not None else host_available_bytes(),
        f"offload_copies keeps {listing} in host memory{per}",
        "host memory",
    )
    if torch.device(device).type == "cuda":
        check_fits(
            largest_pass,
            device_free if device_free is not None else device_free_bytes(device),
            f"offload_copies brings the largest copy onto {device} for each pass that uses it, beside the model",
            "GPU memory",
        )


def _ema_base():
    from diffusers.training_utils import EMAModel

    return EMAModel


class OffloadableEMA(_ema_base()):
    """diffusers' ``EMAModel`` whose shadow weights may live in (pinned) host memory.

    Offloaded, :meth:`step` brings θ to the host tensor by tensor and updates there with diffusers'
    formula (s ← s − (1−d)(s − θ)), so on the CPU it is bit-identical to the on-device update;
    ``copy_to`` / ``store`` / ``restore`` already work across devices. Its checkpoint format is
    ``EMAModel``'s. Loading a checkpoint (accelerate loads custom state onto the CPU) puts the shadow
    weights back where they belong: on the host when offloaded, beside the parameters otherwise.

    Args:
        parameters: the trainable parameters.
        decay: the EMA decay.
        offload: keep the shadow weights in host memory.
    """

    def __init__(self, parameters, decay: float, offload: bool = False):
        parameters = list(parameters)
        # Built empty, then filled: EMAModel would clone on the device first (a second model there).
        super().__init__([], decay=decay)
        self.offload = offload
        self._params = parameters
        self.shadow_params = [self._place(p, p, copy=True) for p in parameters]

    def _place(self, tensor: torch.Tensor, param: torch.Tensor, copy: bool) -> torch.Tensor:
        device, pin = copy_placement(param.device, self.offload)
        if pin and torch.cuda.is_available() and not tensor.is_pinned():
            return host_copy(tensor.to(param.dtype), pin=True)
        return tensor.detach().to(device=device, dtype=param.dtype, copy=copy)

    @torch.no_grad()
    def step(self, parameters) -> None:
        if not self.offload:
            return super().step(parameters)
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        one_minus_decay = 1 - decay
        for s_param, param in zip(self.shadow_params, parameters):
            # A blocking device→host copy: it also waits for every earlier copy out of s_param.
            theta = param.detach().to(s_param.device)
            if param.requires_grad:
                s_param.sub_(one_minus_decay * (s_param - theta))
            else:
                s_param.copy_(theta)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The loaded tensors are fresh (EMAModel deep-copies the state), so they move without another copy.
        self.shadow_params = [self._place(s, p, copy=False) for s, p in zip(self.shadow_params, self._params)]


def check_trainer_copies(trainer, denoiser: torch.nn.Module) -> None:
    """Before any copy is made: ``offload_copies`` must be usable for ``trainer``, and its copies must fit.

    Counts the copies the trainer will keep of ``denoiser`` (the full-fine-tuning reference, the
    EMA, the algorithm's lagged copies) and checks them with :func:`check_offload_memory`.

    Raises:
        ConfigError: offload_copies under FSDP (which already shards the copies).
        InsufficientMemoryError: the host cannot hold the copies, or the GPU the model plus the
            largest copy brought in for a pass.
    """
    from accelerate.utils import DistributedType

    cfg = trainer.config
    if trainer.accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "offload_copies is not supported under FSDP: FSDP already shards the reference and EMA copies "
            "over the GPUs. Set offload_copies=false, or train without FSDP."
        )
    trainable = tensor_bytes(p for p in denoiser.parameters() if p.requires_grad)
    copies = {}
    if not cfg.use_lora and trainer.needs_reference:
        copies["the reference model"] = tensor_bytes([*denoiser.parameters(), *denoiser.buffers()])
    if cfg.ema_decay is not None:
        copies["the EMA"] = trainable
    for name in trainer.lagged_copies():
        copies[f"the {name}"] = trainable
    in_passes = [size for name, size in copies.items() if name != "the EMA"]  # the EMA update runs on the host
    check_offload_memory(
        copies,
        trainer.accelerator.device,
        largest_pass=max(in_passes, default=0),
        processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
