"""FK steering against best-of-N on the toy world: why they tie, and when they do not (issue 15, item 7).

Everything runs on the shipped toy T2I (``toy:t2i``, 10 steps, CFG 3, flow SDE η 0.7, 32 px) with
two rewards: ``toy_clip`` (the shipped toy CLIP, cosine) and ``evaluator`` (the exact toy evaluator
as a reward: the fraction of colour / shape / position right, 0, 1/3, 2/3 or 1). Every method is
scored on its returned sample by the evaluator's all-correct verdict and by toy_clip.

    python benchmarks/fk_toy.py time                                   # one FK configuration, timed
    python benchmarks/fk_toy.py diagnose --seeds 0                     # how informative is x̂0 at step k?
    python benchmarks/fk_toy.py bon --seeds 0 1 2                      # best-of-1/2/4/8 from one pool
    python benchmarks/fk_toy.py fk --reward toy_clip --particles 4 --lams 10 100 1000 --seeds 0
    python benchmarks/fk_toy.py fk --reward evaluator --potentials max diff add --lams 10 --every 1 2 3
    python benchmarks/fk_toy.py report                                 # the tables, from the JSON lines

Design:

- **Noise.** Particle k of caption p under seed s draws its initial noise and every SDE step from
  its own generator, seeded by ``(eval seed of p, s, k)``. So FK with N particles and best-of-N
  share their initial noise and their noise stream up to FK's first resampling (a paired
  comparison), and best-of-4 is the first 4 particles of the best-of-8 pool.
- **Best-of-N** comes from one plain pool of ``--pool`` particles per caption and seed
  (:func:`plain_run`, the same loop as :func:`visalign.fk_steer` without resampling), so
  best-of-1, 2, 4 and 8 cost one run; the pool's per-step x̂0 also feeds the diagnosis.
- **FK** runs with ``resample_final=False`` and returns every final particle: the row reports
  FK's pick (the highest guiding reward) and also what the final resampling
  (``resample_final=True``, the default, used by the earlier toy comparison) would have returned,
  by resampling the final importance weights systematically and then taking the best.
- **Equal cost.** FK with N particles and best-of-N both run N·S denoiser evaluations per caption;
  FK also decodes and scores x̂0 at its reward steps (``reward_evals`` in the rows).

Rows are appended to ``benchmarks/results/fk_toy.jsonl``; a row whose key (the configuration and
seed) is already there is not recomputed, so an interrupted run resumes where it stopped.
Run with one thread (the default ``--threads 1``; OMP_NUM_THREADS=1 is set before torch loads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # one thread before torch loads (not when imported, e.g. by the tests)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fk_toy.jsonl"
ATTRIBUTES = ("color", "shape", "position")
REWARDS = ("toy_clip", "evaluator")
# The sampling settings of the toy comparison in BENCHMARKS.md (and of the GRPO demo).
SAMPLING = {"num_steps": 10, "guidance_scale": 3.0, "sampler": "sde", "eta": 0.7, "height": 32, "width": 32}


# ----------------------------------------------------------------------------- setup
@dataclass
class Toy:
    """The toy T2I policy and the rewards the benchmark steers with and scores by.

    Attributes:
        policy: ``toy:t2i`` (T5 length 1, as :func:`visalign.recipes.load_policy` loads it).
        rewards: ``{"toy_clip": CLIPScore cosine, "evaluator": ToyEvaluatorReward (fraction right)}``.
    """

    policy: Any
    rewards: dict[str, Any]


def load_toy() -> Toy:
    """Loads ``toy:t2i``, the toy CLIP reward and the exact evaluator as a reward (offline).

    Returns:
        A :class:`Toy`.
    """
    from visalign.recipes import _one_reward, load_policy

    policy = load_policy("toy:t2i")
    return Toy(policy, {"toy_clip": _one_reward("toy_clip"), "evaluator": _one_reward("toy_evaluator")})


def captions(num: int) -> tuple[list[str], list[int]]:
    """The first ``num`` captions of :func:`visalign.toy.policy_eval.eval_set` and their fixed seeds."""
    from visalign.toy.policy_eval import eval_set

    return eval_set(num)


def generators(caption_seeds: Sequence[int], seed: int, n: int) -> list[torch.Generator]:
    """One generator per particle row p·n+k, seeded by (caption seed, run seed, particle k)."""
    return [
        torch.Generator().manual_seed(int(c) * 1_000_003 + int(seed) * 10_007 + k)
        for c in caption_seeds
        for k in range(n)
    ]


def sampling_kwargs(args: argparse.Namespace | None = None, **over: Any) -> dict[str, Any]:
    """:data:`SAMPLING` with the command line's ``--steps/--cfg/--eta`` and ``over`` applied."""
    kw = dict(SAMPLING)
    if args is not None:
        kw.update(num_steps=args.steps, guidance_scale=args.cfg, eta=args.eta)
    kw.update(over)
    return kw


# ----------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """Every score of a batch of B images.

    Attributes:
        toy_clip: (B,) toy-CLIP cosine.
        evaluator: (B,) the evaluator's fraction of attributes right.
        all_correct: (B,) bool, every attribute right.
        correct: (B, 3) bool, colour / shape / position right.
    """

    toy_clip: torch.Tensor
    evaluator: torch.Tensor
    all_correct: torch.Tensor
    correct: torch.Tensor

    def reward(self, name: str) -> torch.Tensor:
        """The scores of the guiding reward ``name`` (``toy_clip`` or ``evaluator``)."""
        return self.toy_clip if name == "toy_clip" else self.evaluator

    def view(self, *shape: int) -> Scores:
        """The same scores with the batch dimension reshaped to ``shape``."""
        return Scores(
            self.toy_clip.view(*shape),
            self.evaluator.view(*shape),
            self.all_correct.view(*shape),
            self.correct.view(*shape, len(ATTRIBUTES)),
        )


def score_images(toy: Toy, images: torch.Tensor, prompts: Sequence[str], chunk: int = 256) -> Scores:
    """Scores images (B, 3, H, W) in [0, 1] with toy_clip and the exact evaluator.

    Args:
        toy: from :func:`load_toy`.
        images: the images.
        prompts: B captions.
        chunk: the most images per reward call.

    Returns:
        :class:`Scores`.
    """
    from visalign.toy.evaluator import evaluate

    clip, frac, ac, corr = [], [], [], []
    with torch.no_grad():
        for a in range(0, images.shape[0], chunk):
            pix, ps = images[a : a + chunk].float().cpu(), list(prompts[a : a + chunk])
            clip.append(toy.rewards["toy_clip"](pix, ps).float().cpu())
            for s in evaluate(pix, ps)["samples"]:
                frac.append(float(s["score"]))
                ac.append(bool(s["all_correct"]))
                corr.append([bool(s["correct"][k]) for k in ATTRIBUTES])
    return Scores(torch.cat(clip), torch.tensor(frac), torch.tensor(ac), torch.tensor(corr))


def decode(policy, latents: torch.Tensor, geometry, chunk: int = 96) -> torch.Tensor:
    """Decodes latents to pixels, ``chunk`` rows at a time (large decode batches are slower on CPU)."""
    return torch.cat([policy.decode(latents[a : a + chunk], geometry) for a in range(0, latents.shape[0], chunk)])


# ----------------------------------------------------------------------------- plain sampling (best-of-N)
@dataclass
class PlainRun:
    """P captions × n independent particles sampled without steering.

    Attributes:
        final: :class:`Scores` of the outputs, viewed (P, n).
        steps: :class:`Scores` of each step's decoded x̂0, viewed (P, n, S), or None.
        latents: (P, n, ...) the final latents.
        model_evals: denoiser evaluations in particle-steps (P·n·S).
        cpu_s: CPU seconds of the run (sampling, decoding and scoring).
    """

    final: Scores
    steps: Scores | None
    latents: torch.Tensor
    model_evals: int
    cpu_s: float


@torch.no_grad()
def plain_run(
    toy: Toy,
    prompts: Sequence[str],
    caption_seeds: Sequence[int],
    seed: int,
    n: int,
    keep_x0: bool = False,
    chunk: int | None = 96,
    **sampling: Any,
) -> PlainRun:
    """Samples n particles per caption with the loop of :func:`visalign.fk_steer`, minus the steering.

    The noise is per particle row (:func:`generators`), the denoiser runs ``chunk`` rows at a time
    (as ``fk_steer(max_batch_size=chunk)``), so FK's particles with the same seed start from the
    same noise and follow the same stream until FK first resamples; with no resampling at all
    (``resample_every=None, resample_final=False``) FK reproduces this run exactly.

    Args:
        toy: from :func:`load_toy`.
        prompts: P captions.
        caption_seeds: P fixed seeds (from :func:`captions`).
        seed: the run's seed.
        n: particles per caption.
        keep_x0: also decode and score every step's x̂0 (for the diagnosis).
        chunk: the most rows per denoiser call.
        **sampling: sampling keywords (:data:`SAMPLING`); ``sampler="ode"`` is allowed here.

    Returns:
        :class:`PlainRun`.
    """
    from visalign.sampling.sampler import denoise_step
    from visalign.steering.common import predict_chunked, prepare_steering

    start = time.process_time()
    policy = toy.policy
    gens = generators(caption_seeds, seed, n)
    setup = prepare_steering(policy, list(prompts), n, "n", {**sampling, "generator": gens})
    x, rows = setup.latents, list(setup.prompts)
    x0s = []
    for i in range(setup.schedule.num_steps):
        t = setup.schedule.timesteps[i].to(x.device)
        model_output = predict_chunked(policy, x, t, setup.conditioning, chunk)
        out = denoise_step(
            policy, setup.spec, setup.schedule, i, x, setup.conditioning, generator=gens, model_output=model_output
        )
        x = out.next_latents
        if keep_x0:
            x0s.append(out.x0)
    p = len(prompts)
    final = score_images(toy, decode(policy, x, setup.geometry), rows).view(p, n)
    steps = None
    if keep_x0:
        s = len(x0s)
        stacked = torch.stack(x0s, dim=1).flatten(0, 1)  # (B·S, ...), row b·S+i
        steps = score_images(toy, decode(policy, stacked, setup.geometry), [r for r in rows for _ in range(s)])
        steps = steps.view(p, n, s)
    return PlainRun(
        final, steps, x.view(p, n, *x.shape[1:]), p * n * setup.schedule.num_steps, time.process_time() - start
    )


# ----------------------------------------------------------------------------- FK
@dataclass
class FKConfig:
    """One FK configuration.

    Attributes:
        reward: the guiding reward, ``toy_clip`` or ``evaluator``.
        particles: N.
        lam: λ.
        potential: ``max``, ``add``, ``diff`` or ``rt``.
        every: score x̂0 and resample after every ``every`` steps (None: only the final step).
        range: ``(t_start, t_end)`` of the reward steps, or None for the whole run.
        adaptive: resample only when ESS < N/2.
    """

    reward: str = "toy_clip"
    particles: int = 4
    lam: float = 10.0
    potential: str = "max"
    every: int | None = 3
    range: tuple[int, int] | None = None
    adaptive: bool = False

    def key(self) -> dict[str, Any]:
        """The configuration as the fields of a JSON row."""
        return {
            "reward": self.reward,
            "particles": self.particles,
            "lam": self.lam,
            "potential": self.potential,
            "every": self.every,
            "range": list(self.range) if self.range else None,
            "adaptive": self.adaptive,
        }

    def label(self) -> str:
        """A short name, e.g. ``fk4 λ100 max every3 [0,5)``."""
        rng = f" [{self.range[0]},{self.range[1]})" if self.range else ""
        every = f"every{self.every}" if self.every else "final-only"
        return f"fk{self.particles} λ{self.lam:g} {self.potential} {every}{rng}{' adaptive' if self.adaptive else ''}"


@dataclass
class FKRun:
    """What one FK run on P captions gives the benchmark.

    Attributes:
        final: :class:`Scores` of every final particle, viewed (P, N) (no final resampling).
        pick: (P,) FK's returned particle: the highest guiding reward.
        pick_resampled: (P,) the particle FK returns with ``resample_final=True``: the final
            importance weights resampled systematically, then the highest guiding reward.
        log_weights: (P, N) the final importance weights (normalised log).
        ancestors: (P,) the number of distinct initial particles the final particles descend from.
        latents: (P, N, ...) the final latents.
        model_evals, reward_evals: denoiser and reward evaluations, in particle-steps / particles.
        cpu_s: CPU seconds (sampling, steering and scoring).
    """

    final: Scores
    pick: torch.Tensor
    pick_resampled: torch.Tensor
    log_weights: torch.Tensor
    ancestors: torch.Tensor
    latents: torch.Tensor
    model_evals: int
    reward_evals: int
    cpu_s: float


def root_ancestors(ancestry: torch.Tensor) -> torch.Tensor:
    """(P, N) the initial slot each final particle descends from, from FK's ``ancestry`` (P, S, N)."""
    p, s, n = ancestry.shape
    slot = torch.arange(n).expand(p, n).clone()
    for i in range(s - 1, -1, -1):
        slot = torch.gather(ancestry[:, i], 1, slot)
    return slot


def fk_run(
    toy: Toy,
    prompts: Sequence[str],
    caption_seeds: Sequence[int],
    seed: int,
    config: FKConfig,
    chunk: int | None = 96,
    **sampling: Any,
) -> FKRun:
    """Runs :func:`visalign.fk_steer` on P captions and scores every final particle.

    Args:
        toy: from :func:`load_toy`.
        prompts: P captions.
        caption_seeds: their fixed seeds.
        seed: the run's seed (the noise is per particle row, :func:`generators`).
        config: the FK settings.
        chunk: ``max_batch_size`` of the denoiser / decode / reward calls.
        **sampling: sampling keywords (:data:`SAMPLING`).

    Returns:
        :class:`FKRun`.
    """
    import visalign as va
    from visalign.steering import resampling as R

    start = time.process_time()
    n = config.particles
    out = va.fk_steer(
        toy.policy,
        list(prompts),
        toy.rewards[config.reward],
        num_particles=n,
        lam=config.lam,
        potential=config.potential,
        resample_every=config.every,
        resample_range=config.range,
        adaptive=config.adaptive,
        resample_final=False,
        max_batch_size=chunk,
        generator=generators(caption_seeds, seed, n),
        **sampling,
    )
    p = len(prompts)
    rows = [q for q in prompts for _ in range(n)]
    final = score_images(toy, out.particles.flatten(0, 1), rows).view(p, n)
    guide = out.particle_rewards.float()
    # What resample_final=True would have returned: resample the final weights, then keep the best.
    rng = torch.Generator().manual_seed(7919 * int(seed) + 17)
    index = R.resample(out.log_weights, "systematic", rng)
    resampled_guide = torch.gather(guide, 1, index)
    pick_resampled = torch.gather(index, 1, resampled_guide.argmax(1, keepdim=True)).squeeze(1)
    ancestors = torch.tensor([len(set(r)) for r in root_ancestors(out.ancestry).tolist()])
    return FKRun(
        final,
        out.best_index.cpu(),
        pick_resampled,
        out.log_weights,
        ancestors,
        out.particle_latents,
        out.num_model_evals,
        out.num_reward_evals,
        time.process_time() - start,
    )


# ----------------------------------------------------------------------------- rows
def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, index.view(-1, 1)).squeeze(1)


def method_metrics(final: Scores, pick: torch.Tensor) -> dict[str, Any]:
    """The returned samples' scores: all-correct rate, evaluator fraction, toy_clip, per attribute.

    Args:
        final: (P, N) scores of the particles.
        pick: (P,) the returned particle of each caption.

    Returns:
        A dict of means, plus ``per_caption_all_correct`` (P 0/1) for paired comparisons.
    """
    ac = _pick(final.all_correct.float(), pick)
    corr = final.correct.float().gather(1, pick.view(-1, 1, 1).expand(-1, 1, len(ATTRIBUTES))).squeeze(1)
    return {
        "all_correct": float(ac.mean()),
        "eval_score": float(_pick(final.evaluator, pick).mean()),
        "toy_clip": float(_pick(final.toy_clip, pick).mean()),
        **{f"acc_{a}": float(corr[:, i].mean()) for i, a in enumerate(ATTRIBUTES)},
        "per_caption_all_correct": [int(v) for v in ac.tolist()],
    }


def bon_rows(run: PlainRun, seed: int, captions_n: int, sizes: Sequence[int], common: dict) -> list[dict]:
    """Best-of-n rows (n in ``sizes``, for both guiding rewards) from the first n particles of a pool."""
    rows = []
    for n in sizes:
        sub = Scores(*(getattr(run.final, f)[:, :n] for f in ("toy_clip", "evaluator", "all_correct", "correct")))
        for reward in REWARDS:
            pick = sub.reward(reward).argmax(1)
            row = {
                "kind": "bon",
                **common,
                "reward": reward,
                "particles": n,
                "seed": seed,
                "captions": captions_n,
                "model_evals_per_caption": n * common["steps"],
                "reward_evals_per_caption": n,
                "particle_all_correct": float(sub.all_correct.float().mean()),
                "oracle_all_correct": float(sub.all_correct.any(1).float().mean()),
                "per_caption_particles_correct": [int(v) for v in sub.all_correct.sum(1).tolist()],
            }
            row.update(method_metrics(sub, pick))
            rows.append(row)
    return rows


def fk_row(run: FKRun, config: FKConfig, seed: int, captions_n: int, common: dict) -> dict:
    """One FK row: its pick, the pick after a final resampling, the particles' mean, diversity."""
    row = {"kind": "fk", **common, **config.key(), "seed": seed, "captions": captions_n}
    row.update(method_metrics(run.final, run.pick))
    resampled = method_metrics(run.final, run.pick_resampled)
    row.update({f"{k}_final_resample": v for k, v in resampled.items() if k != "per_caption_all_correct"})
    weights = run.log_weights.exp().float()
    row.update(
        particle_all_correct=float(run.final.all_correct.float().mean()),
        weighted_all_correct=float((weights * run.final.all_correct.float()).sum(1).mean()),
        oracle_all_correct=float(run.final.all_correct.any(1).float().mean()),
        distinct_ancestors=float(run.ancestors.float().mean()),
        model_evals_per_caption=run.model_evals // captions_n,
        reward_evals_per_caption=run.reward_evals // captions_n,
        cpu_s=round(run.cpu_s, 2),
    )
    return row


# ----------------------------------------------------------------------------- diagnosis
def _within(a: torch.Tensor) -> torch.Tensor:
    """Values centred on their caption's mean (dimension 1: the particles of one caption)."""
    return a - a.mean(1, keepdim=True)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def _ranks(a: torch.Tensor) -> torch.Tensor:
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(a.double().flatten().numpy())).double()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return _pearson(_ranks(a), _ranks(b))


def diagnose(run: PlainRun) -> dict[str, list]:
    """How much each step's x̂0 tells about the final sample, per step k.

    Args:
        run: a :class:`PlainRun` with ``keep_x0=True`` (n ≥ 2 particles per caption for the
            within-caption statistics).

    Returns:
        Lists over steps k of:

        - ``clip_spearman``: Spearman of toy_clip(x̂0_k) with toy_clip(final), pooled over every
          caption and particle (caption difficulty included);
        - ``clip_within``: the same as a within-caption Pearson (values centred per caption):
          what FK's resampling among one caption's particles can use;
        - ``clip_within_final_ac``: within-caption Pearson of toy_clip(x̂0_k) with the final
          all-correct verdict;
        - ``eval_spearman`` / ``eval_within``: the evaluator's fraction right on x̂0_k against
          the final all-correct verdict, pooled (Spearman) and within caption (Pearson);
        - ``agree``: how often x̂0_k's all-correct verdict equals the final one; ``decided``: how
          often it equals it at step k and at every later step; ``agree_<attribute>``: per attribute;
        - ``p_final_ok_if_ok`` / ``p_final_ok_if_not``: P(final all-correct | x̂0_k is / is not);
        - ``clip_sd_within``: the within-caption standard deviation of toy_clip(x̂0_k), which sets
          the scale of λ (λ·sd ≈ 1 tilts the weights by a factor e per sd);
        - ``eval_sd_within``: the same for the evaluator's fraction.
    """
    steps, final = run.steps, run.final
    s = steps.toy_clip.shape[-1]
    out: dict[str, list] = {k: [] for k in ("step", "clip_spearman", "clip_within", "clip_within_final_ac")}
    ac_f = final.all_correct.float()
    for k in range(s):
        ck, ek, ak = steps.toy_clip[..., k], steps.evaluator[..., k], steps.all_correct[..., k]
        later = (steps.all_correct[..., k:] == final.all_correct.unsqueeze(-1)).all(-1)
        stats = {
            "step": k,
            "clip_spearman": _spearman(ck, final.toy_clip),
            "clip_within": _pearson(_within(ck), _within(final.toy_clip)),
            "clip_within_final_ac": _pearson(_within(ck), _within(ac_f)),
            "eval_spearman": _spearman(ek, ac_f),
            "eval_within": _pearson(_within(ek), _within(ac_f)),
            "agree": float((ak == final.all_correct).float().mean()),
            "decided": float(later.float().mean()),
            **{
                f"agree_{a}": float((steps.correct[..., k, i] == final.correct[..., i]).float().mean())
                for i, a in enumerate(ATTRIBUTES)
            },
            "p_final_ok_if_ok": float(ac_f[ak].mean()) if bool(ak.any()) else float("nan"),
            "p_final_ok_if_not": float(ac_f[~ak].mean()) if bool((~ak).any()) else float("nan"),
            "clip_sd_within": float(_within(ck).pow(2).mean().sqrt() * math.sqrt(ck.shape[1] / (ck.shape[1] - 1))),
            "eval_sd_within": float(_within(ek).pow(2).mean().sqrt() * math.sqrt(ek.shape[1] / (ek.shape[1] - 1))),
        }
        for key, value in stats.items():
            out.setdefault(key, []).append(value)
    out["final_clip_within_final_ac"] = [_pearson(_within(final.toy_clip), _within(ac_f))]
    out["final_clip_sd_within"] = [float(_within(final.toy_clip).pow(2).mean().sqrt())]
    return out


# ----------------------------------------------------------------------------- results file
def row_key(row: dict) -> str:
    """The identity of a row: every configuration field, none of the measurements."""
    fields = (
        "kind",
        "sampler",
        "reward",
        "particles",
        "lam",
        "potential",
        "every",
        "range",
        "adaptive",
        "seed",
        "captions",
        "steps",
        "cfg",
        "eta",
        "pool",
    )
    return json.dumps({k: row.get(k) for k in fields}, sort_keys=True)


def load_rows(path: Path | str = RESULTS) -> list[dict]:
    """Every row of the results file (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_rows(rows: Sequence[dict], path: Path | str = RESULTS) -> None:
    """Appends rows as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- commands
def _common(args, **extra) -> dict:
    return {"steps": args.steps, "cfg": args.cfg, "eta": args.eta, "date": args.date, **extra}


def cmd_time(toy: Toy, args) -> None:
    """Times one FK configuration and one best-of-N pool on the requested captions."""
    prompts, seeds = captions(args.captions)
    config = FKConfig(args.reward, args.particles[0], args.lams[0], args.potentials[0], _every(args.every[0]))
    run = fk_run(toy, prompts, seeds, 0, config, chunk=args.chunk, **sampling_kwargs(args))
    print(f"{config.label()}, {len(prompts)} captions: {run.cpu_s:.1f} CPU s")
    plain = plain_run(toy, prompts, seeds, 0, args.particles[0], chunk=args.chunk, **sampling_kwargs(args))
    print(f"plain pool of {args.particles[0]}, {len(prompts)} captions: {plain.cpu_s:.1f} CPU s")


def cmd_diagnose(toy: Toy, args, done: set[str]) -> None:
    """Per-step informativeness of x̂0, for the SDE (FK's sampler) and the ODE."""
    prompts, cseeds = captions(args.captions)
    for sampler, n in (("sde", args.pool), ("ode", args.ode_particles)):
        for seed in args.seeds:
            common = _common(args, sampler=sampler, pool=n)
            key_row = {"kind": "diag", **common, "seed": seed, "captions": len(prompts)}
            if row_key(key_row) in done:
                continue
            kw = sampling_kwargs(args, sampler=sampler) | ({"eta": None} if sampler == "ode" else {})
            run = plain_run(toy, prompts, cseeds, seed, n, keep_x0=True, chunk=args.chunk, **kw)
            row = {**key_row, **diagnose(run), "cpu_s": round(run.cpu_s, 2)}
            if sampler == "sde":  # the pool doubles as best-of-N
                rows = bon_rows(run, seed, len(prompts), _sizes(n), _common(args, sampler="sde", pool=n))
                append_rows([r for r in rows if row_key(r) not in done], args.results)
                done.update(row_key(r) for r in rows)
            append_rows([row], args.results)
            done.add(row_key(row))
            print(f"diag {sampler} seed {seed}: {run.cpu_s:.1f} CPU s", flush=True)


def _sizes(pool: int) -> list[int]:
    return [n for n in (1, 2, 4, 8, 16) if n <= pool]


def cmd_bon(toy: Toy, args, done: set[str]) -> None:
    """Best-of-1/2/4/8 rows from one plain pool per seed."""
    prompts, cseeds = captions(args.captions)
    for seed in args.seeds:
        common = _common(args, sampler="sde", pool=args.pool)
        probe = {"kind": "bon", **common, "reward": "evaluator", "particles": args.pool, "seed": seed}
        if row_key({**probe, "captions": len(prompts)}) in done:
            continue
        run = plain_run(toy, prompts, cseeds, seed, args.pool, chunk=args.chunk, **sampling_kwargs(args))
        rows = [r for r in bon_rows(run, seed, len(prompts), _sizes(args.pool), common) if row_key(r) not in done]
        for r in rows:
            r["cpu_s"] = round(run.cpu_s, 2)
        append_rows(rows, args.results)
        done.update(row_key(r) for r in rows)
        print(f"bon pool {args.pool} seed {seed}: {run.cpu_s:.1f} CPU s", flush=True)


def _every(value: str) -> int | None:
    return None if str(value).lower() in ("none", "final") else int(value)


def cmd_fk(toy: Toy, args, done: set[str]) -> None:
    """Every FK configuration of the command line's grid, for every seed."""
    prompts, cseeds = captions(args.captions)
    rng = tuple(args.range) if args.range else None
    for n in args.particles:
        for lam in args.lams:
            for potential in args.potentials:
                for every in args.every:
                    config = FKConfig(args.reward, n, lam, potential, _every(every), rng, args.adaptive)
                    for seed in args.seeds:
                        row = {"kind": "fk", **_common(args, sampler="sde"), **config.key()}
                        row.update(seed=seed, captions=len(prompts))
                        if row_key(row) in done:
                            continue
                        run = fk_run(toy, prompts, cseeds, seed, config, chunk=args.chunk, **sampling_kwargs(args))
                        row = fk_row(run, config, seed, len(prompts), _common(args, sampler="sde"))
                        append_rows([row], args.results)
                        done.add(row_key(row))
                        print(
                            f"{config.label():40s} {args.reward:9s} seed {seed}: all-correct {row['all_correct']:.3f} "
                            f"(final resample {row['all_correct_final_resample']:.3f}), toy_clip {row['toy_clip']:.4f}, "
                            f"ancestors {row['distinct_ancestors']:.2f}, {run.cpu_s:.1f} CPU s",
                            flush=True,
                        )


# ----------------------------------------------------------------------------- report
def _ms(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def report(rows: Sequence[dict], captions_n: int | None = None, out=sys.stdout) -> None:
    """Prints the diagnosis and the FK-vs-best-of-N tables (Markdown) from result rows.

    Args:
        rows: rows of the results file.
        captions_n: only rows with this many captions (default: the most common).
        out: where to print.
    """
    if not rows:
        print("no rows yet", file=out)
        return
    if captions_n is None:
        captions_n = statistics.mode(r["captions"] for r in rows)
    rows = [r for r in rows if r["captions"] == captions_n]

    def p(line=""):
        print(line, file=out)

    for sampler in ("sde", "ode"):
        diags = [r for r in rows if r["kind"] == "diag" and r["sampler"] == sampler]
        if not diags:
            continue
        n_traj = sum(r["captions"] * r["pool"] for r in diags)
        p(
            f"\n### x̂0 at step k against the final sample ({sampler}, {n_traj} trajectories, seeds "
            f"{sorted(r['seed'] for r in diags)})\n"
        )
        cols = [
            ("clip_spearman", "toy_clip ρ (pooled)"),
            ("clip_within", "toy_clip r (within caption)"),
            ("clip_within_final_ac", "toy_clip vs final all-correct r (within)"),
            ("eval_spearman", "evaluator ρ vs final all-correct (pooled)"),
            ("eval_within", "evaluator r (within)"),
            ("agree", "verdict agrees"),
            ("decided", "verdict decided"),
            ("agree_color", "colour agrees"),
            ("agree_shape", "shape agrees"),
            ("agree_position", "position agrees"),
            ("clip_sd_within", "toy_clip sd within caption"),
        ]
        p("| step k | " + " | ".join(c[1] for c in cols) + " |")
        p("|---:|" + "---:|" * len(cols))
        for k in range(len(diags[0]["step"])):
            vals = []
            for key, _ in cols:
                v = statistics.mean(r[key][k] for r in diags)
                vals.append(f"{v:.4f}" if key == "clip_sd_within" else f"{v:.2f}")
            p(f"| {k + 1} | " + " | ".join(vals) + " |")
        fin = statistics.mean(r["final_clip_within_final_ac"][0] for r in diags)
        sd = statistics.mean(r["final_clip_sd_within"][0] for r in diags)
        p(f"\nfinal sample: toy_clip vs all-correct within caption r = {fin:.2f}; toy_clip sd within caption {sd:.4f}")

    bons = [r for r in rows if r["kind"] == "bon"]
    fks = [r for r in rows if r["kind"] == "fk"]
    bon_by = {}
    for r in bons:
        bon_by.setdefault((r["reward"], r["particles"]), {})[r["seed"]] = r
    if bons:
        p(f"\n### Best-of-N ({captions_n} captions; mean ± sd over seeds)\n")
        p("| reward | N | seeds | all-correct | toy_clip | any particle all-correct |")
        p("|---|---:|---:|---:|---:|---:|")
        for (reward, n), by in sorted(bon_by.items()):
            rs = list(by.values())
            p(
                f"| {reward} | {n} | {len(rs)} | {_ms([r['all_correct'] for r in rs])} | "
                f"{_ms([r['toy_clip'] for r in rs], '{:.4f}')} | {_ms([r['oracle_all_correct'] for r in rs])} |"
            )
    if not fks:
        return
    groups: dict[str, list[dict]] = {}
    for r in fks:
        c = FKConfig(
            r["reward"],
            r["particles"],
            r["lam"],
            r["potential"],
            r["every"],
            tuple(r["range"]) if r["range"] else None,
            r.get("adaptive", False),
        )
        groups.setdefault(json.dumps(c.key(), sort_keys=True), []).append(r)
    p(
        f"\n### FK against best-of-N at equal denoiser evaluations ({captions_n} captions; mean ± sd over seeds; "
        "Δ = FK − best-of-N on the same seeds)\n"
    )
    p(
        "| guiding reward | FK config | seeds | FK all-correct | best-of-N all-correct | **Δ all-correct** | "
        "Δ with final resample | FK toy_clip | best-of-N toy_clip | mean particle all-correct (FK / plain) | "
        "distinct ancestors | captions only FK / only best-of-N got right | reward evals / caption |"
    )
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(groups, key=lambda k: (json.loads(k)["reward"], json.loads(k)["particles"], k)):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        c = json.loads(key)
        bon = bon_by.get((c["reward"], c["particles"]), {})
        paired = [(r, bon[r["seed"]]) for r in rs if r["seed"] in bon]
        d = [a["all_correct"] - b["all_correct"] for a, b in paired]
        dr = [a["all_correct_final_resample"] - b["all_correct"] for a, b in paired]
        flips = [(x, y) for a, b in paired for x, y in zip(a["per_caption_all_correct"], b["per_caption_all_correct"])]
        only_fk, only_bon = sum(x > y for x, y in flips), sum(x < y for x, y in flips)
        cfg = FKConfig(
            c["reward"],
            c["particles"],
            c["lam"],
            c["potential"],
            c["every"],
            tuple(c["range"]) if c["range"] else None,
            c["adaptive"],
        )
        p(
            f"| {c['reward']} | {cfg.label()} | {len(rs)} | {_ms([r['all_correct'] for r in rs])} | "
            f"{_ms([b['all_correct'] for _, b in paired])} | **{_ms(d, '{:+.3f}')}** | {_ms(dr, '{:+.3f}')} | "
            f"{_ms([r['toy_clip'] for r in rs], '{:.4f}')} | {_ms([b['toy_clip'] for _, b in paired], '{:.4f}')} | "
            f"{_ms([r['particle_all_correct'] for r in rs])} / {_ms([b['particle_all_correct'] for _, b in paired])} | "
            f"{_ms([r['distinct_ancestors'] for r in rs], '{:.2f}')} | {only_fk} / {only_bon} | "
            f"{rs[0]['reward_evals_per_caption']} |"
        )


def cmd_report(args) -> None:
    """Prints the tables of the results file."""
    report(load_rows(args.results), args.captions)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["time", "diagnose", "bon", "fk", "report"])
    parser.add_argument("--captions", type=int, default=None, help="captions of eval_set (default 96; report: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reward", choices=REWARDS, default="toy_clip", help="FK's guiding reward")
    parser.add_argument("--particles", type=int, nargs="+", default=[4])
    parser.add_argument("--lams", type=float, nargs="+", default=[10.0])
    parser.add_argument("--potentials", nargs="+", default=["max"], choices=["max", "add", "diff", "rt"])
    parser.add_argument("--every", nargs="+", default=["3"], help="resample_every values; 'none' = final step only")
    parser.add_argument("--range", type=int, nargs=2, default=None, metavar=("T_START", "T_END"))
    parser.add_argument("--adaptive", action="store_true", help="resample only when ESS < N/2")
    parser.add_argument("--pool", type=int, default=8, help="particles per caption of the best-of-N pool")
    parser.add_argument("--ode-particles", type=int, default=2, help="particles per caption of the ODE diagnosis")
    parser.add_argument("--steps", type=int, default=SAMPLING["num_steps"])
    parser.add_argument("--cfg", type=float, default=SAMPLING["guidance_scale"])
    parser.add_argument("--eta", type=float, default=SAMPLING["eta"])
    parser.add_argument("--chunk", type=int, default=96, help="rows per denoiser call (max_batch_size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--results", default=str(RESULTS))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs one command of the benchmark."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "report":
        cmd_report(args)
        return
    args.captions = args.captions or 96
    from visalign.quiet import quiet_library_notices

    quiet_library_notices()
    toy = load_toy()
    done = {row_key(r) for r in load_rows(args.results)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    if args.what == "time":
        cmd_time(toy, args)
    elif args.what == "diagnose":
        cmd_diagnose(toy, args, done)
    elif args.what == "bon":
        cmd_bon(toy, args, done)
    elif args.what == "fk":
        cmd_fk(toy, args, done)


if __name__ == "__main__":
    main()
