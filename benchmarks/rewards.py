"""Reward throughput: images (or videos) per second for each visalign reward.

    python benchmarks/rewards.py                          # tiny random models, CPU
    python benchmarks/rewards.py --batch 16 --size 128 --repeats 7 --threads 1
    python benchmarks/rewards.py --real --device cuda --dtype bfloat16 --batch 32
                                                          # real-size architectures, random weights

Tiny mode builds the offline models of ``visalign.testing.rewards``. ``--real`` builds real-size
architectures from their published configs with random weights (nothing is downloaded): CLIP
ViT-L/14 (CLIPScore, Aesthetic), CLIP ViT-H/14 (PickScore) and a 2B LLaVA-style VLM (CLIP-L/336
tower + a 28-layer, 2048-wide Llama) for the yes-token reward, BLIP ViT-L/16 + BERT-base
(ImageReward), Qwen2-VL-7B (HPSv3) and Qwen2-VL-2B (VideoAlignReward), OWLv2 B/16 and
Grounding DINO (GenEvalReward, CLIP-L/14 colours) and the 2B VLM as a UnifiedReward judge. It is
meant for a GPU. OCRReward runs rapidocr's bundled PP-OCR models (real weights, the ``ocr`` extra) on
the CPU in both modes.

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
            {"clip": R.CLIPScore(clip, proc), "aesthetic": (R.Aesthetic(mlp, aclip, aproc), 0.5)}, normalize=True
        ),
        "SegmentalVideoReward (CLIPScore, 4 of 8 frames)": R.SegmentalVideoReward(R.CLIPScore(clip, proc), segments=4),
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
    out.update(_tiny_blip_qwen_rewards())
    out.update(_tiny_geneval_unified_rewards())
    return out


def _tiny_blip_qwen_rewards() -> dict:
    """ImageReward (tiny BLIP), HPSv3 and VideoAlign (a tiny Qwen2-VL, 56x56 px per image/frame)."""
    import visalign.rewards as R
    from visalign.rewards.qwen_reward_head import tiny_qwen2vl
    from visalign.testing.image_reward import tiny_image_reward

    blip, btok = tiny_image_reward()
    qwen, qtok = tiny_qwen2vl()
    qwen2, qtok2 = tiny_qwen2vl()
    return {
        "ImageReward (tiny BLIP)": R.ImageReward(model=blip, tokenizer=btok),
        "HPSv3 (tiny Qwen2-VL, 56x56)": R.HPSv3(model=qwen, tokenizer=qtok, pixels=56 * 56),
        "VideoAlignReward (tiny Qwen2-VL, 4 of 8 frames)": R.VideoAlignReward(
            model=qwen2, tokenizer=qtok2, min_pixels=56 * 56, max_pixels=56 * 56, video_fps=8.0, normalization={}
        ),
    }


def real_rewards(dtype: torch.dtype, vlm_layers: int = 28) -> dict:
    """Real-size architectures with random weights (CLIP-L/14, CLIP-H/14, a 2B LLaVA).

    Returns name -> a function building the reward, so that ``--only`` builds just what it needs.
    """
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    import visalign.rewards as R
    from visalign.testing import rewards as T

    def clip(vision, text, proj, size=224):
        cfg = CLIPConfig(
            vision_config=dict(image_size=size, patch_size=14, **vision),
            text_config=dict(max_position_embeddings=77, **text),
            projection_dim=proj,
        )
        return CLIPModel(cfg).to(dtype).eval()

    def clip_l():
        return clip(
            dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            768,
        )

    def clip_h():
        return clip(
            dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16),
            dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
            1024,
        )

    def proc():
        return CLIPProcessor(image_processor=T._image_processor(224), tokenizer=T.tiny_clip_tokenizer())

    def yes_token():
        tok = T.tiny_vlm_tokenizer()
        vproc = LlavaProcessor(
            image_processor=T._image_processor(336),
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=T.TINY_VLM_CHAT_TEMPLATE,
        )
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
            ),
            text_config=LlamaConfig(
                vocab_size=32000,
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=vlm_layers,
                num_attention_heads=16,
                num_key_value_heads=16,
                max_position_embeddings=4096,
            ),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
        )
        return R.YesTokenReward(LlavaForConditionalGeneration(cfg).to(dtype).eval(), vproc)

    return {
        "CLIPScore (CLIP-L/14)": lambda: R.CLIPScore(clip_l(), proc()),
        "Aesthetic (CLIP-L/14 + MLP)": lambda: R.Aesthetic(R.AestheticMLP(768), clip_l(), proc()),
        "PickScore (CLIP-H/14)": lambda: R.PickScore(clip_h(), proc()),
        f"YesTokenReward ({'2B' if vlm_layers == 28 else f'{vlm_layers}-layer'} LLaVA-style)": yes_token,
        "OCRReward (PP-OCR in rapidocr, the real models, CPU)": lambda: R.OCRReward(),
        **_real_blip_qwen_rewards(dtype, vlm_layers),
        **_real_geneval_unified_rewards(dtype, vlm_layers),
    }


def _real_blip_qwen_rewards(dtype: torch.dtype, layers: int = 28) -> dict:
    """ImageReward (BLIP ViT-L/16 + BERT-base), HPSv3 (Qwen2-VL-7B) and VideoAlign (Qwen2-VL-2B)
    at real size with random weights (built on the GPU when there is one); ``layers`` text layers
    for the two Qwen2-VLs (28 = the released models). The tokenizers are the tiny offline ones
    (their ids fit the real vocabularies); HPSv3 sees 200704-pixel images, VideoAlign frames of at
    most 200704 pixels sampled at 2 fps from clips taken as 16 fps."""
    import visalign.rewards as R
    from visalign.rewards.image_reward import ImageRewardModel
    from visalign.rewards.qwen_reward_head import tiny_qwen2vl
    from visalign.testing.image_reward import tiny_image_reward

    where = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def image_reward():
        with where:
            model = ImageRewardModel.from_configs().to(dtype)
        return R.ImageReward(model=model, tokenizer=tiny_image_reward()[1], batch_size=None)

    def qwen(hidden, inter, heads, kv, vocab):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        _, tok = tiny_qwen2vl()
        cfg = Qwen2VLConfig(
            text_config=dict(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=inter,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                pad_token_id=tok.pad_token_id,
            ),
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=hidden, num_heads=16),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        with where:
            model = Qwen2VLForConditionalGeneration(cfg).model.to(dtype).eval()
        return model, tok

    def hpsv3():
        model, tok = qwen(3584, 18944, 28, 4, 152064)
        return R.HPSv3(model=model, tokenizer=tok, batch_size=None)

    def videoalign():
        model, tok = qwen(1536, 8960, 12, 2, 151936)
        return R.VideoAlignReward(model=model, tokenizer=tok, normalization={}, batch_size=None)

    n = "" if layers == 28 else f", {layers} text layers"
    return {
        "ImageReward (BLIP ViT-L/16 + BERT-base)": image_reward,
        f"HPSv3 (Qwen2-VL-7B{n}, 448x448)": hpsv3,
        f"VideoAlignReward (Qwen2-VL-2B{n})": videoalign,
    }


def _geneval_prompts(reward, batch: int) -> list[str]:
    """Presence, counting, colour, position and two-object prompts, cycled (toy shapes or COCO classes)."""
    a, b = ("circle", "square") if reward.classes and "circle" in reward.classes else ("cat", "dog")
    forms = [f"a photo of a {a}", f"a photo of two {a}s", f"a photo of a red {a}", f"a photo of a {a} left of a {b}",
             f"a photo of a {a} and a {b}"]  # fmt: skip
    return [forms[i % len(forms)] for i in range(batch)]


def _tiny_geneval_unified_rewards() -> dict:
    """GenEvalReward (toy evaluator, tiny OWLv2 / Grounding DINO with a tiny CLIP for colours) and
    UnifiedReward (tiny LLaVA generating 16 tokens; an endpoint client against a canned local server)."""
    import logging

    import visalign.rewards as R
    from visalign.rewards.detectors import GroundingDinoDetector, OwlV2Detector
    from visalign.testing import rewards as T
    from visalign.testing.detectors import tiny_grounding_dino, tiny_owl

    logging.getLogger("visalign.rewards.unified").setLevel(logging.ERROR)  # random text: no parse warnings
    clip, proc = T.tiny_clip()
    out = {"GenEvalReward (toy evaluator as detector)": R.GenEvalReward("toy")}
    try:
        owl = OwlV2Detector(*tiny_owl(), min_score=0.0)
        out["GenEvalReward (tiny OWLv2 + tiny CLIP colours)"] = R.GenEvalReward(
            owl, clip=clip, clip_processor=proc, rules={"threshold": 0.0, "counting_threshold": 0.0}
        )
    except ImportError as exc:
        print(f"(GenEvalReward with OWLv2 skipped: {str(exc).splitlines()[0][:100]}...)")
    out["GenEvalReward (tiny Grounding DINO + tiny CLIP colours)"] = R.GenEvalReward(
        GroundingDinoDetector(*tiny_grounding_dino(), min_score=0.0),
        clip=clip,
        clip_processor=proc,
        rules={"threshold": 0.0, "counting_threshold": 0.0},
    )
    vlm, vproc = T.tiny_vlm()
    out["UnifiedReward (tiny LLaVA, 16 new tokens)"] = R.UnifiedReward(
        vlm, vproc, max_new_tokens=16, on_unparseable="zero"
    )
    out["UnifiedReward (endpoint client, canned 127.0.0.1 server)"] = R.UnifiedReward(
        "judge", base_url=_canned_chat_server(), api_key="bench"
    )
    return out


def _canned_chat_server() -> str:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 answering "Final Score: 4" (a daemon thread)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Final Score: 4"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def _real_geneval_unified_rewards(dtype: torch.dtype, layers: int = 28) -> dict:
    """GenEvalReward with OWLv2 B/16 at 960 px or Grounding DINO (Swin-T, BERT-base, 900 queries), both
    with CLIP ViT-L/14 colours and thresholds at 0 (every clause runs its checks), and UnifiedReward on
    the 2B LLaVA-style VLM of the yes-token entry generating 64 tokens; random weights, tiny tokenizers."""
    import logging

    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
    )

    import visalign.rewards as R
    from visalign.rewards.detectors import GroundingDinoDetector, OwlV2Detector
    from visalign.rewards.geneval import CLIPColorClassifier
    from visalign.testing import rewards as T
    from visalign.testing.detectors import tiny_grounding_dino

    logging.getLogger("visalign.rewards.unified").setLevel(logging.ERROR)
    zero = {"threshold": 0.0, "counting_threshold": 0.0}

    def colours():  # CLIP ViT-L/14 of the CLIPScore entry
        return CLIPColorClassifier(real_rewards(dtype, layers)["CLIPScore (CLIP-L/14)"]().clip)

    def owlv2():
        tok = T.tiny_clip_tokenizer(model_max_length=16)
        cfg = Owlv2Config(vision_config=dict(image_size=960, patch_size=16))
        model = Owlv2ForObjectDetection(cfg).to(dtype).eval()
        processor = type("P", (), {"image_processor": Owlv2ImageProcessorPil(), "tokenizer": tok})()
        return R.GenEvalReward(OwlV2Detector(model, processor, min_score=0.0), clip=colours(), rules=zero)

    def grounding_dino():
        model = GroundingDinoForObjectDetection(GroundingDinoConfig()).to(dtype).eval()
        processor = type("P", (), {"image_processor": GroundingDinoImageProcessorPil(),
                                   "tokenizer": tiny_grounding_dino()[1].tokenizer})()  # fmt: skip
        return R.GenEvalReward(GroundingDinoDetector(model, processor, min_score=0.0), clip=colours(), rules=zero)

    def unified():
        judge = next(v for k, v in real_rewards(dtype, layers).items() if k.startswith("YesTokenReward"))()
        return R.UnifiedReward(judge.model, judge.processor, max_new_tokens=64, on_unparseable="zero", batch_size=None)

    return {
        "GenEvalReward (OWLv2 B/16 960 px + CLIP-L/14 colours)": owlv2,
        "GenEvalReward (Grounding DINO Swin-T + CLIP-L/14 colours)": grounding_dino,
        "UnifiedReward (2B LLaVA-style, 64 new tokens)": unified,
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
    if getattr(reward, "name", "") == "geneval":  # GenEval-form prompts in the reward's vocabulary
        prompts = _geneval_prompts(reward, args.batch)
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
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only rewards whose name contains one of these strings"
    )
    parser.add_argument("--vlm-layers", type=int, default=28, help="text layers of the --real VLM (28 = the 2B model)")
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
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"batch={args.batch} size={args.size}px frames={args.frames} repeats={args.repeats} "
        f"models={'real-size, random weights' if args.real else 'tiny, random weights'}"
    )
    print(f"{'reward':52s} {'fwd samples/s':>14s} {'fwd+bwd samples/s':>18s}")
    g = torch.Generator().manual_seed(0)
    for name, build in builders.items():
        fwd, fwd_bwd = bench_one(build(), args, device, g)
        print(f"{name:52s} {fwd:>14s} {fwd_bwd:>18s}", flush=True)


if __name__ == "__main__":
    main()
