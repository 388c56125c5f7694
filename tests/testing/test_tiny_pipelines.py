"""Tests for the tiny offline pipelines of ``visalign.testing``.

Every family must build offline, be in eval mode, run its stock ``__call__`` with CFG and a negative
prompt, be seeded reproducibly and survive ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from visalign.errors import ConfigError, UnknownFamilyError
from visalign.testing import FAMILIES, tiny_pipeline
from visalign.testing.pipelines import DEFAULT_SIZES
from visalign.testing.tokenizers import _WORDS, tiny_clip_tokenizer, tiny_t5_tokenizer

VIDEO_FAMILIES = ("wan-t2v", "wan-i2v")
# Families whose stock ``__call__`` this file knows how to drive. The 2026 families (Qwen-Image,
# FLUX.2, Z-Image, Kontext, Wan 2.2, HunyuanVideo 1.5) take other call arguments (source images,
# guiders, per-expert scales); their builds, stock calls and save/load round trips are tested in
# tests/pipelines/test_{wan22,hunyuan_video15,edit}.py and tests/sampling/test_sampler.py.
CALLABLE_HERE = ("sd", "sdxl", "sd3", "flux", "wan-t2v", "wan-i2v")


def _call(pipe, family: str, prompt, seed: int = 0, **kwargs):
    """Runs the stock ``__call__`` at the family's small size, with CFG and a negative prompt."""
    kwargs = {
        **DEFAULT_SIZES[family],
        "num_inference_steps": 2,
        "guidance_scale": 4.0,
        # SD insists that negative_prompt has the type of prompt (str or list).
        "negative_prompt": ["blurry"] * len(prompt) if isinstance(prompt, list) else "blurry",
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
        **kwargs,
    }
    if family == "flux":
        # guidance_scale only feeds Flux's guidance embedding; true_cfg_scale > 1 turns on the
        # real two-pass CFG with the negative prompt.
        kwargs["true_cfg_scale"] = 2.0
    if family == "wan-i2v":
        kwargs["image"] = Image.new("RGB", (32, 32), (200, 40, 40))
    out = pipe(prompt=prompt, **kwargs)
    return out.frames if family in VIDEO_FAMILIES else out.images


def _modules(pipe):
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize("family", CALLABLE_HERE)
def test_builds_and_runs_stock_call(family):
    pipe = tiny_pipeline(family)
    assert all(not m.training for module in _modules(pipe).values() for m in module.modules())

    # Stock text lengths (SD3 256, Flux/Wan 512) are left at their defaults here on purpose.
    out = _call(pipe, family, ["a red circle on the left", "a photo of a cat"])

    size = DEFAULT_SIZES[family]
    if family in VIDEO_FAMILIES:
        assert out.shape == (2, size["num_frames"], 3, size["height"], size["width"])
    else:
        assert out.shape == (2, 3, size["height"], size["width"])
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_in_eval_mode(family):
    pipe = tiny_pipeline(family)
    assert all(not m.training for module in _modules(pipe).values() for m in module.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_fixes_the_weights(family):
    first = _modules(tiny_pipeline(family, seed=3))
    again = _modules(tiny_pipeline(family, seed=3))
    other = _modules(tiny_pipeline(family, seed=4))

    for name, module in first.items():
        state, same = module.state_dict(), again[name].state_dict()
        assert all(torch.equal(state[k], same[k]) for k in state), name
    denoiser = "unet" if "unet" in first else "transformer"
    state, different = first[denoiser].state_dict(), other[denoiser].state_dict()
    assert any(not torch.equal(state[k], different[k]) for k in state)


@pytest.mark.parametrize("family", CALLABLE_HERE)
def test_save_pretrained_round_trip(family, tmp_path):
    pipe = tiny_pipeline(family, seed=1)
    kwargs = {} if family in ("sd", "sdxl") else {"max_sequence_length": 16}
    before = _call(pipe, family, "a red circle", **kwargs)

    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    after = _call(loaded, family, "a red circle", **kwargs)

    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if getattr(pipe, name, None) is not None:
            text = "a red circle, Blurry!"
            assert getattr(loaded, name)(text).input_ids == getattr(pipe, name)(text).input_ids


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(UnknownFamilyError) as info:
        tiny_pipeline("sd4")
    assert isinstance(info.value, ValueError)
    for family in FAMILIES:
        assert family in str(info.value)


def test_overrides():
    pipe = tiny_pipeline(
        "sd3",
        transformer={"num_layers": 2},
        scheduler={"shift": 1.0},
        dtype=torch.bfloat16,
    )
    assert pipe.transformer.config.num_layers == 2
    assert pipe.scheduler.config.shift == 1.0
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16

    # Overriding one component leaves the others' weights as they were.
    plain = tiny_pipeline("sd3")
    rounded = plain.vae.to(torch.bfloat16).float().state_dict()
    torch.testing.assert_close(pipe.vae.float().state_dict(), rounded, rtol=0, atol=0)

    scheduler = DDPMScheduler(clip_sample=False)
    assert tiny_pipeline("sd", scheduler=scheduler).scheduler is scheduler
    assert tiny_pipeline("sd3", text_encoder_3=None, tokenizer_3=None).text_encoder_3 is None

    with pytest.raises(ConfigError, match="unet"):
        tiny_pipeline("sd3", unet={"layers_per_block": 2})
    with pytest.raises(ConfigError, match="no built-in"):
        tiny_pipeline("sd", safety_checker={"x": 1})


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny_pipeline("flux")
    assert torch.equal(torch.rand(3), expected)


def test_tokenizers_keep_common_words_whole():
    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    for word in _WORDS:
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word
    # Byte-level BPE covers any text; nothing maps to the unknown token.
    ids = clip("naïve 東京 ~!").input_ids
    assert clip.unk_token_id not in ids[1:-1]
