"""Direct reward fine-tuning: DRaFT, DRaFT-K, DRaFT-LV and ReFL (docs/math.md §5).

DRaFT is Clark et al., arXiv 2309.17400; ReFL is from ImageReward (Xu et al., arXiv 2304.05977);
the random truncation is AlignProp's (Prabhudesai et al., arXiv 2310.03739).

The sampler runs with the autograd graph kept, the output is decoded and scored by a
*differentiable* reward, and loss = −mean(reward) is backpropagated into the trainable weights.
Each step is :func:`visalign.sampling.denoise_step`, the same step the samplers use (no step math
here). Variants (``variant=``):

- ``"draft"``: gradients through the last K steps (``truncation=K``; None is the full chain).
  The window is one contiguous block drawn once per rollout: the last K steps, or with
  ``truncation_mode="random"`` the last K' steps with K' uniform in [1, K] (AlignProp), drawn
  from the iteration's seed — never re-drawn inside the step loop. Steps before the window run
  under ``torch.no_grad()``.
- ``"lv"`` (DRaFT-LV): sample the whole chain without gradient, re-noise the final x0 ``lv_samples``
  times to the last step's noise level, take that last step with gradient on each copy (one
  batched forward) and average the rewards.
- ``"refl"``: run without gradient to a step drawn uniformly from ``refl_steps`` (inclusive), take
  one step with gradient and score its clean prediction x̂0.

**Memory.** ``checkpoint_steps=True`` wraps every step with gradient (and the VAE decode) in
``torch.utils.checkpoint`` (``use_reentrant=False``), so the chain stores only the states between
steps; the per-step noise is drawn outside the checkpointed function so the recomputation sees
the same noise. It composes with the trainer's ``gradient_checkpointing`` (inside the denoiser) and
LoRA.

**DDP.** One backward follows K forwards of the prepared model (the trainer batches CFG under DDP),
each using every parameter; autograd sums a parameter's contributions before DDP's gradient hook
fires, so each gradient is reduced once. With ``checkpoint_steps`` the recomputation runs the
model's forward again inside backward. Both were checked under a 2-process gloo launch (torch 2.13,
``accelerate launch --multi_gpu --num_processes 2``, LoRA and full fine-tuning): the ranks end with
identical weights, and with the same weights as without checkpointing; no ``static_graph`` or
``find_unused_parameters`` was needed. Micro-batches accumulate under ``no_sync`` (one all-reduce
per optimizer step). Single-process runs need nothing.

Example::

    reward = va.rewards.Aesthetic(...)                  # differentiable
    cfg = va.DRaFTConfig(variant="draft", truncation=1, num_steps=20, checkpoint_steps=True)
    va.DRaFTTrainer(policy, reward, ["a cat", "a dog"], cfg).train()
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from visalign.errors import ConfigError, NotDifferentiableError, RewardError
from visalign.losses.draft import draft_loss, grad_window
from visalign.sampling import denoise_step, prepare_sampling
from visalign.sampling.options import sampling_field
from visalign.training.config import TrainConfig, config_field, override_default
from visalign.training.trainer import Trainer


# ---------------------------------------------------------------------------- config
@dataclass
class DRaFTConfig(TrainConfig):
    """DRaFT options (docs/math.md §5), on top of :class:`~visalign.training.config.TrainConfig`.

    ``prompts_per_step`` samples (one per prompt) per rank per iteration; ``sampler`` is ode (DDIM
    η=0 on SD/SDXL, as DRaFT) or sde (noise drawn per step from the iteration's seed).
    """

    renamed_fields = {"samples_per_step": "prompts_per_step"}

    sampler: Literal["ode", "sde", "cps", "ddim"] = sampling_field("sampler", "ode")
    prompts_per_step: int = override_default(TrainConfig, "prompts_per_step", 4)
    variant: Literal["draft", "lv", "refl"] = config_field(
        "draft", "draft (last K steps), lv (DRaFT-LV re-noisings) or refl (one random late step)."
    )
    truncation: int | None = config_field(
        None, "K: backprop through the last K steps (DRaFT-K; 1 is DRaFT-1); None: the full chain."
    )
    truncation_mode: Literal["fixed", "random"] = config_field(
        "fixed", "fixed: exactly K; random: K' uniform in [1, K], once per rollout (AlignProp)."
    )
    lv_samples: int = config_field(2, "DRaFT-LV: re-noisings n of the final sample (the paper: 2).")
    refl_steps: tuple[int, int] | None = config_field(
        None, "ReFL: the step with gradient is uniform in [lo, hi] (inclusive); None: the last quarter."
    )
    checkpoint_steps: bool = config_field(
        True, "Gradient-checkpoint each step with gradient and the VAE decode (use_reentrant=False)."
    )

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.sampler in ("ode", "sde"), "sampler", "'ode' or 'sde'", "DRaFT backpropagates through ODE or SDE steps.")
        c(
            self.truncation is None or 1 <= self.truncation <= self.num_steps,
            "truncation",
            f"in [1, num_steps={self.num_steps}] or None",
            "K counts the last steps with gradient; None is the full chain.",
        )
        c(
            self.truncation is None or self.variant == "draft",
            "truncation",
            "None unless variant='draft'",
            "DRaFT-LV and ReFL take exactly one step with gradient.",
        )
        c(self.refl_steps is None or self.variant == "refl", "refl_steps", "None unless variant='refl'")
        c(self.lv_samples >= 1, "lv_samples", ">= 1")
        if self.refl_steps is not None:
            lo, hi = self.refl_steps
            c(
                0 <= lo <= hi < self.num_steps,
                "refl_steps",
                f"(lo, hi) with 0 <= lo <= hi < num_steps={self.num_steps}",
                "ImageReward uses steps 30–39 of 40.",
            )

    def refl_range(self) -> tuple[int, int]:
        """The ReFL step range: ``refl_steps``, or the last quarter of the chain (30–39 of 40)."""
        if self.refl_steps is not None:
            return self.refl_steps
        return (min(self.num_steps - 1, (3 * self.num_steps) // 4), self.num_steps - 1)


# ---------------------------------------------------------------------------- trainer
class DRaFTTrainer(Trainer):
    """DRaFT on the shared training loop. See the module docstring and :class:`DRaFTConfig`.

    Raises:
        NotDifferentiableError: the reward is not differentiable (``reward.differentiable`` is False).
    """

    config_class = DRaFTConfig

    def __init__(
        self, policy, reward=None, prompts=None, config: DRaFTConfig | None = None, accelerator=None, **kwargs
    ):
        from visalign.rewards import is_differentiable, reward_name

        if reward is None:
            raise ConfigError("DRaFTTrainer needs a differentiable reward: pass a visalign Reward or a callable.")
        if not is_differentiable(reward):
            raise NotDifferentiableError(
                f"DRaFT backpropagates the reward into the model, but the reward '{reward_name(reward)}' is not "
                f"differentiable (its .differentiable is False). Use a differentiable reward (CLIPScore, PickScore, "
                f"Aesthetic, HPSv2, a YesTokenReward on torch pixels), or train with GRPO/PRDP, which need only scores."
            )
        super().__init__(policy, reward, prompts, config, accelerator, **kwargs)

    def batch_arithmetic(self) -> list[str]:
        cfg = self.config
        if cfg.variant == "draft":
            k = (
                "all"
                if cfg.truncation is None
                else (f"last {cfg.truncation}" if cfg.truncation_mode == "fixed" else f"last K'~U[1,{cfg.truncation}]")
            )
            grad = f"gradient through {k} of {cfg.num_steps} steps"
        elif cfg.variant == "lv":
            grad = f"DRaFT-LV: {cfg.lv_samples} re-noisings of the last of {cfg.num_steps} steps"
        else:
            grad = f"ReFL: one step with gradient in {list(cfg.refl_range())} of {cfg.num_steps}"
        return [
            f"{cfg.prompts_per_step} samples per rank per iteration, sampler {cfg.sampler}; {grad}",
            f"per-step checkpointing {'on' if cfg.checkpoint_steps else 'off'}",
        ]

    # ------------------------------------------------------------------ the chain
    def _step(self, spec, schedule, i, x, conditioning, noise, want_x0: bool = False):
        """One step with gradient (checkpointed when configured); returns next state (and x̂0)."""

        def run(latents):
            out = denoise_step(
                self.policy,
                spec,
                schedule,
                i,
                latents,
                conditioning,
                noise=noise,
                detach_uncond=self.config.detach_uncond,
            )
            return (out.next_latents, out.x0) if want_x0 else out.next_latents

        if self.config.checkpoint_steps:
            return checkpoint(run, x, use_reentrant=False)
        return run(x)

    def _decode(self, latents, geometry):
        if self.config.checkpoint_steps:
            return checkpoint(self.policy.decode, latents, geometry, use_reentrant=False)
        return self.policy.decode(latents, geometry)

    def generate(self, step: int, records: list[dict], offset: int = 0):
        """Samples ``records`` with the configured gradient window; returns differentiable pixels.

        Returns:
            ``(images, prompts, records, info)``: ``images`` carry the graph of the steps with
            gradient; for DRaFT-LV there are ``lv_samples`` rows per record (prompts/records expanded);
            ``info`` holds the window drawn.
        """
        cfg, policy = self.config, self.policy
        gens = self.generators(step, offset + len(records))[offset:]
        setup = prepare_sampling(
            policy,
            [r["prompt"] for r in records],
            **self.sampling_kwargs(step),
            generator=gens,
            images=self.load_condition_images(records),
        )
        prompts, spec, geometry, schedule = setup.prompts, setup.spec, setup.geometry, setup.schedule
        conditioning, x = setup.conditioning, setup.latents
        window_gen = torch.Generator().manual_seed(self.step_seed(step, 5))
        if cfg.variant == "draft":
            start, stop = grad_window(cfg.num_steps, cfg.truncation, cfg.truncation_mode, window_gen), cfg.num_steps
        elif cfg.variant == "lv":
            start, stop = cfg.num_steps, cfg.num_steps
        else:
            lo, hi = cfg.refl_range()
            start = int(torch.randint(lo, hi + 1, (1,), generator=window_gen))
            stop = start + 1
        info = {"grad_start": float(start)}
        x0_pred = None
        from diffusers.utils.torch_utils import randn_tensor

        with self.accelerator.autocast():
            for i in range(stop):
                noise = None
                if spec.kind_at(i) != "ode":  # drawn here, outside any checkpoint, so a recompute sees it
                    noise = randn_tensor(tuple(x.shape), generator=gens, device=x.device, dtype=torch.float32)
                if i < start:
                    with torch.no_grad():
                        x = denoise_step(policy, spec, schedule, i, x, conditioning, noise=noise).next_latents
                elif cfg.variant == "refl":
                    x, x0_pred = self._step(spec, schedule, i, x, conditioning, noise, want_x0=True)
                else:
                    x = self._step(spec, schedule, i, x, conditioning, noise)
            if cfg.variant == "refl":
                x = x0_pred
            elif cfg.variant == "lv":
                x, conditioning, prompts, records = self._renoise(
                    step, spec, schedule, x.detach(), conditioning, prompts, records, offset
                )
            pixels = self._decode(x, geometry)
        return pixels, prompts, records, info

    def _renoise(self, step, spec, schedule, x0, conditioning, prompts, records, offset):
        """DRaFT-LV: n copies of x0 noised to the last step's level, then that step with gradient."""
        n, last = self.config.lv_samples, self.config.num_steps - 1
        gens = self.generators(step, offset + len(records), stream=4)[offset:]
        copies = x0.repeat_interleave(n, dim=0)
        noise = torch.cat([torch.randn((n, *x0.shape[1:]), generator=g, device=x0.device) for g in gens])
        x = self.policy.add_noise(copies, noise, schedule.noise_level(last))
        step_noise = None
        if spec.kind_at(last) != "ode":
            step_noise = torch.cat([torch.randn((n, *x0.shape[1:]), generator=g, device=x0.device) for g in gens])
        conditioning = conditioning.repeat_interleave(n)
        x = self._step(spec, schedule, last, x, conditioning, step_noise)
        return x, conditioning, [p for p in prompts for _ in range(n)], [r for r in records for _ in range(n)]

    # ------------------------------------------------------------------ the step
    def rollout_loss(self, step: int, records: list[dict], offset: int = 0, total: int | None = None):
        """Generates ``records`` with gradient, scores them and returns ``(loss, rewards, info)``.

        ``loss`` is −Σ r / ``total`` (−mean(r) by default); for DRaFT-LV the n re-noisings of a sample
        are averaged first. The caller runs backward (tests use this to inspect gradients).
        """
        from visalign.rewards import reward_name

        pixels, prompts, recs, info = self.generate(step, records, offset)
        rewards = self.score(pixels, prompts, recs).total
        if not rewards.requires_grad:
            raise NotDifferentiableError(
                f"The reward '{reward_name(self.reward)}' returned scores with no gradient (it detaches, or goes "
                f"through PIL/numpy), so DRaFT cannot train on it. Make it differentiable, or use GRPO/PRDP."
            )
        if self.config.variant == "lv":
            rewards = rewards.view(len(records), self.config.lv_samples).mean(1)
        return draft_loss(rewards, total or len(records)), rewards, info

    def train_step(self, step: int) -> dict:
        cfg, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        records = self.next_records()
        size = cfg.micro_batch_size or len(records)
        starts = list(range(0, len(records), size))
        rewards, info, loss_sum = [], {}, 0.0
        for j, first in enumerate(starts):
            loss, reason = None, ""
            try:
                loss, r, info = self.rollout_loss(step, records[first : first + size], offset=first, total=len(records))
            except RewardError as exc:  # a wrong shape or NaN: skip the step on every rank, before any backward
                reason = str(exc)
            bad = torch.tensor([0.0 if loss is not None else 1.0], device=acc.device)
            if float(acc.gather(bad).sum()) > 0:
                self.optimizer.zero_grad(set_to_none=True)
                return {"skipped": 1.0, "skip_reason": reason or "another rank's reward failed"}
            sync = contextlib.nullcontext() if j == len(starts) - 1 else acc.no_sync(self.model)
            with sync:
                acc.backward(loss)
            rewards.append(r.detach())
            loss_sum += float(loss.detach())
        metrics = self.optimizer_step()
        gathered = acc.gather(torch.cat(rewards))
        metrics.update(
            {
                "loss": loss_sum,
                "reward_mean": float(gathered.mean()),
                "reward_std": float(gathered.std(unbiased=False)),
                **info,
                "time_training": time.perf_counter() - t0,
            }
        )
        return metrics


__all__ = ["DRaFTConfig", "DRaFTTrainer", "draft_loss", "grad_window"]
