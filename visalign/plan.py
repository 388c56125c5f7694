"""``visalign plan RECIPE``: the memory and FLOPs a run needs per GPU, before it starts.

    visalign plan configs/sd35m_grpo.yaml --gpus 8
    visalign plan configs/flux_grpo.yaml --gpus 8 --strategy fsdp --accelerate-config configs/accelerate/fsdp.yaml

The recipe's ``model:`` names a known architecture (:data:`visalign.architectures.KNOWN_MODELS`, or
an explicit ``architecture:`` key). Nothing is downloaded or allocated: the real denoiser, VAE and
text encoders are built on the meta device and

- parameters, LoRA (the recipe's rank on the family's default targets, added with peft on meta)
  and buffers are counted;
- activations are *measured* on meta: a dispatch mode tracks every tensor the forward and
  backward create and when it dies, so the peak is that of the real op sequence (autograd's saved
  tensors, gradient-checkpoint recomputation, temporaries). On meta PyTorch picks the math SDPA,
  which holds the S×S attention matrix; GPU and CPU kernels are flash-style, so attention is counted
  as the CPU flash kernel saves it (q, k, v, output, log-sum-exp). Activations are linear in the
  batch, so one sample is measured and scaled;
- FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``, which works on meta tensors,
  at full depth (model FLOPs: no checkpoint recomputation, as MFU counts them);
- each denoiser gets the inputs its family's pipeline feeds it (:mod:`visalign.architectures.inputs`:
  packed latents, an editing family's source-image tokens, Wan image-to-video's condition channels,
  TI2V's per-token timesteps). Wan 2.2 A14B's two experts are both held and trained, so weights and
  LoRA count twice; one expert runs per forward. A denoiser whose forward reads tensor values
  (HunyuanVideo 1.5) cannot run on meta: its plan gives the counts and leaves the activation, peak
  and FLOP rows empty, with a note.

Per GPU, the peak is the static part (weights, gradients, AdamW's two fp32 moments, EMA, the
reference copy, the lagged copies of NFT/AWM/refreshed DPO) plus the largest of three phases: the rollout (every state and mean of the
trajectory, the denoiser's inference temporaries, the VAE decode), one training micro-batch, and the
optimizer step. Assumptions, as the trainer does today: trainable weights in fp32, frozen ones in the
recipe's ``torch_dtype``; a full-fine-tuning reference (``kl_beta > 0``) is a deep copy made before
accelerate wraps the model, so FSDP does not shard it; DDP keeps a second fp32 copy of the gradients
in its buckets; FSDP is FSDP2 ``fully_shard`` per transformer block (all parameters sharded, the
gathered block and the next one's prefetch unsharded); text encoders and the VAE stay on every GPU.
The training micro-batch is GRPO's and PRDP's: every (sample, trained step) pair of the micro-batch in
one forward, as visalign batches them; for DPO and DRaFT the figure is one forward per sample (DRaFT's
backpropagation through the chain is measured in benchmarks/gpu.py's step table, not planned).
With ``offload_copies`` the reference, EMA and lagged copies are counted as host memory per process
(:attr:`Plan.host_bytes`) instead, and the largest copy a pass brings in is added to the training
phase (and to NFT's rollout, which samples from the old policy).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from visalign import architectures as arch
from visalign.architectures import inputs as arch_inputs
from visalign.errors import ConfigError

__all__ = ["Plan", "Workload", "format_plan", "make_plan", "measure", "peak_bf16_flops", "workload_from_recipe"]

#: Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name fragment (first match).
_PEAKS = "H100 PCIe=756, H100 NVL=835, H100=989, H200=989, H20=148, A100=312, L40S=362, A10G=70, 4090=165"
PEAK_BF16_FLOPS = {k: float(v) * 1e12 for k, v in (entry.split("=") for entry in _PEAKS.split(", "))}
#: Each family's stock size (height, width, frames), for recipes that set none.
_DEFAULT_SIZE = {
    **dict.fromkeys(("sd3", "flux", "flux-kontext", "flux2", "flux2-klein"), (1024, 1024, None)),
    **dict.fromkeys(("qwen-image", "qwen-image-edit", "z-image"), (1024, 1024, None)),
    **dict.fromkeys(("wan-t2v", "wan22", "wan22-i2v"), (480, 832, 81)),
    "wan22-ti2v": (704, 1280, 121),
    **dict.fromkeys(("hunyuan-video15", "hunyuan-video15-i2v"), (480, 848, 121)),
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30


def peak_bf16_flops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU from its name (``torch.cuda.get_device_name()``), or None."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


@dataclass
class Workload:
    """What a plan needs to know about a run (from a recipe, or written out for a test)."""

    architecture: str
    algorithm: str = "grpo"
    dtype: str = "bfloat16"  # the frozen weights' dtype (recipe torch_dtype)
    compute_dtype: str = "bfloat16"  # activations: mixed_precision, else dtype
    height: int = 512
    width: int = 512
    num_frames: int | None = None
    use_lora: bool = True
    lora_rank: int = 8
    lora_targets: list[str] | None = None
    gradient_checkpointing: bool = False
    ema: bool = False
    reference: bool = False  # a KL to the base model (kl_beta > 0)
    rollout_batch: int = 8  # samples per GPU per iteration (prompts_per_step × group_size)
    num_steps: int = 10
    trained_steps: int = 6  # transitions each sample trains on
    micro_batch: int = 8  # samples per forward/backward
    cfg: int = 2  # 2 with batched classifier-free guidance (SD3, Wan), 1 otherwise (FLUX's embedded guidance)
    train_cfg: int = 2  # CFG branches that carry gradient in training
    text_tokens: int | None = None
    text_encoder_params: int | None = None  # None: the architecture's real text encoders
    device: str = "cuda"  # the optimizer step's temporaries: foreach AdamW on CUDA, per tensor on CPU
    rollout_chunk: int | None = None  # samples per sampling call (rollout_batch_size); None: the whole rollout
    lagged_copies: int = 0  # fp32 copies of the trainable weights: NFT's old policy, AWM's EMA anchor, snapshots
    offload_copies: bool = False  # reference, EMA and lagged copies in host memory, brought in per pass


def workload_from_recipe(path: str, overrides=(), architecture: str | None = None) -> Workload:
    """Reads a recipe (no model is loaded) into a :class:`Workload`; an unknown ``model:`` raises ConfigError."""
    import yaml

    from visalign.config import load_yaml, parse_overrides
    from visalign.recipes import RECIPE_KEYS, trainer_class

    raw, pairs = load_yaml(path) or {}, parse_overrides(overrides)
    for key in (*RECIPE_KEYS, "architecture"):
        if key in pairs:
            raw[key] = yaml.safe_load(pairs.pop(key))
    name = arch.resolve(raw.get("model"), architecture or raw.pop("architecture", None))
    algorithm = str(raw.get("algorithm", "grpo"))
    cfg = trainer_class(algorithm).config_class.from_dict({k: v for k, v in raw.items() if k not in RECIPE_KEYS})
    cfg = cfg.with_overrides([f"{k}={v}" for k, v in pairs.items()])
    record = arch.spec(name)
    family = record["family"]
    h, w, f = _DEFAULT_SIZE[family]
    get = lambda key, default=None: getattr(cfg, key, default)  # noqa: E731
    dtype = str(raw.get("torch_dtype") or "float32")
    guidance = get("guidance_scale")  # None: the family's default, which is > 1 for all but the distilled ones
    embedded = record["denoiser"]["config"].get("guidance_embeds")  # FLUX.1-dev/Kontext, FLUX.2 [dev]: no CFG batch
    cfg_mult = 2 if not embedded and (guidance is None or guidance > 1) and get("cfg_in_training", True) else 1
    rollout = get("prompts_per_step", 1) * get("group_size", 1)
    steps = get("num_steps", 10)
    candidates = get("sde_window_size") or steps - 1
    fraction = get("timestep_fraction", 1.0)
    trained = max(1, round(fraction * candidates)) if algorithm in ("grpo", "prdp") else 1
    per_update = max(1, rollout // get("updates_per_rollout", 1))
    compute = {"no": dtype, "bf16": "bfloat16", "fp16": "float16"}[get("mixed_precision", "no")]
    size = (get("height") or h, get("width") or w, (get("num_frames") or f) if f else None)
    lora = (get("use_lora", True), get("lora_rank", 8), get("lora_target_modules"), get("gradient_checkpointing", 0))
    reference = (
        get("kl_beta", 0.0) > 0 or get("ref_beta", 0.0) > 0 or (algorithm == "dpo" and not get("ref_refresh_every"))
    )
    copies = (get("ema_decay") is not None, reference)
    batch = (rollout, steps, trained, min(get("micro_batch_size") or per_update, per_update), cfg_mult)
    train_cfg = 1 if get("detach_uncond") else cfg_mult
    w = Workload(name, algorithm, dtype, compute, *size, *lora, *copies, *batch, train_cfg)
    w.rollout_chunk = get("rollout_batch_size")
    w.offload_copies = bool(get("offload_copies", False))
    # The trainers' LaggedWeights (their lagged_copies()): copies of the trainable weights only.
    lagged = {"nft": 1, "awm": (get("ema_anchor_beta", 0) > 0) + (get("updates_per_rollout", 1) > 1)}
    w.lagged_copies = lagged.get(algorithm, 1 if algorithm == "dpo" and get("ref_refresh_every") else 0)
    return w


# ------------------------------------------------------------------------------ measuring on meta
class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of every storage an op creates until its last tensor dies; keeps the peak."""

    def __init__(self, external=()):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        self.external = {t.untyped_storage()._cdata for t in external}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.external:
                key = t.untyped_storage()._cdata
                if key not in self.live:
                    self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.now += self.live[key][0]
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


@contextlib.contextmanager
def _flash_sdpa():
    """On meta, SDPA as a flash kernel stores it (see the module docstring); elsewhere unchanged."""
    functional, original = torch.nn.functional, torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type == "meta" and attn_mask is None:
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]
        kwargs.update(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return original(query, key, value, **kwargs)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _denoiser_inputs(w: Workload, batch: int, dtype: torch.dtype) -> dict:
    """The denoiser's forward arguments for ``batch`` samples of ``w`` (see visalign.architectures.inputs)."""
    size = (w.height, w.width, w.num_frames, w.text_tokens or 0)
    return arch_inputs.denoiser_inputs(w.architecture, batch, *size, dtype=dtype)


def _tensors(inputs: dict) -> list[torch.Tensor]:
    return [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]  # Z-Image passes lists of tensors


def _run(fn, external, flops: bool = True) -> tuple[int, int]:
    """``(peak live bytes, FLOPs)`` of ``fn`` on meta: one pass under both counters."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten  # the flash SDPA of _flash_sdpa, counted as FlopCounterMode counts the CUDA one
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward
    mapping = {forward: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v)}
    mapping[backward] = lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)
    counter = FlopCounterMode(display=False, custom_mapping=mapping) if flops else contextlib.nullcontext()
    with counter, _flash_sdpa(), _LiveBytes(external) as tracker:
        fn()
    return tracker.peak, counter.get_total_flops() if flops else 0


#: The per-sample measurements of a forward/backward; None (with ``unmeasured``, the reason) for a family
#: whose forward cannot run on meta (visalign.architectures.inputs.UNMEASURABLE).
_MEASURED = ("act_train", "flops_train", "act_train_ckpt", "act_infer", "flops_forward", "act_decode", "flops_decode")
#: The plan rows that need those measurements.
_NEEDS_MEASURED = (
    "rollout: peak above static",
    "train: activations, no checkpointing",
    "train: activations, checkpointing",
    "train: peak above static",
    "PEAK per GPU",
)


def measure(w: Workload, depth: int | None = None) -> dict:
    """Counts and per-sample measurements of ``w``'s architecture on meta (``depth``: fewer blocks).

    For a family whose forward cannot run on meta the measurements are None and ``unmeasured`` says why.
    """
    record = arch.spec(w.architecture)
    dtype = getattr(torch, w.compute_dtype)
    experts = 2 if "denoiser_2" in record else 1  # Wan 2.2 A14B: two experts of one shape, both held and trained
    w.text_tokens = w.text_tokens or record["text_tokens"]
    model = arch.build(w.architecture, depth=depth, dtype=dtype)
    blocks = [b for blocks in arch.block_lists(model) for b in blocks]
    out = {"params": experts * sum(p.numel() for p in model.parameters()), "blocks": experts * len(blocks)}
    out["buffer_bytes"] = experts * sum(b.numel() for b in model.buffers() if b.is_floating_point()) * _BYTES[w.dtype]
    out["block_classes"] = sorted({type(b).__name__ for b in blocks})
    out["block_params"] = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    if w.use_lora:
        from peft import LoraConfig

        from visalign.pipelines.registry import adapter_for

        targets = w.lora_targets or list(adapter_for(type(record["pipeline"], (), {})()).default_lora_targets)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=w.lora_rank, lora_alpha=w.lora_rank, target_modules=targets))
    trainable = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))  # gradients are counted statically
    out.update(trainable=sum(p.numel() for p in trainable), largest_trainable=max(p.numel() for p in trainable))
    out["trainable"] *= experts
    vae = arch.build(w.architecture, "vae", dtype=dtype)
    z = torch.empty(
        arch_inputs.latent_shape(w.architecture, w.height, w.width, w.num_frames), device="meta", dtype=dtype
    )
    out["vae_params"] = sum(p.numel() for p in vae.parameters())
    text, parts = w.text_encoder_params, record["text_encoders"]
    out["text_params"] = text if text is not None else sum(arch.parameter_count(w.architecture, p) for p in parts)
    out["latent_numel"] = z.numel()  # FLUX's packing is a permutation of the same numbers
    out["cond_numel"] = w.text_tokens * arch_inputs.text_width(w.architecture)
    denoiser = record["denoiser"]["class"]
    if denoiser in arch_inputs.UNMEASURABLE:  # counts only: no activations or FLOPs
        return {**out, **dict.fromkeys(_MEASURED), "unmeasured": f"{denoiser}: {arch_inputs.UNMEASURABLE[denoiser]}"}
    one, cfg_train = _denoiser_inputs(w, 1, dtype), max(1, w.train_cfg)
    batch = _denoiser_inputs(w, cfg_train, dtype)
    external = list(model.parameters()) + list(model.buffers()) + _tensors(one) + _tensors(batch)

    def train_pass():
        arch_inputs.denoise(model, batch).float().square().mean().backward()

    out["act_train"], out["flops_train"] = (v / cfg_train for v in _run(train_pass, external))  # per sample
    model.enable_gradient_checkpointing()
    out["act_train_ckpt"] = _run(train_pass, external, flops=False)[0] / cfg_train
    model.disable_gradient_checkpointing()
    with torch.no_grad():
        out["act_infer"], out["flops_forward"] = _run(lambda: arch_inputs.denoise(model, one), external)
        out["act_decode"], out["flops_decode"] = _run(lambda: vae.decode(z), [*vae.parameters(), *vae.buffers(), z])
    return out


# ------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Per-GPU bytes of each component and phase, for each strategy, plus FLOPs per iteration."""

    workload: Workload
    gpus: int
    measured: dict
    rows: dict = field(default_factory=dict)  # strategy → {row: bytes}
    flops: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    host_bytes: int = 0  # per process: the copies offload_copies keeps in host memory


def _check_fsdp(w: Workload, m: dict, gpus: int, accelerate_config: str | None) -> list[str]:
    if gpus < 2:
        raise ConfigError(
            f"FSDP shards the model over GPUs; with --gpus {gpus} there is nothing to shard. "
            "Use --strategy ddp, or --gpus 2 or more."
        )
    notes, fsdp = [], {}
    if accelerate_config:
        from visalign.config import load_yaml

        fsdp = load_yaml(accelerate_config).get("fsdp_config") or {}
    wrap = [c.strip() for c in str(fsdp.get("fsdp_transformer_layer_cls_to_wrap") or "").split(",") if c.strip()]
    if wrap and not set(wrap) & set(m["block_classes"]):
        raise ConfigError(
            f"{accelerate_config} wraps {', '.join(wrap)}, but {w.architecture} has no such blocks, so "
            f"FSDP would gather the whole model at once; set fsdp_transformer_layer_cls_to_wrap: "
            f"{','.join(m['block_classes'])}."
        )
    if str(fsdp.get("fsdp_version", 2)) == "1" and w.use_lora:
        raise ConfigError(
            "FSDP1 flattens each wrapped block into one FlatParameter, which needs one dtype and (unless "
            "use_orig_params) one requires_grad; LoRA mixes frozen bf16 weights with trainable fp32 "
            "adapters. Use fsdp_version: 2, or DDP (LoRA's trainable state is small)."
        )
    if w.reference and not w.use_lora:
        notes.append(
            "FSDP: the full-fine-tuning reference copy is made before accelerate wraps the model, so it "
            "is not sharded (every GPU holds it in fp32)."
        )
    return notes


def make_plan(w: Workload, gpus=1, strategies=("ddp", "fsdp"), depth=None, accelerate_config=None, measured=None):
    """The per-GPU memory of ``w`` under each strategy, and its FLOPs per iteration."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}.")
    m = measured or measure(w, depth)
    plan = Plan(w, gpus, m)
    unmeasured = m.get("unmeasured")
    if unmeasured:  # the rows that need no forward are exact; the others are left empty below
        m = {**m, **dict.fromkeys(_MEASURED, 0)}
        plan.notes.append(
            f"{w.architecture}: no activation, peak or FLOP figures, because {unmeasured}. Weights, gradients, "
            f"optimizer state, EMA/reference copies, FSDP blocks, the rollout trajectory and the optimizer step are exact."
        )
    b, cb, trainable = _BYTES[w.dtype], _BYTES[w.compute_dtype], m["trainable"]
    weights = (m["params"] * b if w.use_lora else 0) + trainable * 4 + m["buffer_bytes"]
    reference = m["params"] * 4 + m["buffer_bytes"] if w.reference and not w.use_lora else 0
    autocast = m["params"] * cb if not w.use_lora and cb < 4 else 0  # bf16 copies of the fp32 weights in a forward
    pixels = 3 * w.height * w.width * (w.num_frames or 1) * 4
    states = w.rollout_batch * (m["latent_numel"] * 4 * (2 * w.num_steps + 1) + pixels)  # every state and mean
    cond = w.rollout_batch * w.cfg * m["cond_numel"] * cb
    train_samples = w.micro_batch * w.trained_steps * w.train_cfg
    act = m["act_train_ckpt" if w.gradient_checkpointing else "act_train"] * train_samples
    ref_pass = m["act_infer"] * w.micro_batch * w.trained_steps * w.cfg if w.reference else 0
    chunk = min(w.rollout_chunk or w.rollout_batch, w.rollout_batch)  # samples denoised and decoded at once
    ema, lagged = trainable * 4 if w.ema else 0, w.lagged_copies * trainable * 4
    if w.offload_copies:
        plan.host_bytes = reference + ema + lagged
    for strategy in strategies:
        n, ddp = (gpus, False) if strategy == "fsdp" else (1, True)
        if not ddp:
            plan.notes += _check_fsdp(w, m, gpus, accelerate_config)
        # Offloaded, the copies live on the host and one at a time visits the GPU for its pass (the
        # EMA is updated on the host). The trainer refuses offload_copies under FSDP.
        offloaded = w.offload_copies and ddp
        brought_in = max(reference, trainable * 4 if lagged else 0) if offloaded else 0
        rows = {"denoiser weights": weights / n, "text encoders + VAE": (m["text_params"] + m["vae_params"]) * b}
        rows["gradients (fp32)"], rows["AdamW moments (2 x fp32)"] = trainable * 4 / n, trainable * 8 / n
        rows["EMA (fp32)"], rows["reference copy"] = (0, 0) if offloaded else (ema / n, reference)
        rows["lagged copies (fp32)"] = 0 if offloaded else lagged / n
        if ddp:  # DDP keeps a second copy of the gradients in its buckets
            rows["DDP buckets"] = trainable * 4 if gpus > 1 else 0
        else:  # the block being computed and the next one, prefetched, gathered in the compute dtype
            rows["FSDP gathered blocks"] = 2 * m["block_params"] * cb
        rows["static"] = sum(rows.values())
        rows["rollout: trajectory + prompts"] = states + cond
        # The rollout's peak: its last step (inference temporaries), the decode, or stacking the states (2x).
        # The first two are per sampling call, so rollout_batch_size bounds them; the states are all kept.
        infer = m["act_infer"] * chunk * w.cfg + (autocast if ddp else 0)
        rows["rollout: peak above static"] = states + cond + max(infer, m["act_decode"] * chunk, states)
        rows["rollout: peak above static"] += brought_in if w.algorithm == "nft" else 0  # it samples from θ_old
        rows["train: activations, no checkpointing"] = m["act_train"] * train_samples
        rows["train: activations, checkpointing"] = m["act_train_ckpt"] * train_samples
        rows["train: peak above static"] = states + cond + act + ref_pass + (autocast if ddp else 0) + brought_in
        rows["optimizer step: temporaries"] = trainable * 4 / n if w.device == "cuda" else 8 * m["largest_trainable"]
        phases = ("rollout: peak above static", "train: peak above static", "optimizer step: temporaries")
        rows["PEAK per GPU"] = rows["static"] + max(rows[p] for p in phases)
        if unmeasured:
            rows.update(dict.fromkeys(_NEEDS_MEASURED))
        plan.rows[strategy] = rows
    s, k = w.rollout_batch, w.trained_steps
    rollout = s * w.num_steps * w.cfg * m["flops_forward"] + s * m["flops_decode"]
    training = s * k * (w.train_cfg * m["flops_train"] + (w.cfg - w.train_cfg) * m["flops_forward"])
    training += s * k * w.cfg * m["flops_forward"] if w.reference else 0
    plan.flops = {"rollout": rollout, "training": training, "iteration": rollout + training}
    if unmeasured:
        plan.flops = dict.fromkeys(plan.flops)
    return plan


def format_plan(plan: Plan) -> str:
    """The plan as a printable table (GiB per GPU)."""
    w, m = plan.workload, plan.measured
    strategies = list(plan.rows)
    lora = f"LoRA r{w.lora_rank}" if w.use_lora else "full fine-tuning"
    size = f"{w.height}x{w.width}" + (f"x{w.num_frames}f" if w.num_frames else "")
    lines = [
        f"visalign plan: {w.architecture} ({w.algorithm}), {size}, {plan.gpus} GPU(s), weights {w.dtype}, "
        f"compute {w.compute_dtype}",
        f"  denoiser {m['params'] / 1e9:.3f}B parameters ({m['blocks']} blocks); trainable {m['trainable']:,} "
        f"({lora}); text encoders {m['text_params'] / 1e9:.2f}B; VAE {m['vae_params'] / 1e6:.1f}M",
        f"  per GPU: rollout {w.rollout_batch} samples"
        + (f" ({w.rollout_chunk} at a time)" if w.rollout_chunk and w.rollout_chunk < w.rollout_batch else "")
        + f" x {w.num_steps} steps (CFG x{w.cfg}); training micro-batch "
        f"{w.micro_batch} samples x {w.trained_steps} steps (x{w.train_cfg} with gradient) = "
        f"{w.micro_batch * w.trained_steps * w.train_cfg} forwards; gradient checkpointing "
        f"{'on' if w.gradient_checkpointing else 'off'}",
        "",
        f"{'GiB per GPU':42s}" + "".join(f"{s.upper() + ' x' + str(plan.gpus):>12s}" for s in strategies),
    ]
    for row in plan.rows[strategies[0]]:
        values = [plan.rows[s].get(row, "") for s in strategies]  # "": not a row of that strategy; None: unmeasured
        if row in ("static", "PEAK per GPU"):
            lines.append("-" * (42 + 12 * len(strategies)))
        cells = (
            f"{v / GiB:12.2f}" if isinstance(v, (int, float)) else f"{'n/a' if v is None else '':>12s}" for v in values
        )
        lines.append(f"{row:42s}" + "".join(cells))
    f = plan.flops
    lines.append("")
    if f["iteration"] is None:
        lines.append("FLOPs per iteration per GPU: not measured (see the note)")
    else:
        lines.append(
            f"FLOPs per iteration per GPU (FlopCounterMode on the real architecture): rollout "
            f"{f['rollout'] / 1e15:.2f} PFLOP, training {f['training'] / 1e15:.2f} PFLOP, total "
            f"{f['iteration'] / 1e15:.2f} PFLOP; all GPUs {f['iteration'] * plan.gpus / 1e15:.2f} PFLOP"
        )
    if plan.host_bytes:
        lines.append(
            f"host memory per process (offload_copies: reference, EMA and lagged copies, pinned): "
            f"{plan.host_bytes / GiB:.2f} GiB"
        )
    return "\n".join(lines + [f"note: {n}" for n in dict.fromkeys(plan.notes)])
