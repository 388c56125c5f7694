"""Trains and evaluates the toy video models (Wan 2.1-style T2V and I2V, with their VAE) shipped
in ``visalign/toy/models/``; ``scripts/toy/README.md`` has the exact commands and the lab notes::

    python scripts/toy/train_video.py {video-vae,t2v,i2v,eval-t2v,eval-i2v} --help
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    EMA,
    add_common_args,
    finish_step,
    log_line,
    lr_factor,
    optimizer_step,
    setup,
    weights_size_mb,
    write_info,
)

import visalign.toy as toy_eval  # the evaluator's API: evaluate_videos, detect
import visalign.toy as world  # the toy world's scenes and renders

#: Frames of every toy video (4k+1, as Wan needs) and the side of a frame in pixels.
NUM_FRAMES = 9
SIZE = 32
#: The stock Wan text length (``WanPipeline.__call__``'s ``max_sequence_length`` default).
STOCK_TEXT_LENGTH = 512


# ----------------------------------------------------------------------------- builders


def build_video_vae(seed: int = 0, *, base_dim: int = 8, z_dim: int = 16, dim_mult=(1, 2, 2)):
    """A tiny ``AutoencoderKLWan``: 4× spatial and 4× temporal compression.

    Wan downsamples time only together with space, so 4× in time needs two downsampling stages
    (``len(dim_mult) == 3``). ``latents_mean``/``latents_std`` are placeholders here; training
    sets them from the latents of the world.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    stages = len(dim_mult) - 1
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=list(dim_mult),
        num_res_blocks=1,
        temperal_downsample=[True] * stages,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        scale_factor_spatial=2**stages,
        scale_factor_temporal=4,
    )
    _frame_wise_init(vae)
    return vae


@torch.no_grad()
def _frame_wise_init(vae) -> None:
    """Starts the VAE as a per-frame autoencoder with simple temporal resampling.

    Every causal 3×3×3 convolution gets zero weights on its two past frames (so it starts as a
    2D convolution), each temporal downsampling averages its two frames, and each temporal
    upsampling repeats its frame. Training on single frames (which only use the current-frame
    taps) then transfers to clips unchanged, and clip training only has to learn motion.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = set()
    for m in vae.modules():
        if isinstance(m, WanResample) and m.mode in ("downsample3d", "upsample3d"):
            w = m.time_conv.weight  # (out, in, 3, 1, 1)
            eye = torch.eye(w.shape[1])
            w.zero_()
            m.time_conv.bias.zero_()
            if m.mode == "downsample3d":  # taps (cached frame, f0, f1): the mean of f0 and f1
                w[:, :, 1, 0, 0] = 0.5 * eye
                w[:, :, 2, 0, 0] = 0.5 * eye
            else:  # 2·dim outputs, read as two frames: both copy the current frame
                w[:, :, 2, 0, 0] = torch.cat([eye, eye])
            time_convs.add(m.time_conv)
    for m in vae.modules():
        if isinstance(m, WanCausalConv3d) and m not in time_convs and m.weight.shape[2] == 3:
            m.weight[:, :, :2] = 0


def _umt5(seed: int, dim: int, layers: int):
    from transformers import UMT5Config, UMT5EncoderModel

    from visalign.toy.tokenizer import toy_t5_tokenizer

    tok = toy_t5_tokenizer()
    torch.manual_seed(seed)
    model = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tok),
            d_model=dim,
            d_kv=dim // 4,
            d_ff=2 * dim,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return model, tok


def build_video_pipeline(
    kind: str,
    vae,
    seed: int = 0,
    *,
    text_dim: int = 64,
    text_layers: int = 2,
    num_layers: int = 4,
    num_heads: int = 4,
    head_dim: int = 32,
    ffn_mult: int = 3,
    shift: float = 1.0,
    image_encoder=None,
    image_processor=None,
):
    """The toy ``WanPipeline`` (``kind="t2v"``) or ``WanImageToVideoPipeline`` (``"i2v"``).

    Random weights except the given ``vae`` (and, for I2V, the given frozen ``image_encoder``
    with its ``image_processor``). The transformer sees 8×8×3 latents in 2×2 patches: 48 tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    text_encoder, tok = _umt5(seed, text_dim, text_layers)
    z = vae.config.z_dim
    dim = num_heads * head_dim
    extra = {}
    if kind == "i2v":
        extra = dict(image_dim=image_encoder.config.hidden_size, added_kv_proj_dim=dim)
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=z if kind == "t2v" else 2 * z + 4,
        out_channels=z,
        text_dim=text_dim,
        freq_dim=64,
        ffn_dim=ffn_mult * dim,
        num_layers=num_layers,
        rope_max_seq_len=32,
        **extra,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    parts = dict(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    if kind == "t2v":
        return WanPipeline(**parts)
    return WanImageToVideoPipeline(**parts, image_encoder=image_encoder, image_processor=image_processor)


def load_clip_vision(path):
    """The frozen vision tower of a toy CLIP folder as a ``CLIPVisionModel`` + its processor."""
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    clip = CLIPModel.from_pretrained(path, local_files_only=True)
    vision = CLIPVisionModel(clip.config.vision_config)
    # transformers 5 dropped the ``vision_model`` wrapper of CLIPVisionModel; older ones have it.
    getattr(vision, "vision_model", vision).load_state_dict(clip.vision_model.state_dict())
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True).image_processor
    return vision.eval().requires_grad_(False), processor


# ----------------------------------------------------------------------------- video VAE


def _video_pixels(scenes) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1], the layout the Wan VAE reads."""
    return world.render_video_batch(scenes, num_frames=NUM_FRAMES, size=SIZE).permute(0, 2, 1, 3, 4) * 2 - 1


def _library_scenes(sizes: bool = False) -> list:
    """Every video caption of the world on every background (432 clips without sizes)."""
    return [
        world.Scene(s.sprites, background=bg, motion=s.motion)
        for bg in world.BACKGROUNDS
        for s in world.all_scenes(sizes=sizes, video=True)
    ]


def train_video_vae(args) -> None:
    """Trains the ``AutoencoderKLWan`` on world frames, then on whole 9-frame clips.

    Phase 1 (``--image-steps``) feeds single frames, which go through the VAE's first-frame
    path (frame 0 alone becomes latent frame 0): that trains every spatial weight at about a
    ninth of a clip's cost. Phase 2 (``--steps``) feeds whole clips, which also trains the
    temporal down/upsampling of the 4-frame latent frames. One cosine schedule spans both.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.txt"
    vae = build_video_vae(args.seed, base_dim=args.base_dim, z_dim=args.z_dim, dim_mult=tuple(args.dim_mult))
    vae.train()
    total = args.image_steps + args.steps
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 30, total))
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log_line(
        f"toy video VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.3f}M parameters; "
        f"{args.image_steps} steps of {args.image_batch_size} frames, then {args.steps} steps "
        f"of {args.batch_size} clips",
        log,
    )
    start, cpu0 = time.time(), time.process_time()
    for step in range(total):
        images = step < args.image_steps
        batch = args.image_batch_size if images else args.batch_size
        window = 1 if images else NUM_FRAMES
        scenes = world.sample_scenes(batch, int(rng.integers(2**31)), sizes=True, backgrounds=True, video=True)
        clips = _video_pixels(scenes)
        first = torch.randint(0, NUM_FRAMES - window + 1, (batch,), generator=gen)
        x = torch.stack([c[:, s : s + window] for c, s in zip(clips, first.tolist())])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # The sprite covers ~5% of a frame, so plain MSE learns the background first; weighting
        # the sprite's pixels by --fg-weight makes its colour and outline come early.
        bg = torch.tensor([world.BACKGROUNDS[s.background] for s in scenes]) * 2 - 1
        fg = (x - bg[:, :, None, None, None]).abs().sum(1, keepdim=True) > 0.1
        weight = 1 + (args.fg_weight - 1) * fg.float()
        rec = (weight * (recon - x) ** 2).mean() / weight.mean()
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + args.kl_weight * kl
        optimizer_step(loss, opt, sched, vae.parameters())
        if step % args.log_every == 0 or step == total - 1:
            log_line(
                f"step {step} {'frames' if images else 'clips'} mse {rec.item():.5f} "
                f"kl/dim {kl.item():.3f} "
                f"({time.time() - start:.0f}s)",
                log,
            )
    wall = time.time() - start
    cpu = time.process_time() - cpu0
    vae.eval()
    stats = _video_latent_stats(vae)
    vae.register_to_config(**stats)
    vae.save_pretrained(out, safe_serialization=True)
    info = dict(
        kind="video-vae",
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        base_dim=args.base_dim,
        dim_mult=list(args.dim_mult),
        z_dim=args.z_dim,
        image_steps=args.image_steps,
        image_batch_size=args.image_batch_size,
        fg_weight=args.fg_weight,
        threads=args.threads,
        wall_time_s=round(wall, 1),
        cpu_time_s=round(cpu, 1),
        reconstruction=evaluate_video_vae(vae),
    )
    write_info(out, info)
    log_line(json.dumps(info, indent=1), log)


@torch.no_grad()
def _encode_videos(vae, scenes, chunk: int = 48):
    mean, std = [], []
    for i in range(0, len(scenes), chunk):
        post = vae.encode(_video_pixels(scenes[i : i + chunk])).latent_dist
        mean.append(post.mean)
        std.append(post.std)
    return torch.cat(mean), torch.cat(std)


@torch.no_grad()
def _video_latent_stats(vae) -> dict:
    """Per-channel mean and std of the latents of every world clip (sizes included)."""
    mean, _ = _encode_videos(vae, _library_scenes(sizes=True))
    z = mean.transpose(0, 1).flatten(1)
    return {
        "latents_mean": [round(v, 5) for v in z.mean(1).tolist()],
        "latents_std": [round(v, 5) for v in z.std(1).tolist()],
    }


@torch.no_grad()
def evaluate_video_vae(vae) -> dict:
    """Evaluator accuracy and MSE of reconstructions of every base clip × background."""
    scenes = _library_scenes()
    x = _video_pixels(scenes)
    mean, _ = _encode_videos(vae, scenes)
    recon = torch.cat([vae.decode(mean[i : i + 48]).sample for i in range(0, len(mean), 48)])
    videos = (recon.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
    res = toy_eval.evaluate_videos(videos, [s.caption() for s in scenes])
    return {
        "mse": round(F.mse_loss(recon, x).item() / 4, 6),  # in [0, 1] units
        "accuracy": {k: round(v, 4) for k, v in res["accuracy"].items()},
        "all_correct": round(res["all_correct"], 4),
    }


# ----------------------------------------------------------------------------- T2V / I2V


class WanNullRowAttnProcessor:
    """Wan cross-attention with an additive bias on the text keys (training only).

    It computes what the stock ``WanAttnProcessor`` computes for a cross-attention layer, plus
    :attr:`bias` (broadcastable to (batch, heads, queries, text rows)) on the text logits.
    Training uses it to stand ``K`` zero text rows in for the ``c`` that stock Wan pads with:
    equal keys with equal values attend exactly like one key whose logit is raised by
    ``log c``, so each of the ``K`` rows gets ``log(c / K)``. Stock locates the I2V image tokens
    by assuming 512 text rows; here their count is given by :attr:`image_len`.
    """

    def __init__(self):
        self.bias: torch.Tensor | None = None
        self.image_len = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        def heads(x):
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        image = None
        if attn.add_k_proj is not None:
            image = encoder_hidden_states[:, : self.image_len]
            encoder_hidden_states = encoder_hidden_states[:, self.image_len :]
        q = heads(attn.norm_q(attn.to_q(hidden_states)))
        k = heads(attn.norm_k(attn.to_k(encoder_hidden_states)))
        v = heads(attn.to_v(encoder_hidden_states))
        bias = None if self.bias is None else self.bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if image is not None:
            ki = heads(attn.norm_added_k(attn.add_k_proj(image)))
            vi = heads(attn.add_v_proj(image))
            x = x + F.scaled_dot_product_attention(q, ki, vi)
        x = x.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](x))


def _set_cross_processor(transformer, processor) -> None:
    for block in transformer.blocks:
        block.attn2.set_processor(processor)


def _text_rows(pipe, captions, counts: torch.Tensor, lengths: dict):
    """T5 rows of ``captions`` plus zero rows, and the bias that makes them count ``counts``.

    Every caption gets at least one zero row: ``pipe.encode_prompt`` pads to the longest caption
    plus one, exactly as the stock pipeline pads (zeros after each caption's own tokens).
    """
    n = torch.tensor([lengths.setdefault(c, len(pipe.tokenizer(c).input_ids)) for c in captions])
    rows = int(n.max()) + 1
    embeds, _ = pipe.encode_prompt(
        prompt=list(captions), do_classifier_free_guidance=False, max_sequence_length=rows, device=torch.device("cpu")
    )
    zeros = rows - n  # K_i >= 1
    is_zero = torch.arange(rows)[None] >= n[:, None]  # (b, rows)
    bias = torch.where(is_zero, (counts / zeros).log()[:, None], torch.zeros(()))
    return embeds, bias[:, None, None, :]


@torch.no_grad()
def _video_library(pipe, kind: str):
    """Latents (posterior mean and std) of every clip, and for I2V its first-frame conditions.

    The world has 432 distinct clips (72 captions × 6 backgrounds), so encoding them once
    replaces a VAE forward on every step. The I2V conditions come from visalign's own
    ``WanI2VPolicy.image_condition`` / ``image_embeds``: the code that samples.
    """
    import visalign as va
    from visalign.pipelines.base import Geometry

    scenes = _library_scenes()
    index = {(s.caption(), s.background): i for i, s in enumerate(scenes)}
    mean, std = _encode_videos(pipe.vae, scenes)
    lib = {"index": index, "mean": mean, "std": std}
    if kind == "i2v":
        policy = va.wrap(pipe)
        frames = torch.stack([world.first_frame(s, SIZE) for s in scenes])
        geometry = Geometry(SIZE, SIZE, NUM_FRAMES)
        lib["condition"] = torch.cat(
            [policy.image_condition(frames[i : i + 48], geometry) for i in range(0, len(frames), 48)]
        )
        lib["image_embeds"] = policy.image_embeds(frames)
    return lib


def train_video(args) -> None:
    """Rectified-flow training of the toy Wan T2V or I2V transformer and its UMT5."""
    from diffusers import AutoencoderKLWan

    kind = args.kind
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.txt"
    vae = AutoencoderKLWan.from_pretrained(args.vae, local_files_only=True)
    vae.eval().requires_grad_(False)
    image_encoder = image_processor = None
    if kind == "i2v":
        image_encoder, image_processor = load_clip_vision(args.clip)
    pipe = build_video_pipeline(
        kind,
        vae,
        args.seed,
        num_layers=args.layers,
        shift=args.shift,
        image_encoder=image_encoder,
        image_processor=image_processor,
    )
    lib = _video_library(pipe, kind)
    modules = (pipe.transformer, pipe.text_encoder)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    processor = WanNullRowAttnProcessor()
    _set_cross_processor(pipe.transformer, processor)
    ema = EMA(params, args.ema)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup))
    z_mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    z_std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    lengths: dict = {}
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    log_line(
        f"toy {kind.upper()}: transformer {n_params / 1e6:.2f}M parameters, UMT5 "
        f"{sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.2f}M, batch "
        f"{args.batch_size}, {args.steps} steps, lr {args.lr}, EMA {args.ema}",
        log,
    )
    b = args.batch_size
    start, cpu0 = time.time(), time.process_time()
    for step in range(args.steps):
        scenes = world.sample_scenes(b, int(rng.integers(2**31)), backgrounds=True, video=True)
        rows = torch.tensor([lib["index"][(s.caption(), s.background)] for s in scenes])
        captions = [s.caption() if rng.random() >= args.caption_dropout else "" for s in scenes]
        z0 = lib["mean"][rows] + lib["std"][rows] * torch.randn(lib["mean"][rows].shape, generator=gen)
        x0 = (z0 - z_mean) / z_std  # the stock decode inverts exactly this normalisation
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(b, generator=gen)
        xt = (1 - t.view(b, 1, 1, 1, 1)) * x0 + t.view(b, 1, 1, 1, 1) * noise
        # How many zero text rows stock would attend to: 512 minus the caption's tokens; for
        # T2V half of the samples instead use a log-uniform count, for shorter text lengths.
        n_tok = torch.tensor(
            [lengths.setdefault(c, len(pipe.tokenizer(c).input_ids)) for c in captions], dtype=torch.float32
        )
        count = STOCK_TEXT_LENGTH - n_tok
        if kind == "t2v":
            short = torch.exp(torch.rand(b, generator=gen) * math.log(STOCK_TEXT_LENGTH))
            count = torch.where(torch.rand(b, generator=gen) < 0.5, count, short.clamp(min=1))
        embeds, processor.bias = _text_rows(pipe, captions, count, lengths)
        extra = {}
        if kind == "i2v":
            xt = torch.cat([xt, lib["condition"][rows]], 1)
            extra["encoder_hidden_states_image"] = lib["image_embeds"][rows]
            processor.image_len = lib["image_embeds"].shape[1]
        pred = pipe.transformer(
            hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embeds, return_dict=False, **extra
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        finish_step(
            step,
            loss,
            args,
            opt,
            sched,
            params,
            ema,
            out=out,
            start=start,
            log=log,
            save=lambda target: _save_video(pipe, processor, target),
        )
    wall, cpu = time.time() - start, time.process_time() - cpu0
    vae_info = Path(args.vae) / "training_info.json"
    vae_training = json.loads(vae_info.read_text()) if vae_info.exists() else None
    size = weights_size_mb(out)
    info = dict(
        kind=kind,
        seed=args.seed,
        steps=args.steps,
        batch_size=b,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        caption_dropout=args.caption_dropout,
        layers=args.layers,
        shift=args.shift,
        vae=str(args.vae),
        clip=str(args.clip) if kind == "i2v" else None,
        threads=args.threads,
        wall_time_s=round(wall, 1),
        cpu_time_s=round(cpu, 1),
        size_mb=round(size, 2),
        vae_training=vae_training,
    )
    write_info(out, info)
    log_line(json.dumps(info, indent=1), log)


def _save_video(pipe, processor, target: Path) -> None:
    """Saves the pipeline with the stock cross-attention processors (restoring ``processor`` after)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    try:
        _set_cross_processor(pipe.transformer, WanAttnProcessor())
        pipe.save_pretrained(target, safe_serialization=True)
    finally:
        _set_cross_processor(pipe.transformer, processor)


def eval_prompts(kind: str, num_samples: int):
    """The fixed evaluation set: prompt ``i`` is video caption ``i % 72``; for I2V also its
    first frame, on background ``(i + i // 72) % 6``."""
    captions = world.all_captions(video=True)
    prompts = [captions[i % len(captions)] for i in range(num_samples)]
    if kind == "t2v":
        return prompts, None
    bgs = list(world.BACKGROUNDS)
    scenes = [
        world.Scene(
            world.parse_caption(p).sprites, background=bgs[(i + i // 72) % 6], motion=world.parse_caption(p).motion
        )
        for i, p in enumerate(prompts)
    ]
    return prompts, torch.stack([world.first_frame(s, SIZE) for s in scenes])


@torch.no_grad()
def evaluate_video_model(
    path,
    kind: str,
    *,
    num_samples: int = 144,
    num_steps: int = 20,
    seed: int = 0,
    guidance_scales=(1.0, 3.0),
    max_sequence_length: int = STOCK_TEXT_LENGTH,
    threads: int | None = None,
    batch: int = 48,
) -> dict:
    """Evaluator accuracy (colour, shape, motion, all-correct) of a T2V or I2V folder.

    Prompt ``i`` and its first frame come from :func:`eval_prompts`; its noise from a generator
    seeded with ``seed + i``, so the numbers do not depend on batching. Sampling is visalign's
    ODE sampler (the stock Euler steps) at ``num_steps``, 9 frames at 32 px; ``guidance_scale=1``
    is no CFG. For I2V, ``"first_frame"`` also reports how often the evaluator reads the given
    frame's colour and shape in the generated frame 0.
    """
    import visalign as va

    if threads:
        torch.set_num_threads(threads)
    policy = va.load(str(path), local_files_only=True, policy_kwargs={"max_sequence_length": max_sequence_length})
    prompts, frames = eval_prompts(kind, num_samples)
    results = {}
    for scale in guidance_scales:
        videos = []
        for i in range(0, num_samples, batch):
            chunk = prompts[i : i + batch]
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
            extra = {} if frames is None else {"images": frames[i : i + batch]}
            traj = va.sample(
                policy,
                chunk,
                num_steps=num_steps,
                sampler="ode",
                guidance_scale=scale,
                generator=gens,
                height=SIZE,
                width=SIZE,
                num_frames=NUM_FRAMES,
                **extra,
            )
            videos.append(traj.images.float())
        videos = torch.cat(videos)
        res = toy_eval.evaluate_videos(videos, prompts)
        entry = {"all_correct": round(res["all_correct"], 4), **{k: round(v, 4) for k, v in res["accuracy"].items()}}
        if frames is not None:
            entry["first_frame"] = round(_first_frame_agreement(videos[:, 0], frames), 4)
        results[f"cfg{scale:g}"] = entry
    return results


def _first_frame_agreement(generated: torch.Tensor, given: torch.Tensor) -> float:
    """Fraction of pairs whose generated frame 0 reads as the given frame's colour and shape."""
    a = toy_eval.detect(generated)
    b = toy_eval.detect(given)
    same = [x[0].found and x[0].color == y[0].color and x[0].shape == y[0].shape for x, y in zip(a, b)]
    return sum(same) / len(same)


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/toy/train_video.py",
        description="Train and evaluate the shipped toy video models "
        "(the CLIP and T2I models: scripts/toy/train_t2i.py).",
    )
    sub = p.add_subparsers(dest="kind", required=True)

    q = sub.add_parser("video-vae", help="the toy video models' AutoencoderKLWan")
    add_common_args(q, 400, 8, 3e-3)
    q.add_argument("--base-dim", type=int, default=8, help="channels of the first VAE level")
    q.add_argument(
        "--dim-mult", type=int, nargs=3, default=[1, 2, 2], help="channel multiplier of each level (32, 16 and 8 px)"
    )
    q.add_argument("--z-dim", type=int, default=16, help="latent channels")
    q.add_argument(
        "--image-steps", type=int, default=500, help="steps on single frames before the --steps on whole clips"
    )
    q.add_argument("--image-batch-size", type=int, default=32, help="frames per image step")
    q.add_argument(
        "--fg-weight", type=float, default=10.0, help="loss weight of the sprite's pixels relative to the background's"
    )
    q.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-dim KL")

    for kind, steps, what in (
        ("t2v", 500, "the toy Wan T2V pipeline (needs a trained --vae)"),
        ("i2v", 300, "the toy Wan 2.1 I2V pipeline (needs --vae, --clip)"),
    ):
        q = sub.add_parser(kind, help=what)
        add_common_args(q, steps, 32, 1e-3)
        q.add_argument("--vae", required=True, help="folder of a VAE from `video-vae`")
        if kind == "i2v":
            q.add_argument("--clip", required=True, help="toy CLIP folder whose vision tower is the image encoder")
        q.add_argument("--layers", type=int, default=4, help="transformer blocks")
        q.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
        q.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
        q.add_argument("--caption-dropout", type=float, default=0.1, help="P(caption -> '') for CFG")
        q.add_argument("--shift", type=float, default=1.0, help="scheduler shift in the folder")
        q.add_argument("--save-every", type=int, default=0, help="EMA checkpoint every N steps")

    for kind in ("t2v", "i2v"):
        q = sub.add_parser(
            f"eval-{kind}", help=f"evaluator accuracy of a {kind.upper()} folder (colour, shape, motion)"
        )
        q.add_argument("path")
        q.add_argument("--num-samples", type=int, default=144)
        q.add_argument("--num-steps", type=int, default=20)
        q.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
        q.add_argument(
            "--max-sequence-length",
            type=int,
            default=None,
            help="Wan's text length (stock 512; T2V also works with 16, I2V needs 512)",
        )
        q.add_argument("--threads", type=int, default=1)
        q.add_argument(
            "--record",
            default=None,
            metavar="KEY",
            help="also store the results in the folder's training_info.json[KEY]",
        )
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    setup(args)
    if args.kind == "video-vae":
        train_video_vae(args)
    elif args.kind in ("t2v", "i2v"):
        train_video(args)
    elif args.kind in ("eval-t2v", "eval-i2v"):
        kind = args.kind.removeprefix("eval-")
        length = args.max_sequence_length or STOCK_TEXT_LENGTH
        res = evaluate_video_model(
            args.path,
            kind,
            num_samples=args.num_samples,
            num_steps=args.num_steps,
            guidance_scales=args.guidance_scales,
            max_sequence_length=length,
            threads=args.threads,
        )
        print(json.dumps(res, indent=1))
        if args.record:
            _record(
                Path(args.path),
                args.record,
                res,
                f"{args.kind}: {args.num_samples} samples (eval_prompts), generator seed i, "
                f"{args.num_steps} ODE steps, max_sequence_length={length}, "
                f"threads {args.threads}",
            )
    else:  # pragma: no cover - argparse only offers the kinds above
        raise ValueError(f"unknown kind {args.kind!r}")


def _record(folder: Path, key: str, results: dict, settings: str) -> None:
    """Stores evaluation results in a folder's ``training_info.json`` under ``key``."""
    path = folder / "training_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info[key] = results
    info[f"{key}_settings"] = settings
    write_info(folder, info)


if __name__ == "__main__":
    main()
