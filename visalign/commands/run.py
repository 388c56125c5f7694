"""``visalign train``, ``score``, ``serve-reward``, ``demo`` and ``plan``: the commands that run a recipe,
score a folder, serve a reward, run the demo or plan a run.
"""

from __future__ import annotations

import json
import os

from visalign.commands.common import MEDIA_SUFFIXES, prompts_for, read_media, reward_from_spec


def cmd_train(args) -> int:
    """Runs the recipe's algorithm; works the same under ``accelerate launch -m visalign train ...``."""
    from visalign.recipes import load_recipe

    trainer_class, policy, reward, prompts, config = load_recipe(args.recipe, args.overrides)
    trainer = trainer_class(policy, reward, prompts, config)
    trainer.train()
    if config.use_lora:
        trainer.save_lora(os.path.join(config.output_dir, "lora"))
    else:
        trainer.save_pretrained(os.path.join(config.output_dir, "model"))
    if trainer.is_main_process:
        print(f"Done: {config.output_dir} (metrics.jsonl, checkpoints/, {'lora/' if config.use_lora else 'model/'})")
    return 0


def cmd_score(args) -> int:
    """Scores every image or video in a folder against its prompt and writes a CSV."""
    import csv

    import torch

    from visalign.errors import InvalidInputError
    from visalign.rewards import call_reward

    if not os.path.isdir(args.folder):
        what = "is a file, not a folder" if os.path.exists(args.folder) else "does not exist"
        raise InvalidInputError(
            f"{args.folder} {what}; pass a folder of images or videos with their prompts, e.g. "
            "the --out folder of `visalign sample` or `visalign steer`."
        )
    files = sorted(f for f in os.listdir(args.folder) if os.path.splitext(f)[1].lower() in MEDIA_SUFFIXES)
    if not files:
        raise InvalidInputError(f"{args.folder} holds no images or videos ({', '.join(MEDIA_SUFFIXES)}).")
    files, prompts, skipped = prompts_for(args.folder, files, args.prompts)
    if skipped:
        print(f"Skipping {len(skipped)} file(s) with no prompt in the prompts table: {', '.join(skipped[:5])}")
    reward = reward_from_spec(args.reward)
    out_path = args.out or os.path.join(args.folder, "rewards.csv")
    rows = []
    for start in range(0, len(files), args.batch_size):
        names = files[start : start + args.batch_size]
        media = [read_media(os.path.join(args.folder, n)) for n in names]
        shapes = {tuple(m.shape) for m in media}
        batches = [torch.stack(media)] if len(shapes) == 1 else [m.unsqueeze(0) for m in media]
        offset = 0
        for batch in batches:
            batch_prompts = prompts[start + offset : start + offset + batch.shape[0]]
            with torch.no_grad():
                result = call_reward(reward, batch, batch_prompts)
            for i in range(batch.shape[0]):
                row = {"file": names[offset + i], "prompt": batch_prompts[i], "reward": float(result.total[i])}
                row.update({f"reward/{k}": float(v[i]) for k, v in result.components.items()})
                rows.append(row)
            offset += batch.shape[0]
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mean = sum(r["reward"] for r in rows) / len(rows)
    print(f"Scored {len(rows)} files (mean reward {mean:.4f}); wrote {out_path}")
    return 0


def cmd_serve_reward(args) -> int:
    """Serves the reward SPEC names until interrupted (:func:`visalign.rewards.server.serve`)."""
    from visalign.errors import ConfigError
    from visalign.rewards.server import api_key_from_env, check_bind, load_reward, serve

    if args.max_body_mb <= 0:
        raise ConfigError(f"--max-body-mb must be positive; got {args.max_body_mb}.")
    api_key = api_key_from_env(args.api_key_env)
    if api_key is None and args.api_key_env != "VISALIGN_REWARD_API_KEY":
        raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty).")
    check_bind(args.host, api_key, args.api_key_env)  # before loading a model that may take minutes
    serve(
        load_reward(args.spec),
        args.host,
        args.port,
        api_key=api_key,
        api_key_env=args.api_key_env,
        max_body_bytes=int(args.max_body_mb * 2**20),
        device=args.device,
        log_level=args.log_level,
    )
    return 0


def cmd_demo(args) -> int:
    """Runs the offline demo (:func:`visalign.demo.run_demo`) and prints where its report is."""
    from visalign.demo import run_demo

    path = run_demo(
        out_dir=args.out,
        seed=args.seed,
        max_steps=args.max_steps,
        eval_every=args.eval_every,
        num_eval_prompts=args.eval_prompts,
        algorithm=args.algorithm,
    )
    print(f"Report: {path}")
    return 0


def cmd_plan(args) -> int:
    """Prints a recipe's per-GPU memory and FLOPs (visalign.plan); loads no weights, downloads nothing."""
    from visalign.pipelines.attention import resolve_attention_backend
    from visalign.plan import format_plan, make_plan, workload_from_recipe

    backend = resolve_attention_backend(args.attention_backend)  # a flash-style kernel either way (see plan.py)
    workload = workload_from_recipe(args.recipe, args.overrides, architecture=args.architecture)
    strategies = (args.strategy,) if args.strategy else (("ddp", "fsdp") if args.gpus > 1 else ("ddp",))
    plan = make_plan(workload, gpus=args.gpus, strategies=strategies, accelerate_config=args.accelerate_config)
    print(format_plan(plan) + f"\nattention backend: {backend}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "workload": vars(workload),
                    "gpus": plan.gpus,
                    "measured": plan.measured,
                    "bytes": plan.rows,
                    "flops": plan.flops,
                    "notes": plan.notes,
                    "host_bytes": plan.host_bytes,
                },
                f,
                indent=2,
                default=str,
            )
    return 0
