"""What the forward-process trainers (DiffusionNFT §8, AWM §9) share on top of the rollout stage.

Both keep only each rollout's clean sample x0 and its reward, and train by flow matching on freshly
noised copies x_σ = (1−σ)·x0 + σ·ε, with σ taken from the rollout's own σ table. This base class
holds the pieces they have in common:

- a check that the policy is a rectified-flow model (the x0 = x_σ − σ·v algebra needs it);
- :meth:`advantages`: group-relative advantages from the gathered rewards, and the rule for a
  reward that is constant within every group (nothing to learn): a warning, a skipped iteration,
  and after ``max_bad_steps`` such iterations in a row the loop's error;
- :meth:`training_conditioning`: the prompts encoded without CFG (training is cond-only; a model
  with embedded guidance keeps its guidance input);
- :meth:`training_noise`: ε for (sample, slot) from its own step-seeded generator, so every pass of
  one (sample, σ) sees the same x_σ and a resumed run draws exactly the same noise.
"""

from __future__ import annotations

import warnings

import torch

from visalign.errors import ConfigError
from visalign.training.online import OnlineTrainer

__all__ = ["CONSTANT_REWARD", "ForwardProcessTrainer"]

CONSTANT_REWARD = "the reward is constant within every group; nothing to learn: check the reward or raise group_size"
# Streams of step_seed used here (the rollout uses 1·100_003 + i, the reward 4).
NOISE_STREAM = 1_000_000_000


class ForwardProcessTrainer(OnlineTrainer):
    """Base of :class:`~visalign.algorithms.nft.NFTTrainer` and :class:`~visalign.algorithms.awm.AWMTrainer`."""

    algorithm_name = "forward-process training"

    def __init__(self, policy, reward=None, prompts=None, config=None, accelerator=None):
        from visalign.pipelines import wrap

        policy = wrap(policy)
        if not policy.is_flow:
            raise ConfigError(
                f"{self.algorithm_name} trains rectified-flow policies (SD3, FLUX, Wan, ...): it noises clean samples "
                f"as (1-σ)·x0 + σ·ε and reads x0 = x_σ - σ·v. {policy.family} is a DDPM-family model; use GRPO or DPO."
            )
        if reward is None:
            raise ConfigError(f"{type(self).__name__} scores its rollouts: pass a reward.")
        super().__init__(policy, reward, prompts, config, accelerator)

    def collect_with_advantages(self, step: int, policy_context=None):
        """The rollout stage, then its advantages: ``(rollout, advantages, metrics)``.

        ``rollout`` is None (and ``metrics`` the skip's) when the reward failed or was constant
        within every group.
        """
        rollout = self.collect(step, policy_context=policy_context)
        if isinstance(rollout, dict):
            return None, None, rollout
        advantages, metrics = self.advantages(rollout)
        return (rollout if advantages is not None else None), advantages, metrics

    def advantages(self, rollout):
        """``(advantages (B,), metrics)``; advantages is None when the iteration is skipped (see the module doc)."""
        advantages, _, stats = self.compute_advantages(rollout)
        metrics = {**rollout.metrics, **stats}
        if stats["zero_std_ratio"] >= 1.0:
            if self.state.bad_steps == 0:
                warnings.warn(
                    f"{type(self).__name__}, iteration {self.state.step}: {CONSTANT_REWARD}. The iteration "
                    f"is skipped; after max_bad_steps={self.config.max_bad_steps} such iterations in a row "
                    "training stops.",
                    UserWarning,
                    stacklevel=3,
                )
            return None, {**metrics, "skipped": 1.0, "skip_reason": CONSTANT_REWARD}
        return advantages, metrics

    def training_conditioning(self, traj):
        """The trajectory's prompts (and I2V images) encoded without CFG, for the training passes."""
        cfg = self.config
        scale = cfg.guidance_scale if self.policy.embedded_guidance else 1.0
        geometry = self.policy.geometry(cfg.height, cfg.width, cfg.num_frames)
        with torch.no_grad():
            return self.policy.encode_prompt(
                list(traj.prompts), None, scale, images=traj.cond_images, geometry=geometry
            )

    def training_noise(self, step: int, rows: torch.Tensor, slot: int, like: torch.Tensor) -> torch.Tensor:
        """ε of shape ``like`` for the samples ``rows`` at noise-level slot ``slot`` of iteration ``step``."""
        from diffusers.utils.torch_utils import randn_tensor

        device = self.accelerator.device
        gens = [
            torch.Generator(device).manual_seed(self.step_seed(step, NOISE_STREAM + int(b) * 4096 + slot))
            for b in rows.tolist()
        ]
        return randn_tensor((len(gens), *like.shape[1:]), generator=gens, device=device, dtype=torch.float32)

    def predict(self, x: torch.Tensor, timesteps: torch.Tensor, conditioning) -> torch.Tensor:
        """The policy's velocity at x_σ in float32; ``timesteps`` (B,) are the rollout table's entries."""
        with self.accelerator.autocast():
            return self.policy.predict(x, timesteps, conditioning)

    def chunks(self, index: torch.Tensor) -> list[torch.Tensor]:
        """``index`` split into micro-batches of ``micro_batch_size``."""
        return list(index.split(self.config.micro_batch_size or max(1, index.numel())))

    def iteration_optimizer_steps(self, step: int) -> int:
        """s after iteration ``step``'s updates: the optimizer steps taken so far (checkpointed; skips don't count)."""
        return self.state.optimizer_steps
