"""HunyuanVideo 1.5 text-to-video and image-to-video.

These families are not in ``FAMILIES`` (tests/conftest.py): their stock ``__call__`` takes no
``guidance_scale`` (CFG is the pipeline's ``guider``), the image-to-video one takes no size (it sizes
the video from the image), and diffusers has no pipeline LoRA loader for them. So the parametrised
tests run here with their stock call: ODE equals stock, the log-prob invariants, and the LoRA round
trip through ``pipe.transformer.load_lora_adapter``.
"""

import time

import pytest
import torch
from PIL import Image

import visalign as va
from tests.conftest import HUNYUAN15_FAMILIES, first_frames, size_kwargs
from tests.sampling import test_sampler as generic
from visalign.errors import InvalidInputError, UnsupportedPipelineError
from visalign.testing import tiny_pipeline

# The second prompt quotes text, so the ByT5 glyph encoder runs too (zeros otherwise).
PROMPTS = ["a red circle on the left", 'a sign that says "hello"']
STOCK_ATOL = 1e-5


def stock(policy, family, prompts, generator, guidance_scale=4.0, output_type="pt", num_inference_steps=4):
    """Stock's call doing what ``va.sample(..., guidance_scale=s)`` does: the scale goes into the guider,
    and the image-to-video call gets the image (its size sets the video's) instead of height/width."""
    pipe, kwargs = policy.pipe, dict(size_kwargs(family))
    frames = first_frames(family, 1)
    if frames is not None:
        kwargs = {
            "num_frames": kwargs["num_frames"],
            "image": Image.fromarray((frames[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")),
        }
    guider = pipe.guider
    pipe.guider = guider.new(guidance_scale=guidance_scale)
    try:
        out = pipe(
            prompt=prompts,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type=output_type,
            **kwargs,
        )
    finally:
        pipe.guider = guider
    return out.frames


def ours(policy, family, prompts, generator, **kwargs):
    frames = first_frames(family, 1)
    images = None if frames is None else frames.repeat(len(prompts), 1, 1, 1)
    return va.sample(policy, prompts, generator=generator, images=images, **{**size_kwargs(family), **kwargs})


@pytest.mark.parametrize("family", HUNYUAN15_FAMILIES)
def test_tiny_pipeline_builds_fast_and_round_trips(family, tmp_path):
    start = time.perf_counter()
    pipe = tiny_pipeline(family, seed=1)
    assert time.perf_counter() - start < 1.0
    assert all(not m.training for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules())
    policy = va.wrap(pipe)
    before = stock(policy, family, ["a red circle"], torch.Generator().manual_seed(0), num_inference_steps=2)
    assert before.shape == (1, 5, 3, 32, 32) and 0 <= before.min() and before.max() <= 1
    pipe.save_pretrained(tmp_path)
    loaded = va.wrap(type(pipe).from_pretrained(tmp_path, local_files_only=True))
    loaded.pipe.set_progress_bar_config(disable=True)
    after = stock(loaded, family, ["a red circle"], torch.Generator().manual_seed(0), num_inference_steps=2)
    # the reloaded weights are the same; kernels may round them apart by ~1e-6
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert loaded.family == family


@pytest.mark.parametrize("family", HUNYUAN15_FAMILIES)
def test_ode_matches_stock_pipeline(tiny_policies, family):
    policy = tiny_policies(family)
    expected = stock(policy, family, PROMPTS, torch.Generator().manual_seed(0))
    traj = ours(
        policy, family, PROMPTS, torch.Generator().manual_seed(0), num_steps=4, guidance_scale=4.0, sampler="ode"
    )
    assert traj.images.shape == expected.shape
    torch.testing.assert_close(traj.images, expected.float(), rtol=0, atol=STOCK_ATOL)
    latents = stock(policy, family, PROMPTS, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(traj.final_latents, latents.float(), rtol=0, atol=STOCK_ATOL)
    other = ours(
        policy, family, PROMPTS, torch.Generator().manual_seed(1), num_steps=4, guidance_scale=4.0, sampler="ode"
    )
    assert (other.final_latents - traj.final_latents).abs().max() > 1e-2


def test_guidance_defaults_to_the_guider_and_its_original_formulation(tiny_policies):
    family = "hunyuan-video15"
    policy = tiny_policies(family)
    assert policy.pipe.guider.guidance_scale == 6.0
    expected = stock(
        policy,
        family,
        PROMPTS[:1],
        torch.Generator().manual_seed(0),
        guidance_scale=6.0,
        output_type="latent",
        num_inference_steps=2,
    )
    traj = ours(policy, family, PROMPTS[:1], torch.Generator().manual_seed(0), num_steps=2, sampler="ode")
    torch.testing.assert_close(traj.final_latents, expected.float(), rtol=0, atol=STOCK_ATOL)

    pipe = tiny_pipeline(family)
    pipe.guider = pipe.guider.new(guidance_scale=2.0, use_original_formulation=True)  # c + s·(c − u)
    original = pipe(
        prompt=PROMPTS[:1],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **size_kwargs(family),
    ).frames
    traj = ours(va.wrap(pipe), family, PROMPTS[:1], torch.Generator().manual_seed(0), num_steps=2, sampler="ode")
    torch.testing.assert_close(traj.final_latents, original.float(), rtol=0, atol=STOCK_ATOL)


@pytest.mark.parametrize("family", HUNYUAN15_FAMILIES)
def test_recomputed_ratio_is_one_on_policy(tiny_policies, family):
    generic.test_recomputed_ratio_is_one_on_policy(tiny_policies, family)


@pytest.mark.parametrize("family", HUNYUAN15_FAMILIES)
def test_stored_log_prob_is_the_gaussian_density(tiny_policies, family):
    generic.test_stored_log_prob_is_the_gaussian_density(tiny_policies, family)


def test_zero_noise_reproduces_ode(tiny_policies):
    generic.test_zero_noise_reproduces_ode(tiny_policies, "hunyuan-video15")


@pytest.mark.parametrize("family", HUNYUAN15_FAMILIES)
def test_lora_export_loads_into_the_stock_transformer(family, tmp_path):
    """No pipeline LoRA loader: the export loads with ``pipe.transformer.load_lora_adapter(folder)``."""
    policy = va.wrap(tiny_pipeline(family, seed=0))
    policy.add_lora(rank=4, alpha=8, init_lora_weights=False)
    kwargs = dict(num_steps=3, sampler="ode", guidance_scale=4.0)
    lora = ours(policy, family, PROMPTS, torch.Generator().manual_seed(0), **kwargs)
    with policy.adapters_disabled():
        base = ours(policy, family, PROMPTS, torch.Generator().manual_seed(0), **kwargs)
    assert (lora.images - base.images).abs().max() > 1e-4
    policy.save_lora(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()

    fresh = tiny_pipeline(family, seed=0)
    fresh.transformer.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")  # documented
    loaded = ours(va.wrap(fresh), family, PROMPTS, torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(loaded.images, lora.images, rtol=0, atol=1e-5)
    other = va.wrap(tiny_pipeline(family, seed=0))
    other.load_lora(str(tmp_path))
    again = ours(other, family, PROMPTS, torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(again.images, lora.images, rtol=0, atol=1e-5)


def test_i2v_first_frame_conditions_and_other_sizes_are_fitted(tiny_policies):
    family = "hunyuan-video15-i2v"
    policy = tiny_policies(family)
    geometry = policy.geometry(**size_kwargs(family))
    images = first_frames(family, 2)
    conditioning = policy.encode_prompt(PROMPTS, images=images, geometry=geometry)
    assert conditioning.cond["image_latent"].shape == (2, 32, 1, 2, 2)
    assert conditioning.cond["image_embeds"].shape == (2, 16, 16)  # SigLIP: 4x4 patches of 8 px, width 16
    larger = torch.nn.functional.interpolate(images, size=(48, 64), mode="bilinear")
    fitted = policy.encode_prompt(PROMPTS, images=larger, geometry=geometry)
    assert fitted.cond["image_latent"].shape == (2, 32, 1, 2, 2)
    with pytest.raises(InvalidInputError, match="first frame"):
        policy.encode_prompt(PROMPTS, geometry=geometry)


def test_unsupported_variants():
    pipe = tiny_pipeline("hunyuan-video15")
    pipe.guider = pipe.guider.new(guidance_rescale=0.7)
    with pytest.raises(UnsupportedPipelineError, match="guidance_rescale=0.7"):
        va.wrap(pipe)
    pipe = tiny_pipeline("hunyuan-video15")
    pipe.guider = pipe.guider.new(start=0.2)
    with pytest.raises(UnsupportedPipelineError, match="start=0.2"):
        va.wrap(pipe)
    meanflow = tiny_pipeline("hunyuan-video15-i2v", transformer={"use_meanflow": True})
    with pytest.raises(UnsupportedPipelineError, match="use_meanflow"):
        va.wrap(meanflow)
    with pytest.raises(InvalidInputError, match="4·n\\+1.*num_frames=5"):
        va.wrap(tiny_pipeline("hunyuan-video15")).geometry(32, 32, 6)
