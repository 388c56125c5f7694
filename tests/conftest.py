"""Shared fixtures: tiny offline policies of every family, built once per session."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a 2-core machine running two pytest
# workers, torch's default of one thread per core makes them contend and slow down ~10x.
torch.set_num_threads(1)

FAMILIES = (
    "sd",
    "sdxl",
    "sd3",
    "flux",
    "wan-t2v",
    "wan-i2v",
    "wan22-ti2v",
    "wan22-ti2v-i2v",
    "qwen-image",
    "qwen-image-edit",
    "flux2",
    "flux2-klein",
    "z-image",
    "flux-kontext",
)
FLOW_FAMILIES = (
    "sd3",
    "flux",
    "wan-t2v",
    "wan-i2v",
    "wan22-ti2v",
    "wan22-ti2v-i2v",
    "wan22",
    "wan22-i2v",
    "hunyuan-video15",
    "hunyuan-video15-i2v",
    "qwen-image",
    "qwen-image-edit",
    "flux2",
    "flux2-klein",
    "z-image",
    "flux-kontext",
)
# Instruction-editing families: sampling needs a source image per prompt; first_frames gives them one.
EDIT_FAMILIES = ("qwen-image-edit", "flux-kontext")
# Families whose sampling needs a first frame (I2V); first_frames gives them one.
I2V_FAMILIES = ("wan-i2v", "wan22-i2v", "wan22-ti2v-i2v", "hunyuan-video15-i2v")
# Not in FAMILIES, because a stock pipeline loads their LoRA in two lines, not one
# (load_lora_weights for each expert): tests/pipelines/test_wan22.py runs the parametrised
# sampler tests for them and its own LoRA round trip.
TWO_EXPERT_FAMILIES = ("wan22", "wan22-i2v")
# Not in FAMILIES: their stock __call__ has no guidance_scale (CFG is the pipeline's guider; the I2V
# one sizes the video from the image) and diffusers has no pipeline LoRA loader for them, so
# tests/pipelines/test_hunyuan_video15.py runs the parametrised sampler tests with their stock call.
HUNYUAN15_FAMILIES = ("hunyuan-video15", "hunyuan-video15-i2v")
PROMPTS = ["a red circle on the left", "a blue square"]


def size_kwargs(family: str) -> dict:
    """The small height/width/num_frames every tiny family runs at."""
    from visalign.testing.pipelines import DEFAULT_SIZES

    return {k: v for k, v in DEFAULT_SIZES[family].items() if v is not None}


def first_frames(family: str, batch: int, seed: int = 0):
    """Random I2V first frames or edit source images (as uint8 → [0,1], so PIL and tensor views agree), or None."""
    if family not in I2V_FAMILIES + EDIT_FAMILIES:
        return None
    size = size_kwargs(family)
    rng = np.random.RandomState(seed)
    arr = (rng.rand(batch, size["height"], size["width"], 3) * 255).astype(np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def stock_policy(policy, family: str):
    """The policy whose ``va.sample`` the stock pipeline reproduces: ``policy`` itself, except that
    Qwen-Image-Edit's stock call always encodes the source at about 1 MP (visalign's default is the
    output's area), so that family is re-wrapped with ``source_area=1024**2`` (same components)."""
    import visalign as va

    if family == "qwen-image-edit":
        return va.wrap(policy.pipe, source_area=1024 * 1024)
    return policy


def stock_call(
    policy,
    family: str,
    prompts,
    generator,
    output_type: str = "pt",
    guidance_scale: float = 4.0,
    num_inference_steps: int = 4,
    **kwargs,
):
    """The stock ``__call__`` doing what ``va.sample(policy, prompts, guidance_scale=..., images=first_frames)``
    does, returned in visalign's layout (``Trajectory.images``, or ``final_latents`` for ``"latent"``).

    Family specifics (each adapter's docstring says why):
    - I2V and edit families get one first frame / source image (``first_frames(family, 1)``) as PIL;
    - Qwen-Image(-Edit): visalign's CFG is stock's true CFG against the negative prompt ``" "``;
    - Qwen-Image-Edit: stock takes one source per call, so each prompt is a call of its own sharing the
      generator (its noise draws concatenate to the batched draw); use :func:`stock_policy` on our side;
    - Z-Image: stock's ``guidance_scale`` w is visalign's w + 1;
    - FLUX.1 Kontext: ``max_area=height*width, _auto_resize=False`` (exactly the requested sizes);
    - FLUX.2 [klein]: its ``output_type="latent"`` is the VAE's latents; they are mapped to the tokens.
    """
    from PIL import Image

    prompts = list(prompts)  # Z-Image's stock __call__ rewrites the prompt list it is given
    images = first_frames(family, 1)
    if images is not None:  # stock repeats one image for the whole batch
        arr = (images[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        kwargs["image"] = Image.fromarray(arr)
    size = size_kwargs(family)
    if family in ("qwen-image", "qwen-image-edit"):
        kwargs.setdefault("negative_prompt", [" "] * len(prompts))
        kwargs.setdefault("true_cfg_scale", guidance_scale)
    elif family == "z-image":
        guidance_scale = guidance_scale - 1.0
    elif family == "flux-kontext":
        kwargs.update(max_area=size["height"] * size["width"], _auto_resize=False)

    def call(batch, **extra):
        out = policy.pipe(
            prompt=batch,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
            **size,
            **{**kwargs, **extra},
        )
        return out.frames if hasattr(out, "frames") else out.images

    if family == "qwen-image-edit":
        negatives = kwargs.pop("negative_prompt")
        out = torch.cat([call([p], negative_prompt=[n]) for p, n in zip(prompts, negatives)])
    else:
        out = call(prompts)
    if family == "flux2-klein" and output_type == "latent":
        out = policy.tokens_from_vae(out)
    return out


@pytest.fixture(scope="session")
def tiny_policies():
    """family → Policy over a tiny random pipeline (seed 0). Tests must not mutate them."""
    import visalign as va
    from visalign.testing import tiny_pipeline

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = va.wrap(tiny_pipeline(family, seed=0))
        return cache[family]

    return get
