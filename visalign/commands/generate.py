"""``visalign sample`` and ``visalign steer``: generate from a model, plainly or steered by a reward."""

from __future__ import annotations

import json
import os
import time

from visalign.commands.common import (
    fill_tiny_sizes,
    gather_prompts,
    load_policy_for_cli,
    reward_from_spec,
    save_outputs,
    seeded_generators,
)
from visalign.commands.flags import sampling_kwargs_from_args

STEER_METHODS = ("fk", "best-of-n", "guidance")
DEFAULT_PARTICLES = {"fk": 4, "best-of-n": 4, "guidance": 1}


def cmd_sample(args) -> int:
    import visalign as va

    prompts = gather_prompts(args)
    fill_tiny_sizes(args)
    policy = load_policy_for_cli(args.model, args.dtype, args.device, args.lora, args.attention_backend)
    generator = seeded_generators(policy.device, args.seed, len(prompts) * args.num)
    start = time.perf_counter()
    traj = va.sample(policy, prompts, group_size=args.num, progress=True, **sampling_kwargs_from_args(args, generator))
    seconds = time.perf_counter() - start
    _, paths = save_outputs(traj.images, list(traj.prompts), args.out, upscale=args.upscale)
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump({"prompts": traj.prompts, "seconds": seconds, "sampler": args.sampler}, f, indent=2)
    print(f"Sampled {traj.batch_size} in {seconds:.2f} s; wrote {', '.join(paths)}")
    return 0


def cmd_steer(args) -> int:
    """Inference-time steering with a reward: FK particles, best-of-N or reward-gradient guidance."""
    import csv

    import torch

    import visalign as va

    prompts = gather_prompts(args)
    reward = reward_from_spec(args.reward)
    fill_tiny_sizes(args)
    policy = load_policy_for_cli(args.model, args.dtype, args.device, args.lora, args.attention_backend)
    n = args.particles if args.particles is not None else DEFAULT_PARTICLES[args.method]
    num_prompts = len(prompts)
    common = dict(
        sampling_kwargs_from_args(args, seeded_generators(policy.device, args.seed, num_prompts * n)),
        max_batch_size=args.max_batch_size,
    )
    options: dict = {"particles": n}
    start = time.perf_counter()
    if args.method == "fk":
        resample_every = args.resample_every or None
        options.update(
            potential=args.potential,
            lam=args.lam,
            resample_every=resample_every,
            adaptive=args.adaptive,
            ess_threshold=args.ess_threshold,
            resampler=args.resampler,
        )
        out = va.fk_steer(
            policy,
            prompts,
            reward,
            num_particles=n,
            potential=args.potential,
            lam=args.lam,
            resample_every=resample_every,
            adaptive=args.adaptive,
            ess_threshold=args.ess_threshold,
            resampler=args.resampler,
            return_particles=False,
            progress=True,
            **common,
        )
        chosen, rewards, all_rewards = out.images, out.rewards, out.particle_rewards
        options.update(
            reward_steps=out.reward_steps,
            final_ess=[round(float(e), 4) for e in out.ess[:, -1]],
            num_model_evals=out.num_model_evals,
            num_reward_evals=out.num_reward_evals,
        )
    elif args.method == "best-of-n":
        out = va.best_of_n(policy, prompts, reward, n=n, return_all=False, **common)
        chosen, rewards, all_rewards = out.images, out.rewards, out.all_rewards
        options.update(num_model_evals=out.num_model_evals)
    else:
        steps = tuple(args.guidance_steps) if args.guidance_steps else None
        options.update(
            grad_scale=args.grad_scale,
            guidance_steps=steps,
            through_model=not args.detach_model,
            normalize_grad=args.normalize_grad,
        )
        out = va.reward_guidance(
            policy,
            prompts,
            reward,
            scale=args.grad_scale,
            guidance_steps=steps,
            num_samples=n,
            through_model=not args.detach_model,
            normalize_grad=args.normalize_grad,
            progress=True,
            **common,
        )
        all_rewards = out.rewards.view(num_prompts, n)
        pick = torch.arange(num_prompts, device=all_rewards.device) * n + all_rewards.argmax(dim=1)
        chosen, rewards = out.images[pick.to(out.images.device)], out.rewards[pick]
        options.update(guided_steps=out.guided_steps)
    seconds = time.perf_counter() - start

    rewards = [float(r) for r in rewards]
    names, paths = save_outputs(chosen, prompts, args.out, upscale=args.upscale)
    with open(os.path.join(args.out, "steer.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "prompt", "reward"])
        writer.writerows(zip(names, prompts, rewards))
    mean = sum(rewards) / len(rewards)
    record = {
        "model": args.model,
        "method": args.method,
        "reward": args.reward,
        "prompts": prompts,
        "files": names,
        "rewards": rewards,
        "all_rewards": all_rewards.float().cpu().tolist(),
        "mean_reward": mean,
        "seconds": seconds,
        "seed": args.seed,
        "num_steps": args.num_steps,
        "sampler": args.sampler,
        "guidance_scale": args.guidance_scale,
        **options,
    }
    with open(os.path.join(args.out, "steer.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(
        f"Steered {num_prompts} prompt(s) with {args.method} ({n} per prompt, {args.num_steps} steps): "
        f"mean reward {mean:.4f} in {seconds:.2f} s; wrote {', '.join(paths)}, steer.json, steer.csv"
    )
    return 0
