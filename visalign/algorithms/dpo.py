"""Preference optimisation for diffusion and flow models: Diffusion-DPO and Flow-DPO (REFERENCE §3).

Diffusion-DPO is Wallace et al., arXiv 2311.12908; Flow-DPO and Flow-RWR are from VideoAlign
(Liu et al., arXiv 2501.13918).

A pair (chosen x0_w, rejected x0_l) of the same prompt is noised with one shared ε to one shared
level t. The policy and the reference each regress on the target (velocity ε − x0 for flow; ε or v
for DDPM families, as the policy's ``prediction_type`` says), giving four errors
e = mean_dims(pred − target)², and

    z = −½·β_t·[(e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)],    loss = mean over pairs of −log σ(z).

The level is σ ~ logit-normal(0, 1) mapped through the scheduler's shift (flow; SD3's static shift or
FLUX's resolution-dependent one) or t ~ U{0, …, T−1} (DDPM), drawn from the iteration's seed. The
model is trained on its conditional prediction (no CFG; FLUX keeps its guidance embedding). β is
constant or follows the ε-equivalent schedule (:func:`dpo_beta`).

Two data paths feed the same loss:

- **offline** (``mode="offline"``): a CSV/JSONL of ``prompt, chosen, rejected`` image paths
  (relative paths are resolved against the file's folder). The VAE encodes the images, optionally
  caching the latents (the posterior's mode) on disk (``latent_cache_dir``).
- **online** (``mode="online"``): G samples per prompt from the current (or the reference) policy,
  scored by the reward, best paired against worst. ``ref_refresh_every=K`` copies the current
  weights into the reference every K iterations, which turns DPO into online/iterative DPO.

``gradient_steps=K`` takes K optimizer steps on each batch of pairs, each at a fresh ε and level (the
first draw is the one a single step would use). Online, sampling dominates the cost, so reusing a
rollout for a few steps is cheap; on the toy world it is part of the recipe that raises accuracy
(``configs/toy_dpo.yaml``).

``loss="sft"`` regresses on the chosen samples only, and ``loss="rwr"`` (Flow-RWR) on every sample
weighted by softmax(r/``rwr_beta``) within its group (a pair is a group of two; offline RWR scores
the chosen and rejected images with the reward).

**The reference.** Without refresh it is the base model: the adapters-off pass for LoRA, a frozen
copy for full fine-tuning. With ``ref_refresh_every=K`` it is a snapshot of the *trainable* weights
taken every K iterations (for LoRA: a copy of the adapter weights, so the reference is base +
the adapter as it was; the base weights are shared and never copied). A reference pass swaps the
snapshot into the live parameters in place, under no_grad, and swaps it back; it runs before the
policy's forward so autograd never sees a changed weight. The snapshot is checkpointed, so a
resumed run continues with the same reference.

**Distributed.** Every rank trains on its own pairs; a rank always runs the same number of forwards
and backwards (online groups without a reward spread are dropped in a single process, kept at
weight 0 under several), so DDP's gradient reduction stays in step.

Example::

    # pairs.jsonl: {"prompt": "a red circle", "chosen": "w/0.png", "rejected": "l/0.png"}
    trainer = va.DPOTrainer(policy, None, "pairs.jsonl", va.DPOConfig(beta=2000, pairs_per_step=8))
    trainer.train()

    # online: best-vs-worst of 4 samples per prompt, reference refreshed every 10 iterations
    cfg = va.DPOConfig(mode="online", group_size=4, ref_refresh_every=10)
    va.DPOTrainer(policy, reward, ["a red circle", "a blue square"], cfg).train()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from visalign.errors import ConfigError, InvalidInputError
from visalign.sampling import sample
from visalign.sampling import steps as S
from visalign.training.config import TrainConfig, config_field
from visalign.training.trainer import Trainer


# ---------------------------------------------------------------------------- pure math
def prediction_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample regression error e = mean over all non-batch dims of (pred − target)², in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
             beta: float | torch.Tensor, weights: torch.Tensor | None = None, reduction: str = "mean"):
    """The Diffusion-/Flow-DPO loss (REFERENCE §3).

    ``z = −½·β·[(e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)]``, loss = mean over pairs of −log σ(z) (the
    mean of log σ, never log σ of the mean).

    Args:
        err_w, err_l: (B,) the policy's errors on the chosen and rejected samples (with gradient).
        ref_err_w, ref_err_l: (B,) the reference's errors on the same noisy inputs (no gradient).
        beta: β, a float or a (B,) per-pair β_t (see :func:`dpo_beta`).
        weights: optional (B,) pair weights (0 drops a pair, e.g. a group without a reward spread).
        reduction: ``"mean"`` (weighted mean over pairs) or ``"sum"`` (Σ w·(−log σ(z)); the caller
            normalises, e.g. across micro-batches).

    Returns:
        ``(loss, metrics)``: a scalar, and detached floats over the weighted pairs: ``loss``,
        ``implicit_acc`` = mean(z > 0) (a tie counts as wrong, so identical policy and reference give
        0), ``reward_margin`` = mean(z) (the implicit reward margin), and the four mean errors
        ``err_chosen``, ``err_rejected``, ``ref_err_chosen``, ``ref_err_rejected``.
    """
    beta = torch.as_tensor(beta, dtype=torch.float32, device=err_w.device)
    z = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    w = torch.ones_like(z) if weights is None else weights.to(z)
    count = w.sum().clamp(min=1e-12)
    total = (w * -F.logsigmoid(z)).sum()
    loss = total / count if reduction == "mean" else total
    with torch.no_grad():
        mean = lambda t: float((w * t.float()).sum() / count)  # noqa: E731
        metrics = {"loss": mean(-F.logsigmoid(z)), "implicit_acc": mean(z > 0), "reward_margin": mean(z),
                   "err_chosen": mean(err_w), "err_rejected": mean(err_l), "ref_err_chosen": mean(ref_err_w),
                   "ref_err_rejected": mean(ref_err_l)}
    return loss, metrics


def dpo_beta(beta: float, schedule: str, is_flow: bool, level: torch.Tensor, prediction_type: str = "epsilon"):
    """β per pair: constant, or the ε-equivalent schedule (REFERENCE §3).

    The ε-equivalent schedule weights each error as the ε-prediction error it corresponds to, so a
    β tuned for ε-models carries over: for flow (ε̂ − ε = (1−σ)(v̂ − v)) β_t = β·(1−σ)²; for DDPM
    v-prediction (ε̂ − ε = √ᾱ(v̂ − v)) β_t = β·ᾱ; for x0-prediction β_t = β·ᾱ/(1−ᾱ); for ε it is β.

    Args:
        beta: β > 0.
        schedule: ``"constant"`` or ``"eps"``.
        is_flow: the policy's parameterisation.
        level: (B,) σ (flow) or ᾱ_t (DDPM) of each pair.
        prediction_type: a DDPM model's ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """
    level = level.float()
    if schedule == "constant":
        return torch.full_like(level, float(beta))
    if schedule != "eps":
        raise ConfigError(f"beta_schedule must be 'constant' or 'eps'; got {schedule!r}.")
    if is_flow:
        return beta * (1.0 - level) ** 2
    weight = {"epsilon": torch.ones_like(level), "v_prediction": level, "sample": level / (1.0 - level)}
    return beta * weight[prediction_type]


def rwr_weights(rewards: torch.Tensor, group_size: int, beta: float) -> torch.Tensor:
    """Flow-RWR weights: softmax(r/β) within each group of ``group_size``, so each group sums to 1."""
    return torch.softmax(rewards.float().view(-1, group_size) / beta, dim=1).reshape(-1)


def noise_pairs(x0_w: torch.Tensor, x0_l: torch.Tensor, noise: torch.Tensor, level: torch.Tensor, is_flow: bool,
                prediction_type: str = "epsilon"):
    """Noises both members of each pair with the same ε and level; returns (x_w, x_l, target_w, target_l).

    ``level`` is σ for flow (x = (1−σ)·x0 + σ·ε, target ε − x0) and ᾱ_t for DDPM families
    (x = √ᾱ·x0 + √(1−ᾱ)·ε, target ε / v / x0 as ``prediction_type`` says).
    """
    if is_flow:
        return (S.flow_add_noise(x0_w, noise, level), S.flow_add_noise(x0_l, noise, level),
                S.flow_target(x0_w, noise), S.flow_target(x0_l, noise))
    return (S.ddpm_add_noise(x0_w, noise, level), S.ddpm_add_noise(x0_l, noise, level),
            S.ddpm_target(x0_w, noise, level, prediction_type), S.ddpm_target(x0_l, noise, level, prediction_type))


# ---------------------------------------------------------------------------- config
@dataclass
class DPOConfig(TrainConfig):
    """Diffusion-/Flow-DPO options (REFERENCE §3), on top of :class:`~visalign.training.config.TrainConfig`."""

    mode: Literal["offline", "online"] = config_field(
        "offline", "offline: a pairs file; online: sample G per prompt and pair best vs worst.")
    loss: Literal["dpo", "sft", "rwr"] = config_field(
        "dpo", "dpo; sft (regress on chosen only); rwr (Flow-RWR: every sample weighted by softmax(r/rwr_beta)).")
    beta: float = config_field(
        5000.0, "DPO β (Diffusion-DPO SD1.5: 5000 with mean errors; Flow-GRPO's SD3 script: 100; FLUX LoRA ~2000).")
    beta_schedule: Literal["constant", "eps"] = config_field(
        "constant", "Constant β (Flow-DPO), or the ε-equivalent β_t = β·(1−σ)² (flow) / β·ᾱ (v-prediction).")
    rwr_beta: float = config_field(1.0, "Temperature of the Flow-RWR weights exp(r/β).")
    pairs_per_step: int = config_field(
        4, "Pairs per rank per iteration (online: prompts, each giving one best-vs-worst pair).")
    micro_batch_size: int | None = config_field(
        None, "Pairs per forward/backward (gradient accumulation); None: all at once.")
    gradient_steps: int = config_field(
        1, "Optimizer steps on each batch of pairs, each at a fresh noise and level draw (online: reuses the "
           "rollout, whose sampling dominates the cost).")
    timestep_sampling: Literal["auto", "logit_normal", "uniform"] = config_field(
        "auto", "Noise level draw: auto = logit-normal through the shift (flow), uniform t (DDPM).")
    logit_mean: float = config_field(0.0, "Mean of the logit-normal σ draw.")
    logit_std: float = config_field(1.0, "Std of the logit-normal σ draw.")
    guidance_scale: float | None = config_field(
        None, "CFG for online sampling and saved samples (training is conditional; FLUX: the guidance embedding).")
    chosen_column: str = config_field("chosen", "Pairs-file column with the chosen image path.")
    rejected_column: str = config_field("rejected", "Pairs-file column with the rejected image path.")
    latent_cache_dir: str | None = config_field(
        None, "Cache VAE latents of offline images in this folder (keyed by file, size and VAE).")
    num_steps: int = config_field(20, "Sampling steps of online rollouts and saved samples.")
    group_size: int = config_field(4, "Online: samples per prompt (G >= 2); best vs worst by reward.")
    online_sampler: Literal["ode", "sde"] = config_field("ode", "Online: the sampler of the G samples.")
    eta: float | None = config_field(None, "Online: noise level of the 'sde' sampler (None: the sampler's default).")
    sample_from: Literal["current", "reference"] = config_field(
        "current", "Online: sample from the current policy or the reference.")
    ref_refresh_every: int = config_field(
        0, "Copy the current weights into the reference every K iterations (0: reference = base model).")
    image_column: str = config_field("image", "Prompt-source column holding I2V first-frame paths (online).")

    def validate(self) -> None:
        super().validate()
        c = self._check
        c(self.beta > 0, "beta", "> 0", "Diffusion-DPO uses 5000; Flow-DPO on SD3 100–2000.")
        c(self.rwr_beta > 0, "rwr_beta", "> 0")
        c(self.pairs_per_step >= 1, "pairs_per_step", ">= 1")
        c(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", ">= 1 or None")
        c(self.gradient_steps >= 1, "gradient_steps", ">= 1")
        c(self.logit_std > 0, "logit_std", "> 0")
        c(self.num_steps >= 1, "num_steps", ">= 1")
        c(self.group_size >= 2 or self.mode == "offline", "group_size", ">= 2 in online mode",
          "Online DPO pairs the best and the worst of a group.")
        c(self.ref_refresh_every >= 0, "ref_refresh_every", ">= 0", "0 keeps the base model as the reference.")
        c(self.loss == "dpo" or self.sample_from == "reference" or self.ref_refresh_every == 0, "ref_refresh_every",
          "0 unless loss='dpo' or sample_from='reference'", "sft and rwr regress without a reference.")


# ---------------------------------------------------------------------------- pairs files
def resolve_path(source, value) -> str:
    """A path from a pairs file, relative paths taken from the file's folder."""
    base = source.base_dir
    return str(value) if os.path.isabs(str(value)) or base is None else os.path.join(base, str(value))


def check_pairs(source, chosen_column: str = "chosen", rejected_column: str = "rejected") -> None:
    """Raises :class:`InvalidInputError` listing pairs with a missing column, a missing file, or the
    same file as chosen and rejected."""
    problems = []
    for i, record in enumerate(source):
        where = f"pair {i} (prompt {record['prompt']!r})"
        missing = [c for c in (chosen_column, rejected_column) if not record.get(c)]
        if missing:
            problems.append(f"{where} has no {' / '.join(missing)} column")
            continue
        chosen, rejected = resolve_path(source, record[chosen_column]), resolve_path(source, record[rejected_column])
        for name, path in ((chosen_column, chosen), (rejected_column, rejected)):
            if not os.path.isfile(path):
                problems.append(f"{where}: {name} image '{path}' does not exist")
        if os.path.abspath(chosen) == os.path.abspath(rejected):
            problems.append(f"{where}: chosen and rejected are the same file '{chosen}'")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InvalidInputError(
            f"{source.origin}: {len(problems)} bad pair(s): " + "; ".join(problems[:5]) + more +
            f". Each pair needs two different, existing image files in columns '{chosen_column}' and "
            f"'{rejected_column}' (relative to the pairs file's folder).")


# ---------------------------------------------------------------------------- reference snapshots
class ReferenceSnapshot:
    """Copies of the trainable weights at the last refresh, swapped in for reference passes.

    Checkpointed through ``accelerator.register_for_checkpointing`` (``state_dict``/``load_state_dict``).
    """

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.tensors: list[torch.Tensor] | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        self.tensors = [p.detach().clone() for p in self.parameters]

    @contextlib.contextmanager
    def swapped(self):
        """Within this block the parameters hold the snapshot (no grad); swapped back after."""
        with torch.no_grad():
            self._swap()
            try:
                yield
            finally:
                self._swap()

    def _swap(self) -> None:
        for p, t in zip(self.parameters, self.tensors):
            held = p.detach().clone()
            p.data.copy_(t)
            t.copy_(held)

    def state_dict(self) -> dict:
        return {"tensors": None if self.tensors is None else [t.cpu() for t in self.tensors]}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        self.tensors = None if tensors is None else [
            t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, self.parameters)]


# ---------------------------------------------------------------------------- trainer
class DPOTrainer(Trainer):
    """Diffusion-/Flow-DPO (and SFT, Flow-RWR) on the shared loop. See the module docstring.

    Args:
        policy: a Policy or a diffusers pipeline.
        reward: the reward (online mode and offline RWR); None for offline DPO/SFT.
        prompts: offline: the pairs file (CSV/JSONL with ``prompt``, ``chosen``, ``rejected``) or a list
            of such dicts; online: prompts as for any trainer.
        config: a :class:`DPOConfig`.
    """

    config_class = DPOConfig

    def __init__(self, policy, reward=None, prompts=None, config: DPOConfig | None = None, accelerator=None):
        from visalign.pipelines import wrap
        from visalign.training.prompts import PromptSource

        cfg = config if config is not None else DPOConfig()
        if not isinstance(cfg, DPOConfig):
            super().__init__(policy, reward, prompts, cfg, accelerator)  # raises, naming the config expected
        if (cfg.mode == "online" or cfg.loss == "rwr") and reward is None:
            raise ConfigError(f"DPO with mode={cfg.mode!r} and loss={cfg.loss!r} scores samples: pass a reward.")
        if cfg.mode == "offline":  # checked before any model work, so a bad pairs file fails fast
            policy = wrap(policy)
            if policy.is_video or policy.needs_image:
                raise ConfigError(f"Offline DPO reads image pairs; {policy.family} generates video. Use mode='online'.")
            if prompts is None:
                raise ConfigError("Offline DPO needs a pairs file: CSV/JSONL with prompt, chosen and rejected columns.")
            prompts = PromptSource.from_any(prompts)
            check_pairs(prompts, cfg.chosen_column, cfg.rejected_column)
        super().__init__(policy, reward, prompts, cfg, accelerator)
        self.snapshot = None
        if cfg.ref_refresh_every:
            self.snapshot = ReferenceSnapshot(self.trainable_parameters)
            self.accelerator.register_for_checkpointing(self.snapshot)
        self._vae_fingerprint = None

    @property
    def needs_reference(self) -> bool:
        cfg = self.config
        uses_reference = cfg.loss == "dpo" or (cfg.mode == "online" and cfg.sample_from == "reference")
        return uses_reference and not cfg.ref_refresh_every

    def prompts_per_step(self) -> int:
        return self.config.pairs_per_step

    def optimizer_steps_per_iteration(self) -> int:
        return self.config.gradient_steps

    def batch_arithmetic(self) -> list[str]:
        cfg, world = self.config, self.accelerator.num_processes
        if cfg.mode == "online":
            data = (f"online: {cfg.pairs_per_step} prompts × {cfg.group_size} samples ({cfg.online_sampler}, "
                    f"{cfg.num_steps} steps) from the {cfg.sample_from} policy → ≤{cfg.pairs_per_step} pairs per rank")
        else:
            data = f"offline: {cfg.pairs_per_step} pairs per rank, {cfg.pairs_per_step * world} in all"
        ref = (f"reference refreshed every {cfg.ref_refresh_every} iterations" if cfg.ref_refresh_every
               else "reference = base model")
        return [data, f"loss {cfg.loss}, β {cfg.beta:g} ({cfg.beta_schedule}); {ref}; "
                      f"{cfg.gradient_steps} optimizer step(s) per batch"]

    # ------------------------------------------------------------------ reference
    def reference_context(self):
        """The reference policy: the refreshed snapshot when there is one, else the base model."""
        if self.snapshot is not None:
            return self.snapshot.swapped()
        return self.reference()

    # ------------------------------------------------------------------ offline data
    def _resolve(self, value) -> str:
        return resolve_path(self.prompt_source, value)

    def _fingerprint(self) -> str:
        if self._vae_fingerprint is None:
            vae = self.policy.vae
            first = next(vae.parameters()).detach().flatten()[:256].float().cpu().numpy().tobytes()
            config = json.dumps(dict(vae.config), sort_keys=True, default=str).encode()
            self._vae_fingerprint = hashlib.sha1(config + first).hexdigest()[:16]
        return self._vae_fingerprint

    def _cache_path(self, path: str, geometry) -> str:
        st = os.stat(path)
        key = f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{self.policy.family}|" \
              f"{geometry.height}x{geometry.width}|{self._fingerprint()}"
        return os.path.join(self.config.latent_cache_dir, hashlib.sha1(key.encode()).hexdigest() + ".pt")

    @torch.no_grad()
    def load_pair_latents(self, records: list[dict]):
        """VAE latents (mode of the posterior) of the chosen and rejected images, cached when configured.

        Returns:
            ``(x0_w, x0_l, pixels_w, pixels_l)``; the pixels are loaded only when needed (RWR) or not
            cached, else None.
        """
        from visalign.training.prompts import load_images

        cfg = self.config
        geometry = self.policy.geometry(cfg.height, cfg.width, cfg.num_frames)
        out = []
        for column in (cfg.chosen_column, cfg.rejected_column):
            paths = [self._resolve(r[column]) for r in records]
            cache = [self._cache_path(p, geometry) for p in paths] if cfg.latent_cache_dir else None
            need_pixels = cache is None or cfg.loss == "rwr" or not all(os.path.exists(c) for c in cache)
            pixels = None
            if need_pixels:
                pixels = load_images([{"prompt": r["prompt"], column: p} for r, p in zip(records, paths)], column,
                                     size=(geometry.height, geometry.width)).to(self.accelerator.device)
            if cache is not None and all(os.path.exists(c) for c in cache):
                latents = torch.stack([torch.load(c, map_location=self.accelerator.device) for c in cache])
            else:
                with self.accelerator.autocast():
                    latents = self.policy.encode(pixels).float()
                if cache is not None:
                    os.makedirs(cfg.latent_cache_dir, exist_ok=True)
                    for c, z in zip(cache, latents):
                        tmp = f"{c}.tmp-{os.getpid()}"
                        torch.save(z.cpu().clone(), tmp)
                        os.replace(tmp, c)  # atomic: a reader never sees a partial file
            out.append((latents, pixels))
        (x0_w, pix_w), (x0_l, pix_l) = out
        same = (x0_w - x0_l).flatten(1).abs().amax(1) == 0
        if bool(same.any()):
            i = int(same.nonzero()[0])
            raise InvalidInputError(
                f"Pair with prompt {records[i]['prompt']!r}: chosen '{records[i][cfg.chosen_column]}' and "
                f"rejected '{records[i][cfg.rejected_column]}' are the same image. A pair must differ.")
        return x0_w, x0_l, pix_w, pix_l

    # ------------------------------------------------------------------ online data
    def online_pairs(self, step: int, records: list[dict]):
        """Samples G per prompt, scores them and returns the training batch, or a skip reason.

        Returns:
            ``(batch, metrics)``; ``batch`` is None when the step must be skipped (bad reward). Else a
            dict with ``x0_w``, ``x0_l`` (best and worst of each group with a reward spread),
            ``records``, and for RWR ``x0_all``, ``weights``.
        """
        cfg = self.config
        prompts = [r["prompt"] for r in records]
        images = self.load_condition_images(records, cfg.image_column)
        source = self.reference_context() if cfg.sample_from == "reference" else contextlib.nullcontext()
        with torch.no_grad(), source, self.accelerator.autocast():
            traj = sample(self.policy, prompts, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                          sampler=cfg.online_sampler, eta=cfg.eta, generator=self.generators(step, len(prompts) * cfg.group_size),
                          images=images, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                          group_size=cfg.group_size)
        group_records = [r for r in records for _ in range(cfg.group_size)]
        total, components, reason = self.score_or_skip(traj.images, traj.prompts, group_records)
        if total is None:
            return None, {"skipped": 1.0, "skip_reason": reason}
        gathered = self.accelerator.gather(total.detach())
        metrics = {"reward_mean": float(gathered.mean()), "reward_std": float(gathered.std(unbiased=False))}
        grouped = total.view(-1, cfg.group_size)
        best, worst = grouped.argmax(1), grouped.argmin(1)
        offset = torch.arange(grouped.shape[0], device=total.device) * cfg.group_size
        gap = grouped.max(1).values - grouped.min(1).values
        active = gap > 1e-8  # a group without a reward spread gives no preference
        metrics["reward_gap"] = float(gap[active].mean()) if bool(active.any()) else 0.0
        metrics["pairs_used"] = float(active.sum())
        # One process drops inactive pairs; several keep them at weight 0, so that every rank runs the
        # same forwards and backwards (DDP reduces gradients in step). SFT needs no spread.
        keep = active if self.accelerator.num_processes == 1 and cfg.loss == "dpo" else torch.ones_like(active)
        latents = traj.final_latents.float()
        batch = {"x0_w": latents[(offset + best)[keep]], "x0_l": latents[(offset + worst)[keep]],
                 "weights": (active if cfg.loss == "dpo" else torch.ones_like(active))[keep].float(),
                 "records": [r for r, k in zip(records, keep.tolist()) if k],
                 "images": None if images is None else images[keep]}
        if cfg.loss == "rwr":
            batch.update(x0_all=latents, weights=rwr_weights(total, cfg.group_size, cfg.rwr_beta),
                         records_all=group_records, images_all=traj.cond_images)
        return batch, metrics

    # ------------------------------------------------------------------ the step
    @staticmethod
    def _stream(base: int, draw: int) -> int:
        """The generator stream of a noise draw: draw 0 keeps the historical streams (2: ε, 3: level)."""
        return base + 1000 * draw

    def noise_levels(self, step: int, count: int, draw: int = 0):
        """Per-pair noise levels from step-seeded generators: ``(level, timesteps)``.

        ``draw`` numbers the gradient steps on one batch, each with its own levels.

        ``level`` is σ (flow; logit-normal through the scheduler's shift, or uniform) or ᾱ_t (DDPM;
        t uniform over the training timesteps, or logit-normal); ``timesteps`` are in scheduler units.
        """
        cfg, policy, device = self.config, self.policy, self.accelerator.device
        gens = self.generators(step, count, stream=self._stream(3, draw))
        normal = torch.cat([torch.randn(1, generator=g, device=device) for g in gens])
        uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in gens])
        kind = cfg.timestep_sampling
        if kind == "auto":
            kind = "logit_normal" if policy.is_flow else "uniform"
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal) if kind == "logit_normal" else uniform
        if policy.is_flow:
            geometry = policy.geometry(cfg.height, cfg.width, cfg.num_frames)
            sigma = policy.shift_sigmas(u, geometry).clamp(1e-4, 1.0)
            return sigma, sigma * policy.flow_scheduler().config.num_train_timesteps
        scheduler = policy.ddim_scheduler()
        t = (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)
        return scheduler.alphas_cumprod.to(device)[t].float(), t.float()

    def _conditioning(self, prompts: list[str], images):
        cfg = self.config
        # Training regresses the conditional model (as Diffusion-DPO does); FLUX's embedded
        # guidance is an input of that model, so it keeps its value.
        scale = cfg.guidance_scale if self.policy.embedded_guidance else 1.0
        geometry = self.policy.geometry(cfg.height, cfg.width, cfg.num_frames)
        with torch.no_grad():
            return self.policy.encode_prompt(prompts, None, scale, images=images, geometry=geometry)

    def _errors(self, x: torch.Tensor, timesteps: torch.Tensor, conditioning, target: torch.Tensor):
        with self.accelerator.autocast():
            pred = self.policy.predict(x, timesteps, conditioning)
        return prediction_errors(pred, target)

    def train_step(self, step: int) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        if self.snapshot is not None and step % cfg.ref_refresh_every == 0:
            self.snapshot.refresh()
        records = self.next_records()
        metrics: dict = {}
        if cfg.mode == "online":
            batch, metrics = self.online_pairs(step, records)
            if batch is None:
                return metrics
            x0_w, x0_l, records, images = batch["x0_w"], batch["x0_l"], batch["records"], batch["images"]
            pair_weights, pixels = batch["weights"], None
        else:
            x0_w, x0_l, pix_w, pix_l = self.load_pair_latents(records)
            images, pixels = None, (pix_w, pix_l)
            pair_weights = torch.ones(x0_w.shape[0], device=x0_w.device)
        t1 = time.perf_counter()
        if cfg.loss == "rwr":
            if cfg.mode == "online":
                x0, weights, recs, imgs = batch["x0_all"], batch["weights"], batch["records_all"], batch["images_all"]
            else:
                x0, recs, imgs, weights, rwr_metrics = self._offline_rwr(records, x0_w, x0_l, pixels)
                if x0 is None:
                    return rwr_metrics
                metrics.update(rwr_metrics)
            update = partial(self._regression_update, step, x0, weights, recs, imgs)
        elif x0_w.shape[0] == 0:  # one process, and no group had a reward spread: no update
            update = None
            metrics["loss"] = float("nan")
        elif cfg.loss == "sft":
            update = partial(self._regression_update, step, x0_w, pair_weights, records, images)
        else:
            update = partial(self._dpo_update, step, x0_w, x0_l, pair_weights, records, images)
        if update is not None:
            # Each gradient step sees the same pairs at fresh noise and levels; metrics are their mean.
            per_step = [update(draw=draw) for draw in range(cfg.gradient_steps)]
            metrics.update({k: sum(m[k] for m in per_step) / len(per_step) for k in per_step[0]})
        metrics.update({"time_data": t1 - t0, "time_training": time.perf_counter() - t1})
        return metrics

    def _offline_rwr(self, records, x0_w, x0_l, pixels):
        """Offline RWR: each pair is a group of two, weighted by the reward of its images."""
        pix_w, pix_l = pixels
        both = torch.stack([pix_w, pix_l], 1).flatten(0, 1)
        recs = [r for r in records for _ in range(2)]
        total, _, reason = self.score_or_skip(both, [r["prompt"] for r in recs], recs)
        if total is None:
            return None, None, None, None, {"skipped": 1.0, "skip_reason": reason}
        x0 = torch.stack([x0_w, x0_l], 1).flatten(0, 1)
        weights = rwr_weights(total, 2, self.config.rwr_beta)
        return x0, recs, None, weights, {"reward_mean": float(total.mean())}

    def _chunks(self, n: int):
        size = self.config.micro_batch_size or n
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    def _dpo_update(self, step, x0_w, x0_l, weights, records, images, draw: int = 0) -> dict:
        cfg, acc, policy = self.config, self.accelerator, self.policy
        n = x0_w.shape[0]
        level, timesteps = self.noise_levels(step, n, draw)
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(tuple(x0_w.shape), generator=self.generators(step, n, stream=self._stream(2, draw)),
                             device=x0_w.device, dtype=torch.float32)
        prediction_type = getattr(policy, "prediction_type", "epsilon")
        beta = dpo_beta(cfg.beta, cfg.beta_schedule, policy.is_flow, level, prediction_type)
        prompts = [r["prompt"] for r in records]
        weight_total = float(weights.sum().clamp(min=1e-12))
        sums: dict[str, float] = {}
        chunks = self._chunks(n)
        for j, idx in enumerate(chunks):
            sel = torch.tensor(list(idx), device=x0_w.device)
            x_w, x_l, tgt_w, tgt_l = noise_pairs(x0_w[sel], x0_l[sel], noise[sel], level[sel], policy.is_flow,
                                                 prediction_type)
            cond = self._conditioning([prompts[i] for i in idx], None if images is None else images[sel])
            cond2 = type(cond).cat([cond, cond])
            x, t, target = torch.cat([x_w, x_l]), torch.cat([timesteps[sel]] * 2), torch.cat([tgt_w, tgt_l])
            with self.reference_context():  # first: the policy's graph must never see swapped weights
                ref_err = self._errors(x, t, cond2, target)
            sync = contextlib.nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model)
            with sync:
                err = self._errors(x, t, cond2, target)
                b = len(idx)
                loss, m = dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], beta[sel], weights=weights[sel],
                                   reduction="sum")
                acc.backward(loss / weight_total)
            share = float(weights[sel].sum()) / weight_total
            for key, value in m.items():
                sums[key] = sums.get(key, 0.0) + value * share
        sums.update(self.optimizer_step())
        return sums

    def _regression_update(self, step, x0, weights, records, images, draw: int = 0) -> dict:
        """SFT / RWR: minimise Σ_i w_i·e_θ,i (weights sum to 1 over the batch)."""
        acc, policy = self.accelerator, self.policy
        n = x0.shape[0]
        level, timesteps = self.noise_levels(step, n, draw)
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(tuple(x0.shape), generator=self.generators(step, n, stream=self._stream(2, draw)),
                             device=x0.device, dtype=torch.float32)
        weights = weights / weights.sum()
        prompts = [r["prompt"] for r in records]
        total_loss, chunks = 0.0, self._chunks(n)
        for j, idx in enumerate(chunks):
            sel = torch.tensor(list(idx), device=x0.device)
            x, _, target, _ = noise_pairs(x0[sel], x0[sel], noise[sel], level[sel], policy.is_flow,
                                          getattr(policy, "prediction_type", "epsilon"))
            cond = self._conditioning([prompts[i] for i in idx], None if images is None else images[sel])
            sync = contextlib.nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model)
            with sync:
                err = self._errors(x, timesteps[sel], cond, target)
                loss = (weights[sel] * err).sum()
                acc.backward(loss)
            total_loss += float(loss.detach())
        out = {"loss": total_loss, "err_chosen": total_loss}
        out.update(self.optimizer_step())
        return out


__all__ = ["DPOConfig", "DPOTrainer", "ReferenceSnapshot", "check_pairs", "dpo_beta", "dpo_loss", "noise_pairs",
           "prediction_errors", "rwr_weights"]
