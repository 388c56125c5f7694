"""Sampling speed: visalign's loop against the stock diffusers pipeline at equal settings.

    python benchmarks/sampling.py                       # every tiny family, CPU
    python benchmarks/sampling.py --families sd3 flux --repeats 9 --steps 20
    python benchmarks/sampling.py --families qwen-image flux2 flux2-klein z-image flux-kontext --threads 1
    python benchmarks/sampling.py --families wan22 wan22-i2v wan22-ti2v wan22-ti2v-i2v hunyuan-video15 \
        hunyuan-video15-i2v --threads 1

For each family it times the stock ``pipe(...)`` and ``va.sample(..., sampler="ode")`` (the same
computation: same latents, steps, CFG, decode) and ``sampler="sde"`` (adds log-prob bookkeeping),
interleaved, and prints medians and the ratio of medians. Timing ratios from one run are
comparable; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _stock_equivalent(family: str, images, size: dict, batch: int) -> tuple[dict, float | None]:
    """The stock call's extra keywords and guidance that compute what ``va.sample(guidance_scale=4)`` does
    (the same translation as tests/conftest.py's ``stock_call``; each adapter's docstring says why).
    A guidance of None means: stock takes none (HunyuanVideo 1.5's CFG is its guider, set in bench_family)."""
    extra, guidance = {}, 4.0
    if family.startswith("hunyuan-video15"):  # CFG from the guider; I2V takes a PIL image and no size
        if images is not None:
            from PIL import Image

            extra["image"] = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy())
        return extra, None
    if images is not None:
        if family in ("qwen-image-edit", "flux-kontext"):
            from visalign.pipelines.qwen_image_edit import to_pil

            extra["image"] = to_pil(images)  # one source per prompt, as va.sample gets them
        else:
            extra["image"] = images[0]
    if family in ("qwen-image", "qwen-image-edit"):  # true CFG against " "
        extra["negative_prompt"] = [" "] * batch
    elif family == "z-image":  # Z-Image's guidance w is visalign's w + 1
        guidance = 3.0
    elif family == "flux-kontext":  # exactly the requested size, the source at its own size
        extra.update(max_area=size["height"] * size["width"], _auto_resize=False)
    return extra, guidance


def bench_family(family: str, steps: int, batch: int, repeats: int) -> dict:
    import visalign as va
    from visalign.testing import tiny_pipeline
    from visalign.testing.pipelines import DEFAULT_SIZES

    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    # Qwen-Image-Edit's stock call encodes the source at ~1 MP; visalign's default is the output's area.
    policy = va.wrap(pipe, **({"source_area": 1024 * 1024} if family == "qwen-image-edit" else {}))
    size = {k: v for k, v in DEFAULT_SIZES[family].items() if v is not None}
    prompts = [f"prompt {i}" for i in range(batch)]
    images = torch.rand(batch, 3, size["height"], size["width"]) if policy.needs_image else None
    stock_extra, stock_guidance = _stock_equivalent(family, images, size, batch)

    stock_size = dict(size)
    if stock_guidance is None:  # HunyuanVideo 1.5: CFG 4 through the guider; I2V sizes the video from the image
        pipe.guider = pipe.guider.new(guidance_scale=4.0)
        stock_extra = {**stock_extra, **({"num_frames": size["num_frames"]} if "image" in stock_extra else {})}
        stock_size = {} if "image" in stock_extra else size
    else:
        stock_extra = {**stock_extra, "guidance_scale": stock_guidance}

    def stock():
        with torch.no_grad():
            pipe(
                prompt=list(prompts),
                num_inference_steps=steps,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
                **stock_size,
                **stock_extra,
            )

    def ours(sampler):
        return lambda: va.sample(
            policy,
            prompts,
            num_steps=steps,
            guidance_scale=4.0,
            sampler=sampler,
            images=images,
            generator=torch.Generator().manual_seed(0),
            **size,
        )

    for fn in (stock, ours("ode"), ours("sde")):  # warm-up
        fn()
    rows = {"stock": [], "ode": [], "sde": []}
    for _ in range(repeats):  # interleaved, so load drifts hit all three alike
        rows["stock"].append(_time(stock, 1))
        rows["ode"].append(_time(ours("ode"), 1))
        rows["sde"].append(_time(ours("sde"), 1))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"family": family, **med, "ode_ratio": med["ode"] / med["stock"], "sde_ratio": med["sde"] / med["stock"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--families",
        nargs="+",
        default=[
            "sd",
            "sdxl",
            "sd3",
            "flux",
            "wan-t2v",
            "wan-i2v",
            "qwen-image",
            "qwen-image-edit",
            "flux2",
            "flux2-klein",
            "z-image",
            "flux-kontext",
        ],
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, steps {args.steps}, batch {args.batch}, "
        f"CFG 4, median of {args.repeats}"
    )
    print(f"{'family':16s} {'stock s':>9s} {'ode s':>9s} {'sde s':>9s} {'ode/stock':>10s} {'sde/stock':>10s}")
    for family in args.families:
        r = bench_family(family, args.steps, args.batch, args.repeats)
        print(
            f"{family:16s} {r['stock']:9.4f} {r['ode']:9.4f} {r['sde']:9.4f} {r['ode_ratio']:10.3f} "
            f"{r['sde_ratio']:10.3f}"
        )


if __name__ == "__main__":
    main()
