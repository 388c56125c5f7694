"""The inputs each real denoiser's forward takes, as empty tensors (for meta measurements).

:func:`denoiser_inputs` builds the keyword arguments of one denoiser forward at a given image or
video size, batch and text length, the way the family's pipeline calls it; :func:`denoise` runs it
and returns the velocity as one tensor; :func:`latent_shape` is the VAE latent a sample decodes
from. :mod:`visalign.plan` uses them to measure activations and FLOPs on the meta device::

    >>> from visalign.architectures import inputs
    >>> inputs.latent_shape("wan22-ti2v-5b", 480, 832, 81)      # 48 channels, 16x spatial, 4x temporal
    (1, 48, 21, 30, 52)

Denoisers whose forward reads tensor values (which the meta device does not have) are in
:data:`UNMEASURABLE`, with the reason.
"""

from __future__ import annotations

import torch

from visalign.architectures import spec
from visalign.errors import ConfigError

__all__ = ["UNMEASURABLE", "denoise", "denoiser_inputs", "latent_shape", "text_width"]

#: Denoiser classes whose forward cannot run on the meta device, and why (plan reports no
#: activations or FLOPs for them).
UNMEASURABLE = {
    "HunyuanVideo15Transformer3DModel": (
        "its forward reorders the text tokens by their mask values "
        "(boolean indexing) and tests whether the image embedding is all zeros, which the meta "
        "device cannot evaluate"
    ),
}
#: Families whose pipeline appends the source image's tokens to the noisy ones (editing).
_REFERENCE_TOKENS = ("flux-kontext", "qwen-image-edit")


def _vae(record: dict) -> tuple[int, int, int]:
    """(latent channels, spatial factor, temporal factor or 0 for images) of the record's VAE."""
    vae = record["vae"]
    cfg = vae["config"]
    cls = vae["class"]
    if cls == "AutoencoderKLWan":
        return cfg.get("z_dim", 16), cfg.get("scale_factor_spatial") or 8, cfg.get("scale_factor_temporal") or 4
    if cls == "AutoencoderKLQwenImage":
        return cfg.get("z_dim", 16), 2 ** len(cfg.get("temperal_downsample", [0, 0, 0])), 0
    if cls == "AutoencoderKLHunyuanVideo15":
        return cfg["latent_channels"], cfg["spatial_compression_ratio"], cfg["temporal_compression_ratio"]
    return cfg["latent_channels"], 2 ** (len(cfg["block_out_channels"]) - 1), 0  # AutoencoderKL(Flux2)


def latent_shape(name: str, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
    """The VAE latent of one sample of architecture ``name``: ``(1, C, H, W)``, or ``(1, C, F, H, W)``.

    Qwen-Image's VAE is a video VAE run on one frame, so its latent has a frame axis of 1.
    """
    record = spec(name)
    channels, spatial, temporal = _vae(record)
    frames = []
    if temporal:
        frames = [(num_frames - 1) // temporal + 1 if num_frames else 1]
    elif record["vae"]["class"] == "AutoencoderKLQwenImage":
        frames = [1]
    return (1, channels, *frames, height // spatial, width // spatial)


def text_width(name: str) -> int:
    """The width of the text embedding the denoiser reads (its first text encoder's hidden size)."""
    cfg = spec(name)["denoiser"]["config"]
    for key in ("joint_attention_dim", "text_dim", "cap_feat_dim", "text_embed_dim"):
        if cfg.get(key):
            return cfg[key]
    raise ConfigError(f"{name}: no text width in its denoiser config.")


def denoiser_inputs(
    name: str,
    batch: int,
    height: int,
    width: int,
    num_frames: int | None = None,
    text_tokens: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "meta",
) -> dict:
    """Keyword arguments of one forward of ``name``'s denoiser on ``batch`` samples, as empty tensors.

    The latents are those the family's pipeline feeds at ``height`` x ``width`` (x ``num_frames``),
    packed as it packs them; editing families (FLUX.1 Kontext, Qwen-Image-Edit) append a source
    image of the same size; Wan image-to-video gets its condition channels, Wan 2.2 TI2V its
    per-token timesteps.

    Raises:
        ConfigError: a denoiser class this module has no inputs for.
    """
    record = spec(name)
    family, cls, cfg = record["family"], record["denoiser"]["class"], record["denoiser"]["config"]

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, device=device, dtype=dt)

    t = torch.ones(batch, device=device)
    text = empty(batch, text_tokens, text_width(name))
    latent = latent_shape(name, height, width, num_frames)[1:]
    copies = 2 if family in _REFERENCE_TOKENS else 1
    if cls == "SD3Transformer2DModel":
        pooled = empty(batch, cfg["pooled_projection_dim"])
        return dict(
            hidden_states=empty(batch, *latent), encoder_hidden_states=text, pooled_projections=pooled, timestep=t
        )
    if cls in ("FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel"):
        h, w = latent[-2] // 2, latent[-1] // 2  # 2x2 patches packed into channels
        n = h * w * copies
        hidden = empty(batch, n, latent[0] * 4)
        if cls == "QwenImageTransformer2DModel":
            shapes = [[(1, h, w)] * copies] * batch
            return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=t, img_shapes=shapes)
        axes = 3 if cls == "FluxTransformer2DModel" else 4
        inputs = dict(hidden_states=hidden, encoder_hidden_states=text, timestep=t)
        inputs.update(img_ids=empty(n, axes, dt=torch.float32), txt_ids=empty(text_tokens, axes, dt=torch.float32))
        if cfg.get("guidance_embeds"):
            inputs["guidance"] = t
        if cls == "FluxTransformer2DModel":
            inputs["pooled_projections"] = empty(batch, cfg["pooled_projection_dim"])
        return inputs
    if cls == "ZImageTransformer2DModel":
        x = [empty(latent[0], 1, *latent[-2:]) for _ in range(batch)]
        caps = [empty(text_tokens, text_width(name)) for _ in range(batch)]
        return dict(x=x, t=t, cap_feats=caps)
    if cls == "WanTransformer3DModel":
        channels = cfg["in_channels"]  # image-to-video: the latent plus mask and first-frame channels
        hidden = empty(batch, channels, *latent[1:])
        if record.get("expand_timesteps"):  # TI2V: one timestep per latent token (the first frame's are 0)
            p = cfg["patch_size"]
            t = torch.ones(batch, (latent[1] // p[0]) * (latent[2] // p[1]) * (latent[3] // p[2]), device=device)
        return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=t)
    if cls == "HunyuanVideo15Transformer3DModel":
        hidden = empty(batch, cfg["in_channels"], *latent[1:])
        mask = torch.ones(batch, text_tokens, device=device, dtype=torch.long)
        glyph = empty(batch, 256, cfg["text_embed_2_dim"])
        return dict(
            hidden_states=hidden,
            timestep=t,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            encoder_hidden_states_2=glyph,
            encoder_attention_mask_2=torch.ones(batch, 256, device=device, dtype=torch.long),
            image_embeds=empty(batch, 729, cfg["image_embed_dim"]),
        )
    raise ConfigError(f"{name}: no denoiser inputs for {cls}.")


def denoise(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One forward of ``model`` on ``inputs`` (from :func:`denoiser_inputs`); the velocity as one tensor."""
    out = model(**inputs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out
