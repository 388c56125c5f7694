"""A GRPO loop with DanceGRPO's structure, on a visalign Policy: the "peers' loop" of the speed comparisons.

    from benchmarks.baselines.dancegrpo_loop import BaselineConfig, DanceGRPOLoop
    loop = DanceGRPOLoop(policy, reward, prompts, BaselineConfig(group_size=4, num_steps=10))
    metrics = loop.iteration(0)

Written here from the published structure of DanceGRPO (Xue et al., arXiv 2505.07818, and its
``train_grpo_*.py`` scripts) and REFERENCE §2, not from its code. What makes it that loop:

- **Rollout: one prompt, one sample per call.** Each call encodes its prompt, draws its noise and
  runs the whole denoising chain at batch 1 (CFG doubles it to 2), then decodes its own image.
- **Rewards per sample through a PNG round trip:** the image is quantised to uint8, written as a PNG,
  read back and scored alone.
- **Training: one transition per forward.** For each sample and each of its trained steps, one
  forward at batch 1 recomputes the log-prob, the clipped loss is formed and ``backward`` runs; the
  gradients accumulate and one optimizer step closes the iteration.

Everything else is shared with :class:`visalign.GRPOTrainer` at equal settings, so that the ratio of
their iteration times measures only the loop structure: the same model and LoRA (rank, targets), the
step math of :mod:`visalign.steps` (SDE steps, the last step deterministic), the same group-relative
advantages, PPO clip, number of samples, trained steps per sample and optimizer steps per iteration.
Flow families only (SD3, FLUX, Wan).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import torch

from visalign import steps as S
from visalign.losses.grpo import group_advantages


@dataclass
class BaselineConfig:
    num_steps: int = 10
    group_size: int = 4
    prompts_per_step: int = 2
    guidance_scale: float | None = None  # None: the family's default
    noise: str = "flow"
    eta: float = 0.7
    timestep_fraction: float = 0.6
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    learning_rate: float = 1e-4
    max_grad_norm: float | None = 1.0
    lora_rank: int = 8
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # "bf16": autocast the forwards, as accelerate does for the trainer
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    seed: int = 0


class DanceGRPOLoop:
    """DanceGRPO-structured GRPO (see the module docstring). ``reward(images, prompts) -> Tensor[B]``."""

    def __init__(self, policy, reward, prompts: list[str], config: BaselineConfig | None = None):
        if not policy.is_flow:
            raise ValueError(f"The baseline loop runs flow families; {policy.family} is a DDPM model.")
        self.policy, self.reward, self.prompts = policy, reward, list(prompts)
        self.config = cfg = config or BaselineConfig()
        self.geometry = policy.geometry(cfg.height, cfg.width, cfg.num_frames)
        for module in policy.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            policy.add_lora(rank=cfg.lora_rank)
        self.params = [p for p in policy.denoiser.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            policy.denoiser.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate)
        self.schedule = policy.schedule(cfg.num_steps, self.geometry)
        self.sigmas = self.schedule.sigmas.to(policy.device)
        self.cursor = 0

    def _autocast(self):
        device = self.policy.device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16")

    # ------------------------------------------------------------------ one transition
    def _transition(self, x, i, v):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if i == self.config.num_steps - 1:  # the last step is deterministic, as in visalign
            return S.ode_step(x.float(), v, sigma, sigma_next), None
        g = S.flow_diffusion_coefficient(self.config.noise, self.config.eta, sigma, self.sigmas[1])
        return S.flow_sde_mean_std(x, v, sigma, sigma_next, g)

    def _guidance(self):
        g = self.config.guidance_scale
        return self.policy.default_guidance_scale if g is None else g

    # ------------------------------------------------------------------ rollout: one prompt, one sample per call
    @torch.no_grad()
    def rollout_one(self, prompt: str, generator: torch.Generator) -> dict:
        policy = self.policy
        cond = policy.encode_prompt([prompt], guidance_scale=self._guidance(), geometry=self.geometry)
        x = policy.prepare_latents(1, self.geometry, generator)
        states, log_probs = [x], []
        for i in range(self.config.num_steps):
            with self._autocast():
                v = policy.predict(x, self.schedule.timesteps[i].to(x.device), cond)
            mean, std = self._transition(x, i, v)
            if std is None:
                x = mean
            else:
                x = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
                log_probs.append(S.gaussian_log_prob(x, mean, std))
            states.append(x)
        image = policy.decode(x, self.geometry)
        return {
            "prompt": prompt,
            "cond": cond,
            "states": torch.cat(states),
            "log_probs": torch.cat(log_probs),
            "image": image[0],
        }

    def png_reward(self, image: torch.Tensor, prompt: str) -> float:
        """Scores one sample after a PNG round trip (uint8 → PNG bytes → decoded → float)."""
        import numpy as np
        from PIL import Image

        from visalign.media import to_uint8

        frames = image if image.ndim == 4 else image[None]  # a video: every frame goes through PNG
        decoded = []
        for frame in to_uint8(frames):
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="PNG")
            buffer.seek(0)
            decoded.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255))
        pixels = torch.stack(decoded).permute(0, 3, 1, 2)
        pixels = pixels if image.ndim == 4 else pixels[0]
        return float(self.reward(pixels[None], [prompt])[0])

    # ------------------------------------------------------------------ one iteration
    def next_prompts(self) -> list[str]:
        out = [self.prompts[(self.cursor + i) % len(self.prompts)] for i in range(self.config.prompts_per_step)]
        self.cursor += self.config.prompts_per_step
        return out

    def iteration(self, step: int) -> dict:
        """Rollout, rewards, advantages, then one optimizer step over every trained transition."""
        cfg, policy = self.config, self.policy
        device = policy.device
        start = time.perf_counter()
        samples = []
        for p, prompt in enumerate(self.next_prompts()):
            for g in range(cfg.group_size):
                seed = (cfg.seed * 1_000_003 + step) * 10_007 + p * cfg.group_size + g
                samples.append(self.rollout_one(prompt, torch.Generator(device).manual_seed(seed)))
        sampled = time.perf_counter()
        rewards = torch.tensor([self.png_reward(s["image"], s["prompt"]) for s in samples])
        advantages, _ = group_advantages(rewards, cfg.group_size, "group", cfg.advantage_clip)
        scored = time.perf_counter()

        candidates = list(range(cfg.num_steps - 1))
        k = max(1, round(cfg.timestep_fraction * len(candidates)))
        chooser = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        normaliser, forwards, first_ratio = len(samples) * k, 0, 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for sample, advantage in zip(samples, advantages.tolist()):
            chosen = sorted(torch.randperm(len(candidates), generator=chooser)[:k].tolist())
            for j, i in enumerate(chosen):
                x, x_next = sample["states"][i : i + 1], sample["states"][i + 1 : i + 2]
                with self._autocast():
                    v = policy.predict(x, self.schedule.timesteps[i].to(device), sample["cond"])
                mean, std = self._transition(x, i, v)
                log_prob = S.gaussian_log_prob(x_next, mean, std)
                ratio = torch.exp(log_prob - sample["log_probs"][i])
                if j == 0:
                    first_ratio = max(first_ratio, abs(float(ratio.detach()) - 1))
                clipped = ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
                loss = torch.maximum(-advantage * ratio, -advantage * clipped).sum() / normaliser
                loss.backward()
                forwards += 1
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        end = time.perf_counter()
        return {
            "reward_mean": float(rewards.mean()),
            "time_sampling": sampled - start,
            "time_reward": scored - sampled,
            "time_training": end - scored,
            "time_step": end - start,
            "samples": len(samples),
            "trained_transitions": forwards,
            "optimizer_steps": 1,
            "first_step_ratio_error": first_ratio,
        }
