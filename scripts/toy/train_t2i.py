"""Trains and evaluates the toy CLIP reward and the toy T2I model (with its VAE) shipped in
``visalign/toy/models/``; ``scripts/toy/README.md`` has the exact commands and the lab notes::

    python scripts/toy/train_t2i.py {clip,vae,t2i,eval-t2i,eval-clip} --help
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
    folder_size_mb,
    log_line,
    lr_factor,
    optimizer_step,
    setup,
    weights_size_mb,
    write_info,
)

import visalign.toy as world  # the toy world's scenes and renders
from visalign.toy import evaluator as toy_eval
from visalign.toy.raster import coverage
from visalign.toy.readout import _PALETTE_HUES

# ----------------------------------------------------------------------------- data


def _scene_attrs(scene: world.Scene) -> tuple:
    s = scene.sprites[0]
    return s.shape, s.color, s.position, s.size


def _augment(images: torch.Tensor, gen: torch.Generator, max_blur: float = 1.0) -> torch.Tensor:
    """Makes clean renders look more like generated images, each effect on half of the batch.

    - a shift of up to 2 px in x and y (edges replicated), so slightly misplaced shapes still
      read as the intended position (anchors are 8 px apart);
    - a Gaussian blur with sigma in [0.3, max_blur] (generators and VAEs soften edges);
    - Gaussian noise with std up to 0.06 (unfinished denoising leaves some).
    """
    b, _, h, w = images.shape
    out = images
    # shift
    shift = torch.randint(-2, 3, (b, 2), generator=gen)
    shift[torch.rand(b, generator=gen) < 0.5] = 0
    padded = F.pad(out, (2, 2, 2, 2), mode="replicate")
    rows = []
    for i in range(b):
        dx, dy = int(shift[i, 0]), int(shift[i, 1])
        rows.append(padded[i, :, 2 - dy : 2 - dy + h, 2 - dx : 2 - dx + w])
    out = torch.stack(rows)
    # blur: a separable Gaussian with a per-image sigma
    sigma = 0.3 + (max_blur - 0.3) * torch.rand(b, generator=gen)
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(-1, keepdim=True)  # (b, 7)
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        x = F.pad(out[blur], (3, 3, 3, 3), mode="replicate")
        k = kernel[blur]
        n = x.shape[0]
        # Grouped convolution: one kernel per image, applied to its 3 channels.
        x = x.reshape(1, n * 3, h + 6, w + 6)
        kx = k.repeat_interleave(3, 0)[:, None, None, :]
        ky = k.repeat_interleave(3, 0)[:, None, :, None]
        x = F.conv2d(x, kx, groups=n * 3)
        x = F.conv2d(x, ky, groups=n * 3)
        out = out.clone()
        out[blur] = x.reshape(n, 3, h, w)
    # noise
    std = 0.06 * torch.rand(b, 1, 1, 1, generator=gen)
    std[torch.rand(b, generator=gen) < 0.5] = 0
    return (out + std * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV (hue in degrees) to RGB, elementwise over (n,) tensors; returns (n, 3)."""
    k = lambda n: (n + h / 60.0) % 6  # noqa: E731
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], -1)


def _render_varied(scenes, gen: torch.Generator, size: int = 32) -> torch.Tensor:
    """Renders single-shape scenes with the variation generated images show, keeping the label.

    The world draws every shape at an exact anchor, size and palette colour; generators do
    not. Each effect below applies to half of the images and stays clearly on the caption's
    side of every decision boundary, so the caption remains true:

    - the centre moves up to 2 px and the size by ±15% (anchors are 8 px apart, sizes ±38%);
    - the shape is blended with another one at weight < 0.35 (a rounded square is a square);
    - the colour's hue moves by < 40% of the gap to the nearest other palette hue, and its
      saturation and value by a little;
    - the background gets a faint low-frequency blotch.

    Shapes come from :func:`visalign.toy.raster.coverage`, the world's own rasteriser.
    """
    n = len(scenes)
    attrs = [_scene_attrs(s) for s in scenes]
    half = lambda: torch.rand(n, generator=gen) < 0.5  # noqa: E731
    anchor = torch.tensor([world.POSITIONS[p] for _, _, p, _ in attrs]) * size
    center = anchor + half()[:, None] * (torch.rand(n, 2, generator=gen) * 4 - 2)
    radius = torch.tensor([world.SIZES[z or "medium"] for *_, z in attrs]) * size
    radius = radius * torch.where(half(), 0.85 + 0.3 * torch.rand(n, generator=gen), torch.ones(n))
    other = [
        world.SHAPES[(world.SHAPES.index(sh) + 1 + int(k)) % 3]
        for (sh, *_), k in zip(attrs, torch.randint(0, 2, (n,), generator=gen))
    ]
    weight = half() * 0.35 * torch.rand(n, generator=gen)

    def cover(shapes):
        alpha = torch.zeros(n, size, size)
        for shape in world.SHAPES:
            rows = [i for i, sh in enumerate(shapes) if sh == shape]
            if rows:
                alpha[rows] = coverage(shape, center[rows, 0], center[rows, 1], radius[rows], size, size)
        return alpha

    alpha = (1 - weight[:, None, None]) * cover([a[0] for a in attrs]) + weight[:, None, None] * cover(other)
    hues = {c: float(_PALETTE_HUES[i]) for i, c in enumerate(world.COLORS)}
    gap = {
        c: min(min(abs(h - o) % 360, 360 - abs(h - o) % 360) for d, o in hues.items() if d != c)
        for c, h in hues.items()
    }
    rgb = torch.tensor([world.COLORS[c] for _, c, _, _ in attrs])
    hsv_h = torch.tensor([hues[c] for _, c, _, _ in attrs])
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    sat, val = (mx - mn) / mx, mx
    jitter = half()
    hsv_h = hsv_h + jitter * (torch.rand(n, generator=gen) * 0.8 - 0.4) * torch.tensor([gap[c] for _, c, _, _ in attrs])
    sat = torch.where(jitter, sat * (0.75 + 0.25 * torch.rand(n, generator=gen)), sat)
    val = torch.where(jitter, (val * (0.85 + 0.2 * torch.rand(n, generator=gen))).clamp(max=1), val)
    color = torch.where(jitter[:, None], _hsv_to_rgb(hsv_h, sat, val), rgb)
    bg = torch.tensor([world.BACKGROUNDS[s.background] for s in scenes])[:, :, None, None]
    blotch = F.interpolate(
        torch.randn(n, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear", align_corners=False
    )
    bg = (bg + half()[:, None, None, None] * 0.03 * blotch).clamp(0, 1)
    a = alpha[:, None]
    return bg * (1 - a) + color[:, :, None, None] * a


# ----------------------------------------------------------------------------- toy CLIP

CLIP_PREFIX = "A photo depicts "  # CLIPScore's default ("hessel") prefix


def _clip_batch(rng: np.random.Generator, n: int):
    """``n`` scenes and captions; some captions leave the position or the size unstated.

    An unstated attribute matches any value (as in the evaluator), so an image of a large red
    circle on the left is a positive for "a red circle", "a large red circle on the left", ...
    Returns the scenes (what is drawn), the captions and the captions' stated attributes.
    """
    scenes = world.sample_scenes(n, int(rng.integers(2**31)), sizes=True, backgrounds=True)
    captions, stated = [], []
    for scene in scenes:
        shape, color, position, size = _scene_attrs(scene)
        if rng.random() < 0.15:
            position = None
        if size is not None and rng.random() < 0.3:
            size = None
        text = world.Sprite(shape, color, position, size).phrase()
        if rng.random() < 0.5:
            text = CLIP_PREFIX + text
        captions.append(text)
        stated.append((shape, color, position, size))
    return scenes, captions, stated


def _compatible(scenes, stated) -> torch.Tensor:
    """(n_images, n_captions) boolean: does caption j describe image i (unstated = any)?"""
    truth = [_scene_attrs(s) for s in scenes]
    m = torch.zeros(len(truth), len(stated), dtype=torch.bool)
    for i, (sh, co, po, sz) in enumerate(truth):
        for j, (csh, cco, cpo, csz) in enumerate(stated):
            m[i, j] = sh == csh and co == cco and (cpo is None or cpo == po) and (csz is None or csz == sz)
    return m


def train_clip(args) -> None:
    """Contrastive training of the toy CLIP (soft targets over all compatible pairs)."""
    from visalign.rewards.preprocess import ImageTransform
    from visalign.toy.models import CLIP_MAX_LENGTH, build_clip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.txt"
    model, processor = build_clip(args.seed, hidden_size=args.hidden, num_layers=args.layers)
    model.train()
    # Exactly the preprocessing the CLIPScore reward will apply (read off the processor).
    transform = ImageTransform.from_processor(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 100, args.steps))
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log_line(
        f"toy CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"batch {args.batch_size}, {args.steps} steps, lr {args.lr}",
        log,
    )
    start = time.time()
    cpu0 = time.process_time()
    for step in range(args.steps):
        scenes, captions, stated = _clip_batch(rng, args.batch_size)
        images = _augment(_render_varied(scenes, gen), gen, max_blur=1.5)
        tokens = processor.tokenizer(
            captions, padding=True, truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt"
        )
        outputs = model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=transform(images)
        )
        compat = _compatible(scenes, stated).float()
        logits = outputs.logits_per_image  # (images, captions), scaled by exp(logit_scale)
        # Soft targets: each image spreads its target over every caption that describes it,
        # and each caption over every image it describes (duplicates are common in a batch).
        loss_i = -(compat / compat.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(compat.T / compat.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = 0.5 * (loss_i + loss_t)
        optimizer_step(loss, opt, sched, model.parameters())
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        if step % args.log_every == 0 or step == args.steps - 1:
            scale = model.logit_scale.exp().item()
            log_line(f"step {step} loss {loss.item():.4f} scale {scale:.1f} ({time.time() - start:.0f}s)", log)
    wall = time.time() - start
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    results = evaluate_clip(out, threads=args.threads)
    info = dict(
        kind="clip",
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        layers=args.layers,
        threads=args.threads,
        wall_time_s=round(wall, 1),
        cpu_time_s=round(time.process_time() - cpu0, 1),
        size_mb=round(folder_size_mb(out), 2),
        retrieval=results,
    )
    write_info(out, info)
    log_line(json.dumps(info, indent=1), log)


@torch.no_grad()
def evaluate_clip(path, threads: int | None = None) -> dict:
    """Zero-shot caption retrieval of a toy CLIP folder, through the ordinary CLIPScore reward.

    Every base scene (90 captions) is rendered on every background (540 images, clean and with
    blur and noise). Each image is scored against all 90 captions, with the reward's default
    ``"A photo depicts "`` prefix; the best-scoring caption is compared with the truth, per
    attribute. The same is done for the 180 scenes with a stated size ("small"/"large") against
    the 180 captions that state one: an unstated size matches any size (as in the evaluator),
    so size is only tested where both sides state it.
    """
    from visalign.rewards import CLIPScore

    if threads:
        torch.set_num_threads(threads)
    reward = CLIPScore(model=str(path), variant="cosine", prefix=CLIP_PREFIX)
    results = {}
    for name, sizes in (("base", False), ("sizes", True)):
        scenes = [s for s in world.all_scenes(sizes=sizes) if (s.sprites[0].size is not None) == sizes]
        captions = [s.caption() for s in scenes]
        text = reward.clip.text_features([CLIP_PREFIX + c for c in captions])
        drawn = [world.Scene(s.sprites, background=bg) for bg in world.BACKGROUNDS for s in scenes]
        images = world.render_batch(drawn)
        gen = torch.Generator().manual_seed(0)
        for variant, batch in (("clean", images), ("degraded", _degrade(images, gen))):
            feats = reward.clip.image_features(batch)
            best = (feats @ text.T).argmax(1)
            truth = [_scene_attrs(s) for s in drawn]
            guess = [_scene_attrs(scenes[int(j)]) for j in best]
            acc = {}
            names = ("shape", "color", "position", "size")
            for k, attr in enumerate(names):
                if attr == "size" and not sizes:
                    continue
                acc[attr] = float(np.mean([t[k] == g[k] for t, g in zip(truth, guess)]))
            acc["all"] = float(np.mean([t == g for t, g in zip(truth, guess)]))
            results[f"{name}/{variant}"] = {k: round(v, 4) for k, v in acc.items()}
    return results


def _degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A fixed moderate degradation for evaluation: blur sigma 0.7 and noise std 0.04."""
    taps = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(taps**2) / (2 * 0.7**2))
    k = k / k.sum()
    x = F.pad(images, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
    x = F.conv2d(x, k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
    return (x + 0.04 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


# ----------------------------------------------------------------------------- VAE


def train_vae(args) -> None:
    """Trains the T2I model's ``AutoencoderKL`` on renders of single-shape scenes."""
    from visalign.toy.models import build_vae

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.txt"
    vae = build_vae(args.seed, channels=tuple(args.channels))
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 50, args.steps))
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log_line(
        f"toy VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.3f}M parameters, "
        f"batch {args.batch_size}, {args.steps} steps",
        log,
    )
    start, cpu0 = time.time(), time.process_time()
    for step in range(args.steps):
        scenes = world.sample_scenes(args.batch_size, int(rng.integers(2**31)), sizes=True, backgrounds=True)
        x = world.render_batch(scenes) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # MSE keeps colours exact; the small KL keeps the latents near unit scale and the
        # posterior noise makes the decoder tolerant of the transformer's small errors.
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + args.kl_weight * kl
        optimizer_step(loss, opt, sched, vae.parameters())
        if step % args.log_every == 0 or step == args.steps - 1:
            log_line(f"step {step} mse {rec.item():.5f} kl/dim {kl.item():.3f} ({time.time() - start:.0f}s)", log)
    wall = time.time() - start
    vae.eval()
    stats = _latent_stats(vae)
    vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    vae.save_pretrained(out, safe_serialization=True)
    recon_eval = evaluate_vae(vae)
    info = dict(
        kind="vae",
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        channels=list(args.channels),
        threads=args.threads,
        wall_time_s=round(wall, 1),
        cpu_time_s=round(time.process_time() - cpu0, 1),
        **stats,
        reconstruction=recon_eval,
    )
    write_info(out, info)
    log_line(json.dumps(info, indent=1), log)


@torch.no_grad()
def _latent_stats(vae) -> dict:
    """``shift_factor`` (mean) and ``scaling_factor`` (1/std) of the latents of the world."""
    scenes = [world.Scene(s.sprites, background=bg) for bg in world.BACKGROUNDS for s in world.all_scenes(sizes=True)]
    z = vae.encode(world.render_batch(scenes) * 2 - 1).latent_dist.mean
    return {"shift_factor": round(z.mean().item(), 5), "scaling_factor": round(1 / z.std().item(), 5)}


@torch.no_grad()
def evaluate_vae(vae) -> dict:
    """Evaluator accuracy and error of VAE reconstructions of every base scene × background."""
    scenes = [world.Scene(s.sprites, background=bg) for bg in world.BACKGROUNDS for s in world.all_scenes()]
    x = world.render_batch(scenes)
    recon = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    res = toy_eval.evaluate(recon, [s.caption() for s in scenes])
    return {
        "mse": round(F.mse_loss(recon, x).item(), 6),
        "accuracy": res["accuracy"],
        "all_correct": res["all_correct"],
    }


# ----------------------------------------------------------------------------- T2I


class NullTokenAttnProcessor:
    """SD3 joint attention with an optional additive bias on the keys (training only).

    The stock ``JointAttnProcessor2_0`` takes no mask. This one computes the same joint
    attention (image tokens first, then text tokens) and adds ``attention_mask`` — a float
    tensor broadcastable to (batch, heads, queries, keys) — to the logits. Training uses it to
    stand one zero text row in for ``c`` identical ones: ``c`` equal keys with equal values get
    exactly the attention of one key whose logit is raised by ``log c``.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq, ck, cv = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        mask = None if attention_mask is None else attention_mask.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x.transpose(1, 2).reshape(b, -1, attn.heads * x.shape[-1])
        image, text = x[:, :n_img], x[:, n_img:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


def _t2i_scenes(rng: np.random.Generator, n: int, sizes: bool) -> list:
    return world.sample_scenes(n, int(rng.integers(2**31)), sizes=sizes, backgrounds=True)


@torch.no_grad()
def _encode_library(vae, sizes: bool):
    """Posterior mean and std of every distinct training image (caption × background).

    The world has only a few thousand distinct images, so encoding them once replaces a VAE
    forward on every training step.
    """
    scenes = [world.Scene(s.sprites, background=bg) for bg in world.BACKGROUNDS for s in world.all_scenes(sizes=sizes)]
    index = {(s.caption(), s.background): i for i, s in enumerate(scenes)}
    mean, std = [], []
    for i in range(0, len(scenes), 256):
        post = vae.encode(world.render_batch(scenes[i : i + 256]) * 2 - 1).latent_dist
        mean.append(post.mean)
        std.append(post.std)
    return index, torch.cat(mean), torch.cat(std)


def train_t2i(args) -> None:
    """Rectified-flow training of the toy SD3 pipeline's transformer and text towers."""
    from diffusers import AutoencoderKL

    from visalign.toy.models import build_t2i

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.txt"
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True)
    vae.eval().requires_grad_(False)
    pipe = build_t2i(vae, args.seed, num_layers=args.layers, shift=args.shift)
    towers = (pipe.text_encoder, pipe.text_encoder_2)
    modules = (pipe.transformer, *towers)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    pipe.transformer.set_attn_processor(NullTokenAttnProcessor())
    ema = EMA(params, args.ema)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup))
    index, lat_mean, lat_std = _encode_library(vae, args.sizes)
    shift_f, scale_f = vae.config.shift_factor, vae.config.scaling_factor
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    log_line(
        f"toy T2I: transformer {n_params / 1e6:.2f}M parameters, batch {args.batch_size}, "
        f"{args.steps} steps, lr {args.lr}, EMA {args.ema}",
        log,
    )
    b = args.batch_size
    start, cpu0 = time.time(), time.process_time()
    for step in range(args.steps):
        scenes = _t2i_scenes(rng, b, args.sizes)
        rows = torch.tensor([index[(s.caption(), s.background)] for s in scenes])
        captions = [s.caption() if rng.random() >= args.caption_dropout else "" for s in scenes]
        # Latents exactly as the stock pipeline's decode inverts them: (z - shift) * scale.
        z0 = lat_mean[rows] + lat_std[rows] * torch.randn(lat_mean[rows].shape, generator=gen)
        x0 = (z0 - shift_f) * scale_f
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(b, generator=gen)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        # The stock text path with one zero "T5" row (see NullTokenAttnProcessor).
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            device=torch.device("cpu"),
            max_sequence_length=1,
        )
        count = torch.where(
            torch.rand(b, generator=gen) < 0.5,
            torch.full((b,), 256.0),
            torch.exp(torch.rand(b, generator=gen) * math.log(256.0)),
        )
        n_img = (x0.shape[-1] // pipe.transformer.config.patch_size) ** 2
        bias = torch.zeros(b, 1, 1, n_img + embeds.shape[1])
        bias[:, 0, 0, -1] = count.log()
        pred = pipe.transformer(
            hidden_states=xt,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=t * 1000,
            joint_attention_kwargs={"attention_mask": bias},
            return_dict=False,
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
            save=lambda target: _save_t2i(pipe, target),
        )
    wall = time.time() - start
    info = dict(
        kind="t2i",
        seed=args.seed,
        steps=args.steps,
        batch_size=b,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        caption_dropout=args.caption_dropout,
        layers=args.layers,
        sizes=args.sizes,
        shift=args.shift,
        vae=str(args.vae),
        threads=args.threads,
        wall_time_s=round(wall, 1),
        cpu_time_s=round(time.process_time() - cpu0, 1),
        size_mb=round(weights_size_mb(out), 2),
    )
    write_info(out, info)
    log_line(json.dumps(info, indent=1), log)


def _save_t2i(pipe, target: Path) -> None:
    """Saves the pipeline with the stock attention processors (restoring the training ones after)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    try:
        pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
        pipe.save_pretrained(target, safe_serialization=True)
    finally:
        pipe.transformer.set_attn_processor(NullTokenAttnProcessor())


@torch.no_grad()
def evaluate_t2i(
    path,
    *,
    num_samples: int = 200,
    num_steps: int = 20,
    seed: int = 0,
    guidance_scales=(1.0, 3.0),
    max_sequence_length: int = 256,
    threads: int | None = None,
) -> dict:
    """Evaluator accuracy of a T2I folder on ``num_samples`` fixed-seed samples.

    Prompt ``i`` is ``all_captions()[i % 90]`` and its noise comes from a generator seeded with
    ``seed + i``, so the numbers do not depend on batching. Sampling is visalign's ODE sampler
    (the stock Euler scheduler's steps) at ``num_steps``; ``guidance_scale=1`` is no CFG.
    """
    import visalign as va

    if threads:
        torch.set_num_threads(threads)
    policy = va.load(str(path), local_files_only=True, policy_kwargs={"max_sequence_length": max_sequence_length})
    captions = world.all_captions()
    prompts = [captions[i % len(captions)] for i in range(num_samples)]
    results = {}
    for scale in guidance_scales:
        images = []
        for i in range(0, num_samples, 50):
            chunk = prompts[i : i + 50]
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
            traj = va.sample(
                policy,
                chunk,
                num_steps=num_steps,
                sampler="ode",
                guidance_scale=scale,
                generator=gens,
                height=32,
                width=32,
            )
            images.append(traj.images.float())
        res = toy_eval.evaluate(torch.cat(images), prompts)
        results[f"cfg{scale:g}"] = {
            "all_correct": round(res["all_correct"], 4),
            **{k: round(v, 4) for k, v in res["accuracy"].items()},
        }
    return results


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/toy/train_t2i.py",
        description="Train and evaluate the shipped toy CLIP and T2I models (video: scripts/toy/train_video.py).",
    )
    sub = p.add_subparsers(dest="kind", required=True)

    q = sub.add_parser("clip", help="the toy CLIP reward (CLIPModel + CLIPProcessor)")
    add_common_args(q, 1500, 128, 1e-3)
    q.add_argument("--hidden", type=int, default=64, help="width of both towers")
    q.add_argument("--layers", type=int, default=2, help="depth of both towers")

    q = sub.add_parser("vae", help="the T2I model's AutoencoderKL")
    add_common_args(q, 1000, 32, 2e-3)
    q.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=[8, 16],
        help="block_out_channels; each level after the first halves the side",
    )
    q.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-dim KL")

    q = sub.add_parser("t2i", help="the toy SD3-style T2I pipeline (needs a trained --vae)")
    add_common_args(q, 400, 64, 1e-3)
    q.add_argument("--vae", required=True, help="folder of a VAE from the `vae` command")
    q.add_argument("--layers", type=int, default=6, help="transformer blocks")
    q.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    q.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
    q.add_argument("--caption-dropout", type=float, default=0.1, help="P(caption -> '') for CFG")
    q.add_argument("--sizes", action="store_true", help="also train on small/large captions")
    q.add_argument("--shift", type=float, default=1.0, help="scheduler shift in the folder")
    q.add_argument("--save-every", type=int, default=0, help="EMA checkpoint every N steps")

    q = sub.add_parser("eval-t2i", help="evaluator accuracy of a T2I folder")
    q.add_argument("path")
    q.add_argument("--num-samples", type=int, default=200)
    q.add_argument("--num-steps", type=int, default=20)
    q.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    q.add_argument(
        "--max-sequence-length",
        type=int,
        default=256,
        help="SD3's T5 length (stock default 256; the toy model also works with 1)",
    )
    q.add_argument("--threads", type=int, default=1)

    q = sub.add_parser("eval-clip", help="caption retrieval accuracy of a CLIP folder")
    q.add_argument("path")
    q.add_argument("--threads", type=int, default=1)
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    setup(args)
    if args.kind == "clip":
        train_clip(args)
    elif args.kind == "vae":
        train_vae(args)
    elif args.kind == "t2i":
        train_t2i(args)
    elif args.kind == "eval-t2i":
        res = evaluate_t2i(
            args.path,
            num_samples=args.num_samples,
            num_steps=args.num_steps,
            guidance_scales=args.guidance_scales,
            max_sequence_length=args.max_sequence_length,
            threads=args.threads,
        )
        print(json.dumps(res, indent=1))
    else:  # eval-clip (argparse only offers the kinds above)
        print(json.dumps(evaluate_clip(args.path, threads=args.threads), indent=1))


if __name__ == "__main__":
    main()
