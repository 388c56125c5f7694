"""The ``visalign`` command line.

    visalign demo                                   # the offline demo: DRaFT on the toy world, with a report
    visalign train configs/toy_grpo.yaml max_steps=20 learning_rate=1e-3
    visalign sample toy:t2i -p "a red circle on the left" -p "a blue square on the right" --num 4 --out runs/sample
    visalign score runs/sample --reward toy_clip     # a folder of images/videos → rewards.csv
    visalign steer toy:t2i -p "a red circle on the left" --method fk --reward toy_clip --particles 8 --out runs/steer
    visalign steer toy:t2i -p "a red circle on the left" --method guidance --reward toy_clip --grad-scale 0.5
    accelerate launch -m visalign train configs/sd35m_grpo.yaml     # the same, on several GPUs

``MODEL`` is a hub id, a local pipeline folder, ``toy:NAME`` for a model shipped in the package
(``toy:t2i``, see visalign/toy/MODELS.md) or ``tiny:FAMILY`` for a tiny random pipeline from
:mod:`visalign.testing` (e.g. ``tiny:sd3``). A reward (``--reward``) is a type name such as
``CLIPScore``, ``PickScore``, ``toy_clip``, ``toy_evaluator`` or ``brightness``, or a JSON spec as
in a recipe's ``reward:`` (``'{"type": "CLIPScore", "model": "openai/clip-vit-large-patch14"}'``).
Every command also runs as ``python -m visalign``.
"""

from __future__ import annotations

import argparse
import os
import sys

from visalign.commands.flags import add_attention_backend_option, add_sampling_options
from visalign.commands.generate import STEER_METHODS, cmd_sample, cmd_steer
from visalign.commands.run import cmd_demo, cmd_plan, cmd_score, cmd_serve_reward, cmd_train

MODEL_HELP = "hub id, local pipeline folder, toy:NAME (a shipped toy model, e.g. toy:t2i) or tiny:FAMILY"


def _add_generation_options(parser: argparse.ArgumentParser, out_default: str, **sampling_defaults) -> None:
    """The model, prompt and sampling options that ``sample`` and ``steer`` share."""
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("-p", "--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts-file",
        default=None,
        help="more prompts from a .txt (one per line), .csv or .jsonl with a `prompt` column",
    )
    add_sampling_options(parser, **sampling_defaults)
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height in pixels (default: the family's; 32 for tiny: and toy: models)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="image width in pixels (default: the family's; 32 for tiny: and toy: models)",
    )
    parser.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="video frames (video families; default: the family's, 5 for tiny:wan-*)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample row i uses seed+i (default: 0)")
    parser.add_argument(
        "--dtype", default=None, help="torch dtype to load the model with, e.g. bfloat16 (default: fp32)"
    )
    parser.add_argument(
        "--device", default=None, help="device to run on, e.g. cuda:1 (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--lora", default=None, help="LoRA folder to load into the model first (e.g. a training run's OUTPUT_DIR/lora)"
    )
    add_attention_backend_option(parser)
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscale of the PNG grid (default: 1)")
    parser.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run the offline demo (DRaFT, or GRPO, on the toy world) and write its report",
        description="Runs the offline demo on the shipped toy models and prints the report's path.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    demo.add_argument(
        "--algorithm",
        choices=["draft", "grpo"],
        default="draft",
        help="the trainer: draft (reward backprop, the default: the clearest gain in a few CPU minutes) or grpo",
    )
    demo.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="training iterations of the demo (default: the demo's own, sized for a few CPU minutes)",
    )
    demo.add_argument(
        "--eval-every",
        type=int,
        default=15,
        help="measure the fixed evaluation prompts every N iterations, for the curves (default: 15)",
    )
    demo.add_argument(
        "--eval-prompts", type=int, default=48, help="fixed evaluation prompts, one seed each (default: 48)"
    )
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train",
        help="train with a YAML recipe (the recipe's `algorithm:` picks the trainer)",
        description="Train with a recipe. Any recipe or config key can be overridden as key=value, "
        "e.g. `visalign train configs/toy_grpo.yaml max_steps=10 model=tiny:sd3`. "
        "Runs the same under `accelerate launch -m visalign train ...`.",
    )
    train.add_argument("recipe", help="path to a recipe YAML (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe and config fields")
    train.set_defaults(func=cmd_train)

    steer = sub.add_parser(
        "steer",
        help="steer sampling with a reward at inference time (FK particles, best-of-N, reward guidance)",
        description="Samples each prompt with inference-time steering and keeps the best sample per prompt. "
        "Writes grid.png (or one MP4 per video), sample_NNN files with prompts.csv, and steer.json / "
        "steer.csv with every prompt's reward. Example: visalign steer toy:t2i -p 'a red circle on "
        "the left' --method fk --reward toy_clip --particles 8",
    )
    _add_generation_options(steer, out_default="runs/steer", num_steps=20, sampler="sde")
    steer.add_argument(
        "--method",
        default="fk",
        choices=list(STEER_METHODS),
        help="fk: Feynman-Kac particle resampling; best-of-n: n independent samples, keep the best; "
        "guidance: add the reward's gradient to each step (differentiable rewards) (default: fk)",
    )
    steer.add_argument(
        "--reward",
        required=True,
        help="a reward type (e.g. CLIPScore, PickScore, toy_clip, toy_evaluator) or a JSON reward spec",
    )
    steer.add_argument(
        "--particles",
        "-n",
        type=int,
        default=None,
        help="particles (fk) or candidates (best-of-n) per prompt; for guidance, samples per prompt "
        "of which the best is kept (default: 4 for fk and best-of-n, 1 for guidance)",
    )
    steer.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="the most samples per denoiser, decoder and reward call (default: all at once)",
    )
    fk = steer.add_argument_group("fk options")
    fk.add_argument(
        "--potential",
        default="max",
        choices=["max", "add", "diff", "rt"],
        help="FK potential over the intermediate rewards (default: max)",
    )
    fk.add_argument(
        "--lam",
        "--lambda",
        dest="lam",
        type=float,
        default=10.0,
        help="inverse temperature: the target is p(x)·exp(lam·reward) (default: 10)",
    )
    fk.add_argument(
        "--resample-every",
        type=int,
        default=5,
        help="score x̂0 and resample after every k steps; 0 resamples only at the end (default: 5)",
    )
    fk.add_argument(
        "--adaptive",
        action="store_true",
        help="resample only when the effective sample size drops below --ess-threshold",
    )
    fk.add_argument(
        "--ess-threshold",
        type=float,
        default=0.5,
        help="adaptive threshold, as a fraction of the particles (default: 0.5)",
    )
    fk.add_argument(
        "--resampler",
        default="systematic",
        choices=["systematic", "multinomial"],
        help="resampling scheme (default: systematic)",
    )
    guide = steer.add_argument_group("guidance options")
    guide.add_argument(
        "--grad-scale",
        type=float,
        default=1.0,
        help="step size of the reward gradient added to each guided step's mean (default: 1.0)",
    )
    guide.add_argument(
        "--guidance-steps",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        default=None,
        help="guide only steps START <= i < END (default: every step)",
    )
    guide.add_argument(
        "--normalize-grad",
        action="store_true",
        help="rescale each sample's gradient to unit RMS, so --grad-scale is the shift per step",
    )
    guide.add_argument(
        "--detach-model",
        action="store_true",
        help="treat the denoiser's output as constant in the gradient (cheaper than DPS)",
    )
    steer.set_defaults(func=cmd_steer)

    score = sub.add_parser("score", help="score a folder of images or videos against their prompts → CSV")
    score.add_argument("folder", help="folder of .png/.jpg/.webp images or .mp4/.gif/.webm videos")
    score.add_argument(
        "--reward", required=True, help="a reward type (e.g. CLIPScore, toy_clip, toy_evaluator) or a JSON reward spec"
    )
    score.add_argument(
        "--prompts",
        default=None,
        help="CSV/JSONL with `file` and `prompt` columns; files it does not name are skipped "
        "(default: FOLDER/prompts.csv|jsonl|json)",
    )
    score.add_argument("--batch-size", type=int, default=16, help="files scored per batch (default: 16)")
    score.add_argument("--out", default=None, help="output CSV (default: FOLDER/rewards.csv)")
    score.set_defaults(func=cmd_score)

    sample = sub.add_parser(
        "sample",
        help="sample images or videos from a model",
        description="Samples each prompt --num times. Writes grid.png (or one MP4 per video), "
        "sample_NNN files with prompts.csv (so `visalign score` can read the "
        "folder) and prompts.json.",
    )
    _add_generation_options(sample, out_default="runs/sample", num_steps=20, sampler="ode")
    sample.add_argument("--num", type=int, default=1, help="samples per prompt (default: 1)")
    sample.set_defaults(func=cmd_sample)

    serve = sub.add_parser(
        "serve-reward",
        help="serve a reward over HTTP for RemoteReward clients (extra: serve)",
        description="Serves a reward over HTTP (GET /health, POST /score; protocol in visalign.rewards.remote) so that "
        "trainers in other processes, environments or machines score with va.rewards.RemoteReward(URL). "
        "Binds 127.0.0.1 by default; any other address requires an API key in an environment variable. "
        "Example: visalign serve-reward ocr --port 8765",
    )
    serve.add_argument(
        "spec",
        metavar="SPEC",
        help="a reward name (brightness, ocr, CLIPScore, ...), a JSON spec as in a recipe's reward:, or "
        "module:attr naming a reward object, a reward class or a factory returning a reward",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1); anything but loopback requires an API key",
    )
    serve.add_argument("--port", type=int, default=8765, help="port to bind; 0 picks a free one (default: 8765)")
    serve.add_argument(
        "--api-key-env",
        default="VISALIGN_REWARD_API_KEY",
        metavar="NAME",
        help="environment variable holding the API key clients must send; when it is set, every "
        "request needs it (default: VISALIGN_REWARD_API_KEY)",
    )
    serve.add_argument(
        "--max-body-mb",
        type=float,
        default=256.0,
        help="largest request accepted, in MiB; larger ones get 413 unread (default: 256)",
    )
    serve.add_argument(
        "--device", default=None, help="device the reward runs on (default: cuda if available, else cpu)"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level; debug also logs every request (default: info)",
    )
    serve.set_defaults(func=cmd_serve_reward)

    plan = sub.add_parser(
        "plan",
        help="per-GPU memory and FLOPs of a recipe before a run (loads no weights, downloads nothing)",
        description="Builds the recipe's real architecture on the meta device and prints, per GPU, the weights, "
        "trainable parameters, gradients, AdamW state, EMA/reference copies, the activations of one "
        "training micro-batch with and without gradient checkpointing, the rollout's memory and the "
        "FLOPs per iteration, under DDP and FSDP. Example: visalign plan configs/sd35m_grpo.yaml --gpus 8",
    )
    plan.add_argument("recipe", help="path to a recipe YAML whose model: is a known hub id (or with architecture:)")
    plan.add_argument("overrides", nargs="*", help="key=value overrides of recipe and config fields")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs the run will use (default: 1)")
    plan.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        default=None,
        help="only this strategy (default: DDP, and FSDP too when --gpus > 1)",
    )
    plan.add_argument(
        "--architecture",
        default=None,
        help="architecture name when model: is not a known hub id (e.g. a fine-tune of one): sd35-medium, "
        "flux1-dev, qwen-image, wan22-t2v-a14b, ... (all in visalign/architectures/README.md)",
    )
    plan.add_argument(
        "--accelerate-config",
        default=None,
        help="the accelerate config the run will use; its FSDP settings are checked (wrapped classes, fsdp_version)",
    )
    plan.add_argument(
        "--attention-backend",
        default=None,
        choices=["sdpa", "native", "xformers", "flash", "sage"],
        help="attention kernel of the run (default: sdpa); all are flash-style, which the plan assumes",
    )
    plan.add_argument("--json", default=None, help="also write the plan to this JSON file")
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a visalign error (bad input or config) prints its message and returns 1.

    Set ``VISALIGN_TRACEBACK=1`` to see the full traceback of such errors instead.
    """
    from visalign.errors import VisalignError
    from visalign.quiet import quiet_library_notices

    args = build_parser().parse_args(argv)
    quiet_library_notices()
    try:
        return args.func(args)
    except VisalignError as error:
        if os.environ.get("VISALIGN_TRACEBACK"):
            raise
        print(f"visalign {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
