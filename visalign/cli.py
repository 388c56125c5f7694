"""The ``visalign`` command line.

    visalign demo                         # the offline demo (see README)
    visalign sample MODEL -p "a red circle" -p "a blue square" --steps 20 --out runs/sample

``MODEL`` is a hub id, a local pipeline folder, or ``tiny:FAMILY`` for a tiny random pipeline from
:mod:`visalign.testing` (e.g. ``tiny:sd3``). Every command also runs as ``python -m visalign``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _load_policy(model: str, dtype: str | None = None):
    import torch

    import visalign as va

    if model.startswith("tiny:"):
        from visalign.testing import tiny_pipeline

        return va.wrap(tiny_pipeline(model.split(":", 1)[1]))
    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    return va.load(model, **kwargs)


def _save_outputs(traj, out_dir: str, upscale: int = 1) -> list[str]:
    from visalign.media import save_image_grid, save_video

    os.makedirs(out_dir, exist_ok=True)
    if traj.images.ndim == 5:
        return [save_video(video, os.path.join(out_dir, f"sample_{i:03d}.mp4")) for i, video in enumerate(traj.images)]
    return [save_image_grid(traj.images, os.path.join(out_dir, "grid.png"), upscale=upscale)]


def cmd_sample(args) -> int:
    import torch

    import visalign as va

    policy = _load_policy(args.model, args.dtype)
    generator = [torch.Generator(policy.device).manual_seed(args.seed + i) for i in range(len(args.prompt) * args.num)]
    start = time.perf_counter()
    traj = va.sample(policy, args.prompt, num_steps=args.steps, guidance_scale=args.guidance_scale,
                     sampler=args.sampler, eta=args.eta, group_size=args.num, generator=generator,
                     height=args.height, width=args.width, num_frames=args.num_frames, progress=True)
    seconds = time.perf_counter() - start
    paths = _save_outputs(traj, args.out, upscale=args.upscale)
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump({"prompts": traj.prompts, "seconds": seconds, "sampler": args.sampler}, f, indent=2)
    print(f"Sampled {traj.batch_size} in {seconds:.2f} s; wrote {', '.join(paths)}")
    return 0


def cmd_demo(args) -> int:
    """Samples a tiny random SD3-style pipeline and writes a PNG grid (offline, seconds)."""
    args.model, args.prompt = "tiny:sd3", ["a red circle on the left", "a blue square on the right"]
    args.steps, args.guidance_scale, args.sampler, args.eta, args.num = 8, 4.0, "sde", None, 4
    args.height = args.width = 32
    args.num_frames, args.dtype, args.upscale = None, None, 4
    return cmd_sample(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visalign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the offline demo and write its outputs")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    demo.set_defaults(func=cmd_demo)

    sample = sub.add_parser("sample", help="sample images or videos from a model")
    sample.add_argument("model", help="hub id, local pipeline folder, or tiny:FAMILY")
    sample.add_argument("-p", "--prompt", action="append", required=True, help="a prompt (repeatable)")
    sample.add_argument("--num", type=int, default=1, help="samples per prompt (default: 1)")
    sample.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    sample.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the family's)")
    sample.add_argument("--sampler", default="ode", choices=["ode", "sde", "cps", "ddim"], help="sampler (default: ode)")
    sample.add_argument("--eta", type=float, default=None, help="noise level of stochastic samplers")
    sample.add_argument("--height", type=int, default=None, help="image height (default: the family's)")
    sample.add_argument("--width", type=int, default=None, help="image width (default: the family's)")
    sample.add_argument("--num-frames", type=int, default=None, help="video frames (video families)")
    sample.add_argument("--dtype", default=None, help="torch dtype to load with, e.g. bfloat16")
    sample.add_argument("--seed", type=int, default=0, help="base seed; sample i uses seed+i (default: 0)")
    sample.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscale of the PNG grid")
    sample.add_argument("--out", default="runs/sample", help="output folder (default: runs/sample)")
    sample.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
