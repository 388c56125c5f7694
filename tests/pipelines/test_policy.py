"""Policy adapters: wrapping, loading, geometry, decode/encode, LoRA export, and bad input."""

import pytest
import torch

import visalign as va
from tests.conftest import FAMILIES, PROMPTS, first_frames, size_kwargs
from visalign.errors import InvalidInputError, SamplerError, UnknownFamilyError, UnsupportedPipelineError
from visalign.testing import tiny_pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_picks_the_family_adapter(tiny_policies, family):
    policy = tiny_policies(family)
    assert policy.family == family
    assert policy.denoiser is getattr(policy.pipe, policy.denoiser_name)
    schedule = policy.schedule(4, policy.geometry(**size_kwargs(family)))
    assert schedule.num_steps == 4
    if policy.is_flow:
        assert schedule.sigmas.shape == (5,) and schedule.sigmas[0] == 1.0 and schedule.sigmas[-1] == 0.0
    else:
        assert schedule.timesteps.tolist() == [751.0, 501.0, 251.0, 1.0]  # DDIM "leading", offset 1
        assert (schedule.alphas_cumprod_prev[:-1] == schedule.alphas_cumprod[1:]).all()


def test_sd3_sigmas_are_read_not_rederived(tiny_policies):
    # shift 3, 4 steps: the scheduler shifts an already-shifted σ_min (PITFALLS, "Schedules").
    policy = tiny_policies("sd3")
    sigmas = policy.schedule(4, policy.geometry(**size_kwargs("sd3"))).sigmas
    assert sigmas[:4].tolist() == pytest.approx([1.0, 0.858, 0.602, 0.0089], abs=1e-3)


def test_unsupported_pipeline_lists_the_supported_ones():
    class NotAPipeline:
        pass

    with pytest.raises(UnsupportedPipelineError, match="StableDiffusion3Pipeline") as info:
        va.wrap(NotAPipeline())
    assert "FluxPipeline" in str(info.value) and "register_adapter" in str(info.value)


def test_unknown_family():
    with pytest.raises(UnknownFamilyError, match="sd3"):
        tiny_pipeline("imagen")


def test_wrap_is_idempotent(tiny_policies):
    policy = tiny_policies("sd")
    assert va.wrap(policy) is policy


def test_load_from_a_local_folder(tmp_path):
    pipe = tiny_pipeline("flux", seed=0)
    pipe.save_pretrained(tmp_path)
    policy = va.load(str(tmp_path), local_files_only=True)
    assert policy.family == "flux"
    a = va.sample(
        va.wrap(pipe),
        PROMPTS,
        num_steps=3,
        sampler="ode",
        generator=torch.Generator().manual_seed(0),
        **size_kwargs("flux"),
    )
    b = va.sample(
        policy, PROMPTS, num_steps=3, sampler="ode", generator=torch.Generator().manual_seed(0), **size_kwargs("flux")
    )
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "sd3", "flux", "wan-t2v"])
def test_encode_decode_round_trip_is_differentiable(tiny_policies, family):
    policy = tiny_policies(family)
    geometry = policy.geometry(**size_kwargs(family))
    latents = policy.prepare_latents(1, geometry, torch.Generator().manual_seed(0)).requires_grad_(True)
    pixels = policy.decode(latents, geometry)
    expected = (
        (1, geometry.num_frames, 3, geometry.height, geometry.width)
        if policy.is_video
        else (1, 3, geometry.height, geometry.width)
    )
    assert pixels.shape == expected and 0 <= pixels.min() and pixels.max() <= 1
    pixels.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert policy.encode(pixels.detach()).shape == latents.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_export_loads_with_load_lora_weights(family, tmp_path):
    """A LoRA saved by the Policy loads with the stock ``pipe.load_lora_weights`` and samples the same."""
    policy = va.wrap(tiny_pipeline(family, seed=0))
    # Random B (not peft's zero init) and alpha ≠ rank, so the LoRA changes outputs and its scale matters.
    policy.add_lora(rank=4, alpha=8, init_lora_weights=False)
    trainable = [n for n, p in policy.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)

    kwargs = dict(num_steps=3, sampler="ode", images=first_frames(family, 2), **size_kwargs(family))
    ours = va.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    with policy.adapters_disabled():
        base = va.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (ours.images - base.images).abs().max() > 1e-4
    policy.save_lora(str(tmp_path))

    fresh = tiny_pipeline(family, seed=0)
    fresh.load_lora_weights(str(tmp_path))
    loaded = va.sample(va.wrap(fresh), PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(loaded.images, ours.images, rtol=0, atol=1e-5)
    plain = va.sample(
        va.wrap(tiny_pipeline(family, seed=0)), PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs
    )
    torch.testing.assert_close(plain.images, base.images, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- bad input
def test_prompt_and_image_batch_mismatch(tiny_policies):
    with pytest.raises(InvalidInputError, match="one image per prompt"):
        va.sample(
            tiny_policies("wan-i2v"), PROMPTS, num_steps=2, images=first_frames("wan-i2v", 3), **size_kwargs("wan-i2v")
        )


def test_i2v_without_images(tiny_policies):
    with pytest.raises(InvalidInputError, match="images="):
        va.sample(tiny_policies("wan-i2v"), PROMPTS, num_steps=2, **size_kwargs("wan-i2v"))


def test_image_outside_unit_range_hints_at_minus_one_one(tiny_policies):
    images = first_frames("wan-i2v", 2) * 2 - 1
    with pytest.raises(InvalidInputError, match=r"\(images \+ 1\) / 2"):
        va.sample(tiny_policies("wan-i2v"), PROMPTS, num_steps=2, images=images, **size_kwargs("wan-i2v"))


@pytest.mark.parametrize("family", ["sd", "flux", "wan-t2v"])
def test_size_not_divisible(tiny_policies, family):
    policy = tiny_policies(family)
    with pytest.raises(InvalidInputError, match="multiple of") as info:
        va.sample(policy, PROMPTS, num_steps=2, height=size_kwargs(family)["height"] + 1)
    assert "Use height=" in str(info.value)


def test_wan_num_frames_must_be_4k_plus_1(tiny_policies):
    with pytest.raises(InvalidInputError, match="num_frames=5"):
        va.sample(tiny_policies("wan-t2v"), PROMPTS, num_steps=2, height=32, width=32, num_frames=6)


def test_log_prob_of_ode_sampler(tiny_policies):
    policy = tiny_policies("sd3")
    traj = va.sample(policy, PROMPTS, num_steps=2, sampler="ode", **size_kwargs("sd3"))
    assert traj.log_probs is None
    with pytest.raises(SamplerError, match="ODE sampler"):
        va.log_prob(policy, traj, [0])


@pytest.mark.parametrize("num_steps", [0, -3])
def test_num_steps_below_one(tiny_policies, num_steps):
    with pytest.raises(InvalidInputError, match="num_steps must be >= 1"):
        va.sample(tiny_policies("sd3"), PROMPTS, num_steps=num_steps, **size_kwargs("sd3"))


def test_empty_prompts_and_family_sampler_mismatch(tiny_policies):
    with pytest.raises(InvalidInputError, match="empty"):
        va.sample(tiny_policies("sd3"), [], num_steps=2)
    with pytest.raises(SamplerError, match="'sde' or 'cps'"):
        va.sample(tiny_policies("sd3"), PROMPTS, num_steps=2, sampler="ddim", **size_kwargs("sd3"))
    with pytest.raises(SamplerError, match="use 'ddim'"):
        va.sample(tiny_policies("sd"), PROMPTS, num_steps=2, sampler="cps", **size_kwargs("sd"))


def test_wrong_latents_shape_and_generator_count(tiny_policies):
    policy = tiny_policies("sd3")
    with pytest.raises(InvalidInputError, match="latents must have shape"):
        va.sample(policy, PROMPTS, num_steps=2, latents=torch.zeros(2, 3, 4, 4), **size_kwargs("sd3"))
    with pytest.raises(InvalidInputError, match="one generator per sample"):
        va.sample(policy, PROMPTS, num_steps=2, generator=[torch.Generator()], **size_kwargs("sd3"))
