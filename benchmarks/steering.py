"""Steering benchmarks: FK steering's overhead over plain sampling, and FK against best-of-N.

    python benchmarks/steering.py --threads 1                        # both, every tiny family, CPU
    python benchmarks/steering.py overhead --families sd3 flux --repeats 9
    python benchmarks/steering.py compare --families sd3 --seeds 16 --lam 30

**overhead**: for P prompts × N particles and S steps, times, interleaved,

- ``plain``: ``va.sample(policy, prompts, group_size=N)`` (the same P·N particles, decoded);
- ``best-of-N``: ``va.best_of_n`` (plain sampling plus one reward call on the outputs);
- ``fk``: ``va.fk_steer`` with rewards every ``--every`` steps (decode x̂0 + reward + resample),

and prints the medians (CPU seconds of the process, which other jobs on a shared machine do not
inflate; run with ``--threads 1``) and fk/plain, fk/best-of-N, plus the wall-clock fk/plain. All
three run P·N·S denoiser evaluations; FK adds one decode + reward of every particle per reward
step. It also measures the unit costs (prompt encoding, one denoiser step, one decode, one reward
call) and the overhead they predict: the same formula with another model's unit costs predicts its
overhead (on tiny models the VAE is as costly as the denoiser; on large ones it is not). The reward is a tiny
CLIPScore (segmental over frames for video), so the decode/preprocess/score path is the real one.

**compare**: :func:`compare_fk_best_of_n` runs FK with N particles and best-of-N with n = N at
equal denoiser evaluations (N·S per prompt), same sampler and seeds, and reports the mean reward
of the returned sample, FK's win rate, and, when an ``evaluate`` function is given, its score of
both outputs. It takes any policy and reward, so the toy world's models plug in unchanged.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

FAMILIES = ["sd", "sdxl", "sd3", "flux", "wan-t2v", "wan-i2v"]


def redness(images, prompts):
    """Mean red minus mean green/blue (over all frames of a video): a reward tiny random models
    can be steered on."""
    return images[..., 0, :, :].flatten(1).mean(1) - images[..., 1:, :, :].flatten(1).mean(1)


def _setup(family: str, seed: int = 0):
    import visalign as va
    from visalign.testing import tiny_pipeline
    from visalign.testing.pipelines import DEFAULT_SIZES

    policy = va.wrap(tiny_pipeline(family, seed=seed))
    size = {k: v for k, v in DEFAULT_SIZES[family].items() if v is not None}
    return policy, size


def _frames(policy, size, num_prompts: int):
    if not policy.needs_image:
        return None
    g = torch.Generator().manual_seed(0)
    return torch.rand(num_prompts, 3, size["height"], size["width"], generator=g)


def _clip_reward(video: bool):
    from visalign.rewards import CLIPScore, SegmentalVideoReward
    from visalign.testing import tiny_clip

    model, processor = tiny_clip(seed=0)
    reward = CLIPScore(model, processor)
    return SegmentalVideoReward(reward, segments=2, sampling="fixed") if video else reward


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_overhead(family: str, args) -> dict:
    import visalign as va

    policy, size = _setup(family)
    reward = _clip_reward(policy.is_video)
    prompts = [f"a red circle {i}" for i in range(args.prompts)]
    images = _frames(policy, size, len(prompts))
    common = dict(num_steps=args.steps, images=images, **size)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    runs = {
        "plain": lambda: va.sample(policy, prompts, group_size=args.particles, generator=gen(), **common),
        "best_of_n": lambda: va.best_of_n(policy, prompts, reward, n=args.particles, generator=gen(), **common),
        "fk": lambda: va.fk_steer(
            policy,
            prompts,
            reward,
            num_particles=args.particles,
            lam=10.0,
            resample_every=args.every,
            generator=gen(),
            **common,
        ),
    }
    for fn in runs.values():  # warm-up
        fn()
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(args.repeats):
        for key, fn in runs.items():
            w, c = _timed(fn)
            wall[key].append(w)
            cpu[key].append(c)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    med.update(_unit_costs(policy, prompts, reward, args, images, size))
    return {
        "family": family,
        **med,
        "fk_plain": med["fk"] / med["plain"],
        "fk_bon": med["fk"] / med["best_of_n"],
        "wall_fk_plain": statistics.median(wall["fk"]) / statistics.median(wall["plain"]),
    }


def _unit_costs(policy, prompts, reward, args, images, size) -> dict:
    """CPU seconds of the prompt encoding (P prompts), and of one denoiser step, one decode and one
    reward call on the P·N particles."""
    from visalign.rewards import call_reward
    from visalign.sampling.prepare import prepare_sampling

    setup = prepare_sampling(policy, prompts, args.steps, images=images, group_size=args.particles, **size)
    t = setup.schedule.timesteps[0]

    def cost(fn):
        fn()
        return statistics.median(_timed(fn)[1] for _ in range(args.repeats))

    with torch.no_grad():
        pixels = policy.decode(setup.latents, setup.geometry)
        return {
            "encode": cost(lambda: policy.encode_prompt(prompts, None, None, images=images, geometry=setup.geometry)),
            "step": cost(lambda: policy.predict(setup.latents, t, setup.conditioning)),
            "decode": cost(lambda: policy.decode(setup.latents, setup.geometry)),
            "reward": cost(lambda: call_reward(reward, pixels, setup.prompts)),
        }


def predicted_overhead(
    encode: float, step: float, decode: float, reward: float, num_steps: int, reward_evals: int
) -> float:
    """FK / plain from unit costs: plain = encode + S·step + decode; FK adds (R−1) decodes and R rewards."""
    plain = encode + num_steps * step + decode
    return (plain + (reward_evals - 1) * decode + reward_evals * reward) / plain


def compare_fk_best_of_n(
    policy,
    prompts: Sequence[str],
    reward: Any,
    num_particles: int = 4,
    num_steps: int = 20,
    seeds: Sequence[int] = range(8),
    lam: float = 10.0,
    potential: str = "max",
    resample_every: int = 5,
    evaluate: Callable | None = None,
    **sample_kwargs,
) -> dict:
    """FK steering with N particles against best-of-N (n = N) at equal denoiser evaluations.

    Both use the same sampler and options (``sample_kwargs``: ``sampler``, ``eta``, ``images``,
    ``height``, ...) and the same seed per trial, so each trial compares the two on the same
    initial-noise stream.

    Args:
        policy: any :class:`visalign.Policy` (tiny test models, the toy world's models, real ones).
        prompts: the prompts of one trial.
        reward: what both methods maximise.
        num_particles: N, for both.
        num_steps: S; both run P·N·S denoiser evaluations per trial.
        seeds: one trial per seed.
        lam, potential, resample_every: FK's settings.
        evaluate: optional ``(images, prompts) -> Tensor[P]`` held-out score of the returned samples
            (e.g. the toy world's exact evaluator).

    Returns:
        dict with ``fk_reward``, ``bon_reward`` (means over trials and prompts), ``fk_win_rate``
        (fraction of prompt-trials where FK's sample has the higher reward, ties half),
        ``fk_eval``/``bon_eval`` when ``evaluate`` is given, ``model_evals`` per method per trial, and
        the per-trial lists.
    """
    import visalign as va

    fk_r, bon_r, fk_e, bon_e, wins = [], [], [], [], []
    evals = None
    for seed in seeds:
        fk = va.fk_steer(
            policy,
            prompts,
            reward,
            num_particles=num_particles,
            num_steps=num_steps,
            lam=lam,
            potential=potential,
            resample_every=resample_every,
            generator=torch.Generator().manual_seed(seed),
            **sample_kwargs,
        )
        bon = va.best_of_n(
            policy,
            prompts,
            reward,
            n=num_particles,
            num_steps=num_steps,
            generator=torch.Generator().manual_seed(seed),
            **sample_kwargs,
        )
        assert fk.num_model_evals == bon.num_model_evals
        evals = fk.num_model_evals
        fk_r.append(fk.rewards.float().cpu())
        bon_r.append(bon.rewards.float().cpu())
        wins.append((fk.rewards > bon.rewards).float().cpu() + 0.5 * (fk.rewards == bon.rewards).float().cpu())
        if evaluate is not None:
            fk_e.append(torch.as_tensor(evaluate(fk.images, list(prompts))).float().cpu())
            bon_e.append(torch.as_tensor(evaluate(bon.images, list(prompts))).float().cpu())
    out = {
        "fk_reward": float(torch.cat(fk_r).mean()),
        "bon_reward": float(torch.cat(bon_r).mean()),
        "fk_win_rate": float(torch.cat(wins).mean()),
        "model_evals": evals,
        "trials": len(list(seeds)),
        "fk_rewards": fk_r,
        "bon_rewards": bon_r,
    }
    if evaluate is not None:
        out.update(fk_eval=float(torch.cat(fk_e).mean()), bon_eval=float(torch.cat(bon_e).mean()))
    return out


def run_overhead(args) -> None:
    print(
        f"\nFK overhead: {args.prompts} prompts x {args.particles} particles, {args.steps} steps, rewards every "
        f"{args.every} steps (tiny CLIPScore; segmental on video), median of {args.repeats} interleaved runs"
    )
    print("CPU seconds of this process (robust to other jobs on a shared machine); last column: the wall-clock ratio")
    print("unit costs: prompt encoding, one denoiser step (CFG included), one VAE decode and one reward call on all")
    print("particles; 'predicted' = (enc + S·step + R·decode + R·reward) / (enc + S·step + decode), R = reward")
    print("evaluations including the final one")
    from visalign.steering import reward_steps

    evals = len(reward_steps(args.steps, args.every)) + 1
    print(
        f"{'family':10s} {'plain s':>8s} {'bestofN s':>9s} {'fk s':>8s} {'fk/plain':>9s} {'fk/bestofN':>10s} "
        f"{'wall fk/plain':>13s} {'encode s':>9s} {'step s':>8s} {'decode s':>9s} {'reward s':>9s} {'predicted':>9s}"
    )
    for family in args.families:
        r = bench_overhead(family, args)
        pred = predicted_overhead(r["encode"], r["step"], r["decode"], r["reward"], args.steps, evals)
        print(
            f"{family:10s} {r['plain']:8.3f} {r['best_of_n']:9.3f} {r['fk']:8.3f} {r['fk_plain']:9.3f} "
            f"{r['fk_bon']:10.3f} {r['wall_fk_plain']:13.3f} {r['encode']:9.4f} {r['step']:8.4f} {r['decode']:9.4f} "
            f"{r['reward']:9.4f} {pred:9.3f}",
            flush=True,
        )


def run_compare(args) -> None:
    print(
        f"\nFK ({args.particles} particles, lam {args.lam}, potential max, rewards every {args.every}) vs "
        f"best-of-{args.particles}, equal model evaluations, reward = redness, {args.seeds} seeds x "
        f"{args.prompts} prompts, {args.steps} steps"
    )
    print(f"{'family':10s} {'fk reward':>10s} {'bestofN':>10s} {'fk wins':>8s} {'evals':>6s}")
    for family in args.families:
        policy, size = _setup(family)
        prompts = [f"a red circle {i}" for i in range(args.prompts)]
        r = compare_fk_best_of_n(
            policy,
            prompts,
            redness,
            num_particles=args.particles,
            num_steps=args.steps,
            seeds=range(args.seeds),
            lam=args.lam,
            resample_every=args.every,
            images=_frames(policy, size, len(prompts)),
            **size,
        )
        print(
            f"{family:10s} {r['fk_reward']:10.4f} {r['bon_reward']:10.4f} {r['fk_win_rate']:8.2f} "
            f"{r['model_evals']:6d}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["all", "overhead", "compare"])
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--lam", type=float, default=300.0, help="FK's lambda in `compare` (redness spans ~0.01)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.what in ("all", "overhead"):
        run_overhead(args)
    if args.what in ("all", "compare"):
        run_compare(args)


if __name__ == "__main__":
    main()
