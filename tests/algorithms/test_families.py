"""Every training algorithm runs on every tiny model family: two iterations of GRPO, DRaFT and NFT.

``FAMILY_LIST`` is the parametrisation; a family added to visalign joins it with one line (with its
own guidance or sampling quirks, if any, in ``FAMILY_OPTIONS``). The instruction-editing and I2V
families read their source image / first frame from the prompt file's ``image`` column, as a recipe
does. The assertions are that the loop runs, logs finite numbers and moves the trainable weights.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import visalign as va
from tests.conftest import EDIT_FAMILIES, I2V_FAMILIES, size_kwargs, stock_call
from visalign.testing import brightness, tiny_pipeline

FAMILY_LIST = ["qwen-image", "qwen-image-edit", "flux2", "flux2-klein", "z-image", "flux-kontext"]
FAMILY_LIST += ["wan22", "wan22-i2v", "wan22-ti2v", "wan22-ti2v-i2v", "hunyuan-video15", "hunyuan-video15-i2v"]
# Per-family config overrides (none needed so far).
FAMILY_OPTIONS: dict[str, dict] = {}
ALGORITHMS = ["grpo", "draft", "nft"]
PROMPTS = ["make the circle red", "a blue square", "a green triangle"]


def prompt_source(tmp_path, family):
    """The prompts, or a JSONL file whose ``image`` column names a source image / first frame per prompt."""
    if family not in EDIT_FAMILIES + I2V_FAMILIES:
        return PROMPTS
    size = size_kwargs(family)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        rng = np.random.RandomState(i)
        pixels = (rng.rand(size["height"], size["width"], 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"src{i}.png")
        rows.append({"prompt": prompt, "image": f"src{i}.png"})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make(algorithm, tmp_path, family):
    common = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        num_steps=3,
        prompts_per_step=2,
        lora_rank=4,
        guidance_scale=1.0,
        learning_rate=1e-2,
        trackers=["jsonl"],
        **size_kwargs(family),
        **FAMILY_OPTIONS.get(family, {}),
    )
    if algorithm == "grpo":
        return va.GRPOTrainer, va.GRPOConfig(group_size=2, clip_range=0.2, **common)
    if algorithm == "draft":
        return va.DRaFTTrainer, va.DRaFTConfig(truncation=1, **common)
    return va.NFTTrainer, va.NFTConfig(group_size=2, **common)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("family", FAMILY_LIST)
def test_two_iterations(tmp_path, family, algorithm):
    trainer_class, config = make(algorithm, tmp_path, family)
    trainer = trainer_class(tiny_pipeline(family), brightness, prompt_source(tmp_path, family), config)
    before = [p.detach().clone() for p in trainer.trainable_parameters]
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"]) for r in rows if "loss" in r)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.trainable_parameters))


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_encode_decode_round_trip_is_differentiable(family):
    """What DPO, NFT and DRaFT-LV use: decode is differentiable and encode lands in the sampler's layout."""
    policy = va.wrap(tiny_pipeline(family))
    geometry = policy.geometry(**size_kwargs(family))
    latents = policy.prepare_latents(1, geometry, torch.Generator().manual_seed(0)).requires_grad_(True)
    pixels = policy.decode(latents, geometry)
    frames = (geometry.num_frames,) if policy.is_video else ()
    assert pixels.shape == (1, *frames, 3, geometry.height, geometry.width) and 0 <= pixels.min() and pixels.max() <= 1
    pixels.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert policy.encode(pixels.detach()).shape == latents.shape


# The 2025 image families' stock calls (the video families test theirs in tests/pipelines/test_wan22.py
# and test_hunyuan_video15.py): build, stock __call__ (through conftest.stock_call, which gives each
# family the arguments it needs), save_pretrained / from_pretrained, the same pixels again.
IMAGE_FAMILIES_2025 = ["qwen-image", "qwen-image-edit", "flux2", "flux2-klein", "z-image", "flux-kontext"]


@pytest.mark.parametrize("family", IMAGE_FAMILIES_2025)
def test_stock_call_survives_save_pretrained(family, tmp_path):
    pipe = tiny_pipeline(family, seed=1)
    assert all(not m.training for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules())
    call = dict(num_inference_steps=2, max_sequence_length=64)
    before = stock_call(va.wrap(pipe), family, ["a red circle"], torch.Generator().manual_seed(0), **call)
    size = size_kwargs(family)
    assert before.shape == (1, 3, size["height"], size["width"]) and torch.isfinite(before).all()
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    after = stock_call(va.wrap(loaded), family, ["a red circle"], torch.Generator().manual_seed(0), **call)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    text = "a red circle, Blurry!"
    assert loaded.tokenizer(text).input_ids == pipe.tokenizer(text).input_ids
