"""The options of the shared training loop (:class:`TrainConfig`) and of online trainers (:class:`RolloutConfig`).

The config machinery (YAML, overrides, coercion, validation, help) is :mod:`visalign.config`; the
sampling options come from :class:`~visalign.sampling.options.SamplingOptions`. Layering::

    LoopOptions                    the loop: run, optimizer, precision, LoRA/EMA, checkpoints, logging, size
    TrainConfig                    LoopOptions + SamplingOptions: DRaFT, offline DPO
    RolloutConfig                  TrainConfig + groups per prompt, updates per rollout: GRPO, PRDP, online DPO
    GRPOConfig, PRDPConfig, ...    + each algorithm's own keys

Every field has one sentence of help (``describe(with_help=True)``, ``field_help``) and
``validate()`` rejects out-of-range values with a hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visalign.config import ConfigBase, config_field, load_yaml, override_default, parse_overrides
from visalign.sampling.options import SamplingOptions, sampling_field
from visalign.training.async_scoring import AsyncRolloutOptions

__all__ = [
    "AdvantageOptions",
    "ConfigBase",
    "LoopOptions",
    "RolloutConfig",
    "TRACKERS",
    "TrainConfig",
    "config_field",
    "load_yaml",
    "override_default",
    "parse_overrides",
    "sampling_field",
]

TRACKERS = ("jsonl", "tensorboard", "wandb")


@dataclass
class LoopOptions(ConfigBase):
    """The shared training loop's own options (:class:`TrainConfig` adds the sampling options)."""

    # run
    output_dir: str = config_field("runs/train", "Run folder for checkpoints, logs, samples and the config dump.")
    seed: int = config_field(
        0, "Seed of every random stream (data order, noise, dropout); each rank derives its own from it."
    )
    max_steps: int = config_field(
        100, "Training iterations; for GRPO one iteration is one rollout plus its optimizer updates."
    )
    # optimizer
    learning_rate: float = config_field(1e-4, "Peak AdamW learning rate.")
    adam_beta1: float = config_field(0.9, "AdamW beta1, the decay of the gradient's running mean.")
    adam_beta2: float = config_field(0.999, "AdamW beta2, the decay of the squared gradient's running mean.")
    adam_weight_decay: float = config_field(1e-4, "AdamW decoupled weight decay.")
    adam_epsilon: float = config_field(1e-8, "AdamW epsilon added to the denominator for numerical stability.")
    max_grad_norm: float | None = config_field(
        1.0, "Clip the gradient's global norm to this value; None disables clipping."
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = config_field(
        "constant", "Learning-rate schedule over max_steps: constant, constant_with_warmup, linear or cosine."
    )
    lr_warmup_steps: int = config_field(
        0, "Steps of linear warmup from 0 to learning_rate (needs a scheduler other than 'constant')."
    )
    # precision and memory
    mixed_precision: Literal["no", "fp16", "bf16"] = config_field(
        "no", "Autocast dtype of the forward pass: no (fp32), fp16 (trainable weights kept in fp32) or bf16."
    )
    gradient_checkpointing: bool = config_field(
        False, "Recompute the denoiser's activations in backward to save memory."
    )
    attention_backend: Literal["sdpa", "native", "xformers", "flash", "sage"] = config_field(
        "sdpa",
        "Attention kernel of the denoiser, through diffusers' dispatcher: sdpa (PyTorch; native is the same), "
        "xformers, flash (flash-attn 2) or sage (SageAttention); the last three need their package (extras).",
    )
    # LoRA and EMA
    use_lora: bool = config_field(True, "Train LoRA adapters on the denoiser; false fine-tunes all of its weights.")
    lora_rank: int = config_field(8, "Rank of the LoRA update matrices.")
    lora_alpha: float | None = config_field(
        None, "LoRA scaling numerator (the update is scaled by alpha/rank); None uses the rank, i.e. scale 1."
    )
    lora_target_modules: list[str] | None = config_field(
        None, "Module names that get LoRA adapters; None uses the model family's defaults."
    )
    lora_dropout: float = config_field(0.0, "Dropout on the LoRA input during training.")
    ema_decay: float | None = config_field(
        None, "Decay of an EMA of the trainable weights, in (0, 1); None disables EMA."
    )
    offload_copies: bool = config_field(
        False,
        "Keep the full-fine-tuning reference model and the EMA, old-policy and snapshot copies of the trainable "
        "weights (LoRA's adapter copies too) in CPU memory, pinned on CUDA, and bring each to the device only for "
        "the passes that use it (one host-to-device copy per pass, in exchange for each copy's GPU memory).",
    )
    # checkpoints
    checkpoint_every: int = config_field(0, "Write a checkpoint every N steps; 0 disables periodic checkpoints.")
    keep_last: int = config_field(2, "How many of the newest checkpoints to keep; older ones are deleted.")
    resume: str | None = config_field(
        None, "Resume from 'latest' (the newest checkpoint in output_dir) or a checkpoint path; None starts fresh."
    )
    # logging and samples
    log_every: int = config_field(1, "Log metrics every N steps.")
    trackers: list[str] = config_field(
        ["jsonl"], "Metric sinks: any of jsonl (metrics.jsonl in output_dir), tensorboard, wandb."
    )
    sample_every: int = config_field(
        0, "Save sample images or videos with their prompts and rewards every N steps; 0 disables."
    )
    sample_prompts: list[str] | None = config_field(
        None, "Prompts for the saved samples; None takes the first few prompts of the training source."
    )
    # reward-hacking monitor (visalign.training.monitor)
    true_metric: Literal["toy_evaluator"] | None = config_field(
        None,
        "A built-in true metric to watch beside the reward (toy_evaluator: the toy world's exact evaluator, "
        "1 for a sample with every attribute right); the trainer's true_metric= keyword takes any callable.",
    )
    true_metric_every: int = config_field(
        0,
        "Every N steps (and at the last), sample fixed prompts with the ODE and log the true metric beside the "
        "reward (true/<name>, true/reward); 0 disables.",
    )
    true_metric_prompts: list[str] | None = config_field(
        None,
        "Prompts the true metric is evaluated on; None takes true_metric_num_prompts evenly spaced training prompts.",
    )
    true_metric_num_prompts: int = config_field(
        16, "How many training prompts the true metric is evaluated on when true_metric_prompts is None."
    )
    hacking_window: int = config_field(
        3,
        "Evaluations over which a rising reward with a falling true metric raises a RewardHackingWarning "
        "(logged as hacking_suspected).",
    )
    max_bad_steps: int = config_field(
        5,
        "Consecutive skipped steps (rewards of the wrong shape, or NaN) after which training stops "
        "with an error and a checkpoint.",
    )
    # data per iteration
    prompts_per_step: int = config_field(
        2, "Records of the prompt source drawn per rank per iteration: prompts (pairs for offline DPO)."
    )
    micro_batch_size: int | None = config_field(
        None, "Samples (or pairs) per forward/backward, accumulated into one optimizer step; None: all at once."
    )
    rollout_batch_size: int | None = config_field(
        None,
        "Samples per sampling call without gradient (online rollouts, evaluations, saved samples): bounds its "
        "memory, draws the same noise; None: all at once (evaluations then use micro_batch_size).",
    )
    image_column: str = config_field(
        "image", "Prompt-source column holding the conditioning images (image-to-video first frames)."
    )
    cfg_in_training: bool = config_field(
        True,
        "Sample and train with CFG; False runs both without the unconditional branch (embedded "
        "guidance, as FLUX.1-dev's, is kept).",
    )
    detach_uncond: bool = config_field(
        False,
        "When training through CFG: no gradient through the unconditional branch (Flow-GRPO); "
        "False keeps it (DanceGRPO).",
    )
    # generation size
    height: int | None = config_field(None, "Generated height in pixels; None uses the model family's default.")
    width: int | None = config_field(None, "Generated width in pixels; None uses the model family's default.")
    num_frames: int | None = config_field(
        None, "Frames per generated video; None uses the model family's default (ignored for images)."
    )
    eval_height: int | None = config_field(
        None, "Height of the evaluation samples (true metric, saved samples); None uses the training height."
    )
    eval_width: int | None = config_field(
        None, "Width of the evaluation samples (true metric, saved samples); None uses the training width."
    )
    eval_num_frames: int | None = config_field(
        None, "Frames of the evaluation videos (true metric, saved samples); None uses the training num_frames."
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.seed >= 0, "seed", ">= 0")
        c(self.max_steps >= 1, "max_steps", ">= 1")
        c(self.learning_rate > 0, "learning_rate", "> 0", "Typical LoRA values are 1e-5 to 3e-4.")
        c(0 <= self.adam_beta1 < 1, "adam_beta1", "in [0, 1)")
        c(0 <= self.adam_beta2 < 1, "adam_beta2", "in [0, 1)")
        c(self.adam_weight_decay >= 0, "adam_weight_decay", ">= 0")
        c(self.adam_epsilon > 0, "adam_epsilon", "> 0")
        c(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            "> 0 or None",
            "Use max_grad_norm=none to disable clipping.",
        )
        c(self.lr_warmup_steps >= 0, "lr_warmup_steps", ">= 0")
        c(
            self.lr_warmup_steps == 0 or self.lr_scheduler != "constant",
            "lr_warmup_steps",
            "0 with lr_scheduler='constant'",
            "Set lr_scheduler=constant_with_warmup (or linear/cosine) to warm up.",
        )
        c(self.lora_rank >= 1, "lora_rank", ">= 1")
        c(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "> 0 or None", "None uses the rank.")
        c(
            self.lora_target_modules is None or len(self.lora_target_modules) > 0,
            "lora_target_modules",
            "a non-empty list or None",
            "Use lora_target_modules=none for the family's defaults.",
        )
        c(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        c(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "ema_decay",
            "in (0, 1) or None",
            "Typical values are 0.99 to 0.9999; ema_decay=none disables EMA.",
        )
        c(self.checkpoint_every >= 0, "checkpoint_every", ">= 0", "0 disables periodic checkpoints.")
        c(self.keep_last >= 1, "keep_last", ">= 1")
        c(self.log_every >= 1, "log_every", ">= 1")
        bad = [t for t in self.trackers if t not in TRACKERS]
        c(not bad, "trackers", f"a list of {', '.join(TRACKERS)}", f"Unknown: {', '.join(map(repr, bad))}.")
        c(len(set(self.trackers)) == len(self.trackers), "trackers", "free of duplicates")
        c(self.sample_every >= 0, "sample_every", ">= 0", "0 disables samples.")
        c(self.sample_prompts is None or len(self.sample_prompts) > 0, "sample_prompts", "a non-empty list or None")
        c(self.max_bad_steps >= 1, "max_bad_steps", ">= 1")
        c(self.true_metric_every >= 0, "true_metric_every", ">= 0", "0 disables the true metric.")
        c(
            self.true_metric_prompts is None or len(self.true_metric_prompts) > 0,
            "true_metric_prompts",
            "a non-empty list or None",
        )
        c(self.true_metric_num_prompts >= 1, "true_metric_num_prompts", ">= 1")
        c(self.hacking_window >= 2, "hacking_window", ">= 2", "A trend needs at least two evaluations.")
        c(self.prompts_per_step >= 1, "prompts_per_step", ">= 1")
        c(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", ">= 1 or None")
        c(self.rollout_batch_size is None or self.rollout_batch_size >= 1, "rollout_batch_size", ">= 1 or None")
        for key in ("height", "width", "num_frames"):
            value = getattr(self, key)
            c(value is None or value >= 1, key, ">= 1 or None", "None uses the family default.")
        for key in ("eval_height", "eval_width", "eval_num_frames"):  # the family's multiples: Trainer.eval_geometry
            value = getattr(self, key)
            c(value is None or value >= 1, key, ">= 1 or None", "None uses the training size.")


@dataclass
class TrainConfig(SamplingOptions, LoopOptions):
    """Options of the shared training loop and of the sampling it does; every algorithm's config extends it.

    The sampling options are inherited flat from :class:`~visalign.sampling.options.SamplingOptions`
    (``TrainConfig(num_steps=10)``); the trainer samples with them (the saved samples use the ODE).
    """


@dataclass
class AdvantageOptions(ConfigBase):
    """How rewards become group-relative advantages (docs/math.md §2): GRPO, DiffusionNFT, AWM."""

    advantage_std: Literal["group", "global"] = config_field(
        "group", "Normalise by each group's std or the whole gathered batch's (Flow-GRPO's global_std)."
    )
    advantage_clip: float | None = config_field(5.0, "Clip advantages to ±this (None disables).")
    advantage_eps: float = config_field(
        1e-4,
        "Floor added to the std that advantages divide by (Flow-GRPO's 1e-4): a group whose rewards differ "
        "only by jitter then gets small advantages instead of full-strength ±1.",
    )
    multi_reward: Literal["weighted", "per_reward"] = config_field(
        "weighted", "Combine rewards before normalising, or normalise each then weight (MixGRPO)."
    )

    def validate(self) -> None:
        super().validate()
        self._check(self.advantage_clip is None or self.advantage_clip > 0, "advantage_clip", "> 0 or None")
        self._check(self.advantage_eps >= 0, "advantage_eps", ">= 0", "Flow-GRPO uses 1e-4.")


@dataclass
class RolloutConfig(AsyncRolloutOptions, TrainConfig):
    """Options of online trainers: the loop's, the sampling options, and groups of samples per prompt.

    One iteration samples ``group_size`` samples for each of ``prompts_per_step`` prompts per rank
    (the rollout), scores them, and takes ``updates_per_rollout`` optimizer steps on it.
    """

    group_size: int = config_field(4, "Samples per prompt (G); samples are compared within their group.")
    updates_per_rollout: int = config_field(
        1,
        "Optimizer steps taken on each rollout (how a step uses the rollout is the algorithm's: GRPO "
        "splits it into minibatches, PRDP and DPO reuse all of it).",
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.group_size >= 1, "group_size", ">= 1")
        c(self.updates_per_rollout >= 1, "updates_per_rollout", ">= 1")
