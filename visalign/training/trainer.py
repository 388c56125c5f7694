"""The one training loop every visalign algorithm runs on.

:class:`Trainer` owns what all algorithms share, once:

- accelerate setup (DDP / FSDP / DeepSpeed come from ``accelerate launch``; we never write our own
  distribution), mixed precision, per-rank seeds;
- LoRA (peft) or full fine-tuning, trainable parameters kept in fp32, gradient checkpointing,
  AdamW, gradient clipping, an LR schedule, EMA of the trainable weights;
- atomic checkpoints every N steps (keep the last K) and bit-exact resume;
- a tqdm bar on the main process, metrics to ``metrics.jsonl`` and accelerate trackers, sample
  images or videos saved with their rewards;
- exports: :meth:`save_lora` (diffusers format, ``pipe.load_lora_weights`` reads it) and
  :meth:`save_pretrained` (full weights).

An algorithm subclasses it and implements :meth:`train_step` (one iteration, returning metrics),
using :meth:`optimizer_step` and :meth:`reference` for the pieces it needs.

**Exact resume.** Every random draw of iteration ``s`` on rank ``r`` comes from generators seeded by
``(seed, r, s)`` (see :meth:`step_seed`), and the prompt order, optimizer, LR schedule, EMA and
counters are checkpointed, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from visalign.errors import ConfigError, RewardError
from visalign.pipelines import Policy, wrap
from visalign.training.accelerator import build_accelerator, flat_config
from visalign.training.checkpoint import load_latest_complete, save_checkpoint
from visalign.training.config import TrainConfig
from visalign.training.evaluations import Evaluations
from visalign.training.exports import Exports
from visalign.training.prompts import PromptSampler, PromptSource
from visalign.training.tracking import RunLogger


@dataclass
class TrainState:
    """Counters that are checkpointed with the weights."""

    step: int = 0
    bad_steps: int = 0
    optimizer_steps: int = 0  # taken so far (an iteration may take several, or none when skipped)

    def state_dict(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.bad_steps = int(state["step"]), int(state["bad_steps"])
        # checkpoints written before the counter existed: every iteration took its steps
        self.optimizer_steps = int(state.get("optimizer_steps", self.step * self.optimizer_steps_per_iteration))

    optimizer_steps_per_iteration: int = 1


class Trainer(Exports, Evaluations):
    """Base class of every trainer: the shared accelerate loop (see the module docstring).

    Args:
        policy: a :class:`~visalign.pipelines.Policy` or a diffusers pipeline (wrapped for you).
        reward: a visalign Reward or any callable ``(images, prompts, **conditioning) -> Tensor[B]``.
        prompts: a list of prompts, a list of dicts, a ``.txt``/``.csv``/``.jsonl`` path, or a
            :class:`~visalign.training.prompts.PromptSource`. Extra columns reach the reward.
        config: the algorithm's config (a :class:`~visalign.training.config.TrainConfig` subclass).
        accelerator: an existing ``accelerate.Accelerator``; one is built from the config otherwise.
        true_metric: a callable ``(images, prompts) -> Tensor[B]`` measuring what the reward stands
            for, evaluated every ``config.true_metric_every`` steps beside the reward
            (:meth:`evaluate_true_metric`, :meth:`set_true_metric`); None uses ``config.true_metric``
            (a built-in) if set.
    """

    config_class = TrainConfig

    def __init__(
        self, policy, reward=None, prompts=None, config: TrainConfig | None = None, accelerator=None, true_metric=None
    ):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}; got {type(self.config).__name__}."
            )
        self.accelerator = accelerator or self._build_accelerator()
        self.policy: Policy = wrap(policy)
        self.policy.to(self.accelerator.device)
        if self.config.attention_backend not in ("sdpa", "native"):  # the default leaves the policy's kernel alone
            from visalign.pipelines.attention import apply_attention_backend

            apply_attention_backend(self.policy, self.config.attention_backend)
        self.reward = reward
        self.prompt_source = PromptSource.from_any(prompts) if prompts is not None else None
        self.state = TrainState()
        self.state.optimizer_steps_per_iteration = self.optimizer_steps_per_iteration()
        self.callbacks = []
        from visalign.training.monitor import resolve_true_metric

        self.true_metric = resolve_true_metric(true_metric, self.config)
        self.true_history: list[tuple[int, float, float]] = []  # (step, reward, true metric) per evaluation
        self.check_eval_size()  # a bad eval_height/eval_width fails here, not at the first evaluation
        self._setup_model()
        self._setup_optimization()
        self._setup_data()
        self._setup_outputs()

    # ------------------------------------------------------------------ setup
    def _build_accelerator(self):
        return build_accelerator(self.config)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def needs_reference(self) -> bool:
        """Whether the algorithm compares against the frozen base model (e.g. a KL term)."""
        return False

    def lagged_copies(self) -> list[str]:
        """Names of the lagged copies of the trainable weights the algorithm keeps (its
        :class:`~visalign.training.lagged.LaggedWeights`: an old policy, an EMA anchor, a snapshot).

        Counted by the ``offload_copies`` memory check before they are made; the algorithm passes
        ``offload=config.offload_copies`` when it makes them.
        """
        return []

    def _check_offload(self, denoiser: torch.nn.Module) -> None:
        """Before any copy is made: ``offload_copies`` must be usable here, and the copies must fit."""
        from visalign.training.offload import check_trainer_copies

        check_trainer_copies(self, denoiser)

    def _setup_model(self) -> None:
        cfg, policy = self.config, self.policy
        for module in policy.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        self.reference_model = None
        if cfg.use_lora:
            # LoRA's A matrices are drawn from the global RNG: seed it so that every rank and every
            # rerun of the same config starts from the same adapter.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                policy.add_lora(
                    rank=cfg.lora_rank,
                    alpha=cfg.lora_alpha,
                    target_modules=cfg.lora_target_modules,
                    dropout=cfg.lora_dropout,
                )
        # What is trained: the denoiser, or one module holding every trained network (both Wan 2.2
        # experts); LoRA goes on each of policy.trainable_denoisers().
        denoiser = policy.training_module()
        if not cfg.use_lora:
            denoiser.requires_grad_(True)
        # Trainable weights live in fp32 even when the model runs in bf16/fp16.
        for p in denoiser.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if cfg.offload_copies:
            self._check_offload(denoiser)
        if not cfg.use_lora and self.needs_reference:
            # Full fine-tuning compares against a frozen copy, taken after the upcast so that it
            # computes exactly as the policy does at initialisation (KL, r̂ and margins are 0 there).
            if cfg.offload_copies:  # made on the host directly: the device never holds two models
                from visalign.training.offload import copy_placement, host_clone

                reference = host_clone(denoiser, pin=copy_placement(self.accelerator.device, True)[1])
            else:
                reference = copy.deepcopy(denoiser)
            self.reference_model = reference.requires_grad_(False).eval()
        if cfg.gradient_checkpointing:
            # On every trained network (both Wan 2.2 experts); a ConfigError names a family without it.
            policy.enable_gradient_checkpointing()
        self.trainable_parameters = [p for p in denoiser.parameters() if p.requires_grad]
        if not self.trainable_parameters:
            raise ConfigError("No trainable parameters: check lora_target_modules for this family.")
        if self.accelerator.num_processes > 1:
            policy.use_batched_cfg()  # DDP expects one forward per backward

    def optimizer_steps_per_iteration(self) -> int:
        """Optimizer steps taken by one :meth:`train_step` (sizes the LR schedule)."""
        return 1

    def _setup_optimization(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg = self.config
        optimizer = torch.optim.AdamW(
            self.trainable_parameters,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_steps * self.optimizer_steps_per_iteration(),
        )
        fsdp = self.accelerator.is_fsdp2
        if fsdp:
            from visalign.training import fsdp as fsdp_utils

            fsdp_utils.check_wrap_classes(self.accelerator.state.fsdp_plugin, self.policy.training_module())
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.policy.training_module(), optimizer, scheduler
        )
        # FSDP2 replaces each parameter by a sharded DTensor (accelerate re-points the optimizer at
        # them): clipping, EMA and lagged copies must use the prepared parameters, not the old ones.
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        if fsdp and self.reference_model is not None:
            self.reference_model = fsdp_utils.shard_frozen_copy(self.accelerator, self.reference_model)
        self.policy.set_runner(self.model)
        self.ema = None
        if cfg.ema_decay is not None:
            from visalign.training.offload import OffloadableEMA

            # diffusers' EMAModel, kept on the host with offload_copies, and put back beside the
            # weights (or on the host) when a checkpoint is loaded.
            self.ema = OffloadableEMA(self.trainable_parameters, decay=cfg.ema_decay, offload=cfg.offload_copies)
            if fsdp:  # its copies are shards: checkpoint whole tensors (accelerate saves from rank 0 only)
                self.accelerator.register_for_checkpointing(
                    fsdp_utils.GatheredCheckpoint(self.ema, "shadow_params", self.trainable_parameters)
                )
            else:
                self.accelerator.register_for_checkpointing(self.ema)
        self.accelerator.register_for_checkpointing(self.state)
        if cfg.use_lora:
            self.accelerator.register_save_state_pre_hook(self._keep_only_trainable)

    @staticmethod
    def _keep_only_trainable(models, weights, output_dir) -> None:
        # LoRA checkpoints hold the adapter, not a copy of the frozen base model.
        for model, state in zip(models, weights):
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in keep]:
                del state[key]

    def _setup_data(self) -> None:
        self.prompt_sampler = None
        if self.prompt_source is not None:
            self.prompt_sampler = PromptSampler(
                self.prompt_source,
                batch_size=self.config.prompts_per_step,
                seed=self.config.seed,
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
            )
            self.accelerator.register_for_checkpointing(self.prompt_sampler)

    def _setup_outputs(self) -> None:
        cfg = self.config
        if self.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            cfg.to_yaml(os.path.join(cfg.output_dir, "config.yaml"))
        if self.accelerator.log_with:
            self.accelerator.init_trackers(type(self).__name__, config=flat_config(cfg.to_dict()))
        self.logger = RunLogger(self.accelerator, cfg.output_dir, use_jsonl="jsonl" in cfg.trackers)

    # ------------------------------------------------------------------ helpers for algorithms
    def step_seed(self, step: int, stream: int = 0) -> int:
        """A seed that depends only on (config seed, rank, step, stream): the basis of exact resume."""
        ss = np.random.SeedSequence([self.config.seed, self.accelerator.process_index, step, stream])
        return int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))

    def generators(self, step: int, count: int, stream: int = 1) -> list[torch.Generator]:
        """``count`` independent per-sample generators for iteration ``step``."""
        device = self.accelerator.device
        return [torch.Generator(device).manual_seed(self.step_seed(step, stream * 100_003 + i)) for i in range(count)]

    def next_records(self) -> list[dict]:
        if self.prompt_sampler is None:
            raise ConfigError(f"{type(self).__name__} needs prompts; pass prompts=[...] or a prompt file.")
        return self.prompt_sampler.next_batch()

    def load_condition_images(self, records: list[dict], geometry=None) -> torch.Tensor | None:
        """Conditioning images (I2V first frames) from the ``image_column`` of the records, sized to
        ``geometry`` (a :class:`~visalign.pipelines.Geometry`; None: the training size).
        """
        if not self.policy.needs_image:
            return None
        from visalign.training.prompts import load_images

        if geometry is None:
            geometry = self.policy.geometry(self.config.height, self.config.width, self.config.num_frames)
        return load_images(
            records,
            self.config.image_column,
            base_dir=self.prompt_source.base_dir,
            size=(geometry.height, geometry.width),
        ).to(self.accelerator.device)

    def guidance_scale(self) -> float | None:
        """The CFG scale of sampling and training: 1 (no CFG) when ``cfg_in_training`` is off.

        Embedded guidance (FLUX.1-dev) is an input of the model, not CFG, so it keeps its value.
        """
        cfg = self.config
        if cfg.cfg_in_training or self.policy.embedded_guidance:
            return cfg.guidance_scale
        return 1.0

    def sampling_kwargs(self, step: int) -> dict:
        """The keywords of :func:`visalign.sample` for iteration ``step``: the config's sampling options
        (the SDE window of ``step``), the CFG rule of :meth:`guidance_scale` and the output size.
        """
        cfg = self.config
        return {
            **cfg.sample_kwargs(step, cfg.seed),
            "guidance_scale": self.guidance_scale(),
            "height": cfg.height,
            "width": cfg.width,
            "num_frames": cfg.num_frames,
        }

    def score(
        self, images: torch.Tensor, prompts: list[str], records: list[dict] | None = None, step: int | None = None
    ):
        """Scores with the records' extra columns as conditioning; returns a :class:`~visalign.rewards.RewardResult`.

        ``step`` (default: the current iteration) seeds the generator handed to rewards that draw at
        random (e.g. TSN frame sampling in SegmentalVideoReward), so that resumed runs, and
        rollouts scored ahead in another thread, score exactly as uninterrupted ones.
        """
        from visalign.rewards import call_reward

        step = self.state.step if step is None else step
        conditioning = {"generator": torch.Generator().manual_seed(self.step_seed(step, 4))}
        if records:
            for key in records[0]:
                if key != "prompt":
                    conditioning[key] = [r.get(key) for r in records]
        return call_reward(self.reward, images, prompts, **conditioning)

    def score_or_skip(self, images: torch.Tensor, prompts: list[str], records: list[dict] | None = None):
        """:meth:`score` under no_grad, turning a :class:`RewardError` on any rank into a skip on all.

        Returns:
            ``(result, reason)``: ``result`` (a :class:`~visalign.rewards.RewardResult` on this
            rank's device) is None, and ``reason`` says why, when this or another rank's reward
            returned something unusable; the caller then returns ``{"skipped": 1.0, "skip_reason": reason}``.
        """
        result, reason = None, ""
        try:
            with torch.no_grad():
                result = self.score(images, prompts, records)
        except RewardError as exc:
            reason = str(exc)
        return self.agree_on_skip(result, reason)

    def agree_on_skip(self, result, reason: str = ""):
        """``(result, "")`` when every rank has rewards, else ``(None, reason)`` on all ranks (a collective)."""
        bad = torch.tensor([0.0 if result is not None else 1.0], device=self.accelerator.device)
        if float(self.accelerator.gather(bad).sum()) > 0:
            return None, reason or "another rank's reward failed"
        return result.to(self.accelerator.device), ""

    @contextlib.contextmanager
    def reference(self):
        """Within this block the policy runs as the frozen base model (no gradient)."""
        with torch.no_grad():
            if self.config.use_lora:
                with self.policy.adapters_disabled():
                    yield
            else:
                if self.reference_model is None:
                    raise ConfigError(f"{type(self).__name__} has no reference model; it needs_reference=False.")
                self.policy.set_runner(self.reference_model)
                try:
                    if self.config.offload_copies:  # brought in for this pass, dropped after it
                        from visalign.training.offload import on_device

                        with on_device(self.reference_model, self.accelerator.device):
                            yield
                    else:
                        yield
                finally:
                    self.policy.set_runner(self.model)

    def optimizer_step(self) -> dict:
        """Clips, steps the optimizer and LR schedule, updates EMA, zeroes grads; returns metrics."""
        grad_norm = None
        if self.config.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable_parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.state.optimizer_steps += 1
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.trainable_parameters)
        metrics = {"lr": self.lr_scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    # ------------------------------------------------------------------ the loop
    def train_step(self, step: int) -> dict:
        """One iteration. Returns metrics; return ``{"skipped": 1.0}`` to count a bad step."""
        raise NotImplementedError

    def add_callback(self, fn) -> None:
        """``fn(trainer, step, metrics)`` runs after every iteration (e.g. early stopping, tests)."""
        self.callbacks.append(fn)

    def train(self) -> dict:
        """Runs until ``config.max_steps``, resuming first when ``config.resume`` says so."""
        cfg = self.config
        # Loads the newest checkpoint that loads (broken newer ones are skipped, with a warning).
        load_latest_complete(self.accelerator, cfg.resume, cfg.output_dir, strict=not cfg.use_lora)
        if self.is_main_process and self.state.step == 0:
            print(self.describe())
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_steps, initial=self.state.step, disable=not self.is_main_process, desc=type(self).__name__
        )
        metrics: dict = {}
        while self.state.step < cfg.max_steps:
            step = self.state.step
            self._seed_step(step)
            start = time.perf_counter()
            metrics = self.train_step(step)
            metrics["time_step"] = time.perf_counter() - start
            self.state.step += 1
            stop = self._track_bad_steps(metrics)
            if stop is None:
                metrics.update(self.evaluate_true_metric(self.state.step))
            if stop is not None or step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                self.logger.log(metrics, step=self.state.step)
            if stop is not None:
                raise stop
            if cfg.sample_every and self.state.step % cfg.sample_every == 0:
                self.save_samples(self.state.step)
            if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("reward_mean", "loss")})
            for fn in self.callbacks:
                fn(self, self.state.step, metrics)
        bar.close()
        self.accelerator.wait_for_everyone()
        # Flush the trackers but keep the process group: save_lora / save_pretrained run after
        # train() and synchronise the ranks (accelerator.end_training() would destroy the group).
        for tracker in self.accelerator.trackers:
            tracker.finish()
        return metrics

    def _seed_step(self, step: int) -> None:
        # Global RNGs (dropout, any stray torch.rand) are a function of the step too.
        seed = self.step_seed(step, 0)
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        import random

        random.seed(seed)

    def _track_bad_steps(self, metrics: dict) -> RewardError | None:
        """Counts consecutive skipped iterations; the error to stop with (after a checkpoint) when too many."""
        if not metrics.get("skipped"):
            self.state.bad_steps = 0
            return None
        self.state.bad_steps += 1
        if self.state.bad_steps < self.config.max_bad_steps:
            return None
        path = self.save_checkpoint()
        return RewardError(
            f"{self.state.bad_steps} iterations in a row were skipped: {metrics.get('skip_reason', 'see the log')}. "
            f"Stopped and saved a checkpoint at {path}; fix the cause and resume with resume='latest'."
        )

    def save_checkpoint(self) -> str:
        return save_checkpoint(self.accelerator, self.config.output_dir, self.state.step, self.config.keep_last)

    def describe(self) -> str:
        """The batch arithmetic and the config, printed at start (ddpo-pytorch style)."""
        n_train = sum(p.numel() for p in self.trainable_parameters)
        n_total = sum(p.numel() for d in self.policy.trainable_denoisers().values() for p in d.parameters())
        lines = [
            f"{type(self).__name__}: {self.policy!r}",
            f"  processes: {self.accelerator.num_processes}, device: {self.accelerator.device}, "
            f"mixed precision: {self.config.mixed_precision}",
            f"  trainable parameters: {n_train:,} of {n_total:,} ({'LoRA' if self.config.use_lora else 'full'})",
        ]
        lines += ["  " + line for line in self.batch_arithmetic()]
        if self.config.offload_copies:
            names = ["reference model"] * (self.reference_model is not None) + ["EMA"] * (self.ema is not None)
            names += self.lagged_copies()
            lines.append(f"  copies in host memory (offload_copies): {', '.join(names) or 'none'}")
        return "\n".join(lines)

    def batch_arithmetic(self) -> list[str]:
        return []
