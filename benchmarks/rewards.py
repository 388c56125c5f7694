"""Reward throughput: images (or videos) per second for each visalign reward.

    python benchmarks/rewards.py                          # tiny random models, CPU
    python benchmarks/rewards.py --batch 16 --size 128 --repeats 7 --threads 1
    python benchmarks/rewards.py --real --device cuda --dtype bfloat16 --batch 32
                                                          # real-size architectures, random weights

Tiny mode builds the offline models of ``visalign.testing.rewards``. ``--real`` builds real-size
architectures from their published configs with random weights (nothing is downloaded): CLIP
ViT-L/14 (CLIPScore, Aesthetic), CLIP ViT-H/14 (PickScore) and a 2B LLaVA-style VLM (CLIP-L/336
tower + a 28-layer, 2048-wide Llama) for the yes-token reward. It is meant for a GPU. OCRReward
runs rapidocr's bundled PP-OCR models (real weights, the ``ocr`` extra) on the CPU in both modes.

For each reward it times the forward pass under ``torch.no_grad()`` and, for differentiable
rewards, forward + backward to the pixels, and prints the median over ``--repeats`` runs (after
one warm-up) as samples per second. Absolute figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny_rewards() -> dict:
    import visalign.rewards as R
    from visalign.testing import rewards as T

    clip, proc = T.tiny_clip()
    mlp, aclip, aproc = T.tiny_aesthetic()
    vlm, vproc = T.tiny_vlm()
    out = {
        "CLIPScore": R.CLIPScore(clip, proc),
        "PickScore": R.PickScore(clip, proc),
        "Aesthetic": R.Aesthetic(mlp, aclip, aproc),
        "YesTokenReward": R.YesTokenReward(vlm, vproc),
        "YesTokenReward (differentiable)": R.YesTokenReward(vlm, vproc, differentiable=True),
        "Combined (CLIPScore + Aesthetic, normalised)": R.Combined(
            {"clip": R.CLIPScore(clip, proc), "aesthetic": (R.Aesthetic(mlp, aclip, aproc), 0.5)},
            normalize=True),
        "SegmentalVideoReward (CLIPScore, 4 of 8 frames)": R.SegmentalVideoReward(
            R.CLIPScore(clip, proc), segments=4),
    }
    try:
        oc_model, oc_tok = T.tiny_open_clip()
        out["HPSv2"] = R.HPSv2(model=oc_model, tokenizer=oc_tok)
    except ImportError as exc:  # MissingDependencyError is an ImportError
        print(f"(HPSv2 skipped: {str(exc).splitlines()[0][:100]}...)")
    try:
        out["OCRReward (PP-OCR in rapidocr, CPU)"] = R.OCRReward()
    except ImportError as exc:
        print(f"(OCRReward skipped: {str(exc).splitlines()[0][:100]}...)")
    return out


def real_rewards(dtype: torch.dtype, vlm_layers: int = 28) -> dict:
    """Real-size architectures with random weights (CLIP-L/14, CLIP-H/14, a 2B LLaVA).

    Returns name -> a function building the reward, so that ``--only`` builds just what it needs.
    """
    from transformers import (CLIPConfig, CLIPModel, CLIPProcessor, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    import visalign.rewards as R
    from visalign.testing import rewards as T

    def clip(vision, text, proj, size=224):
        cfg = CLIPConfig(vision_config=dict(image_size=size, patch_size=14, **vision),
                         text_config=dict(max_position_embeddings=77, **text), projection_dim=proj)
        return CLIPModel(cfg).to(dtype).eval()

    def clip_l():
        return clip(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16),
                    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12), 768)

    def clip_h():
        return clip(dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=16),
                    dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16), 1024)

    def proc():
        return CLIPProcessor(image_processor=T._image_processor(224),
                             tokenizer=T.tiny_clip_tokenizer())

    def yes_token():
        tok = T.tiny_vlm_tokenizer()
        vproc = LlavaProcessor(image_processor=T._image_processor(336), tokenizer=tok,
                               patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,
                               chat_template=T.TINY_VLM_CHAT_TEMPLATE)
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                           num_hidden_layers=24, num_attention_heads=16,
                                           image_size=336, patch_size=14),
            text_config=LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=vlm_layers, num_attention_heads=16,
                                    num_key_value_heads=16, max_position_embeddings=4096),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default")
        return R.YesTokenReward(LlavaForConditionalGeneration(cfg).to(dtype).eval(), vproc)

    return {
        "CLIPScore (CLIP-L/14)": lambda: R.CLIPScore(clip_l(), proc()),
        "Aesthetic (CLIP-L/14 + MLP)": lambda: R.Aesthetic(R.AestheticMLP(768), clip_l(), proc()),
        "PickScore (CLIP-H/14)": lambda: R.PickScore(clip_h(), proc()),
        f"YesTokenReward ({'2B' if vlm_layers == 28 else f'{vlm_layers}-layer'} LLaVA-style)":
            yes_token,
        "OCRReward (PP-OCR in rapidocr, the real models, CPU)": lambda: R.OCRReward(),
    }


def bench_one(reward, args, device: torch.device, g: torch.Generator) -> tuple[str, str]:
    """Samples/s of ``reward`` forward and forward+backward (videos/s for video rewards)."""
    from visalign.rewards import OCRReward, VideoReward

    video = isinstance(reward, VideoReward)
    shape = ((args.batch, args.frames) if video else (args.batch,)) + (3, args.size, args.size)
    x = torch.rand(shape, generator=g).to(device)
    prompts = [f"a photo of a red cat number {i}" for i in range(args.batch)]
    if isinstance(reward, OCRReward):  # the OCR reward reads the quoted text
        prompts = [f'a red cat holding a sign that says "cat {i}"' for i in range(args.batch)]
    reward.place(device)

    def fwd():
        with torch.no_grad():
            reward(x, prompts)

    def fwd_bwd():
        reward(x.detach().requires_grad_(), prompts).sum().backward()

    unit = " videos/s" if video else ""
    out = f"{args.batch / _median_time(fwd, args.repeats, device):.1f}{unit}"
    if not reward.differentiable:
        return out, "n/a"
    return out, f"{args.batch / _median_time(fwd_bwd, args.repeats, device):.1f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="samples per call")
    parser.add_argument("--size", type=int, default=64, help="image height = width")
    parser.add_argument("--frames", type=int, default=8, help="frames per video (video rewards)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--real", action="store_true", help="real-size architectures (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only rewards whose name contains one of these strings")
    parser.add_argument("--vlm-layers", type=int, default=28,
                        help="text layers of the --real VLM (28 = the 2B model)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.real:
        builders = real_rewards(dtype, args.vlm_layers)
    else:
        built = tiny_rewards()
        builders = {name: (lambda r=r: r) for name, r in built.items()}
    if args.only:
        builders = {k: v for k, v in builders.items() if any(s in k for s in args.only)}
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"batch={args.batch} size={args.size}px frames={args.frames} repeats={args.repeats} "
          f"models={'real-size, random weights' if args.real else 'tiny, random weights'}")
    print(f"{'reward':52s} {'fwd samples/s':>14s} {'fwd+bwd samples/s':>18s}")
    g = torch.Generator().manual_seed(0)
    for name, build in builders.items():
        fwd, fwd_bwd = bench_one(build(), args, device, g)
        print(f"{name:52s} {fwd:>14s} {fwd_bwd:>18s}", flush=True)


if __name__ == "__main__":
    main()
