"""The diffusers-native callbacks, run inside stock pipelines' ``callback_on_step_end``."""

import pytest
import torch

from visalign.errors import NotDifferentiableError, SamplerError
from visalign.rewards import FunctionReward
from visalign.steering import FKResampleCallback, RewardGuidanceCallback
from visalign.testing import brightness, tiny_pipeline


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_pipeline("sd3", seed=0)


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_pipeline("sd", seed=0)


def _run(pipe, prompts, callback=None, **kwargs):
    return pipe(
        prompts,
        height=32,
        width=32,
        num_inference_steps=5,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=callback,
        **kwargs,
    ).images


def test_guidance_callback_in_a_stock_pipeline(sd3_pipe):
    prompts = ["a red circle", "a blue square"]
    base = brightness(_run(sd3_pipe, prompts), None)
    kwargs = dict(height=32, width=32, normalize_grad=True)
    assert torch.equal(
        _run(sd3_pipe, prompts, RewardGuidanceCallback(brightness, prompts, scale=0.0, **kwargs)),
        _run(sd3_pipe, prompts),
    )
    up = RewardGuidanceCallback(brightness, prompts, scale=0.3, **kwargs)
    down = RewardGuidanceCallback(brightness, prompts, scale=-0.3, steps=(0, 3), through_model=False, **kwargs)
    assert bool((brightness(_run(sd3_pipe, prompts, up), None) > base + 0.01).all())
    assert bool((brightness(_run(sd3_pipe, prompts, down), None) < base - 0.01).all())
    assert len(up.grad_norms) == 5 and len(down.grad_norms) == 3
    with pytest.raises(NotDifferentiableError):
        RewardGuidanceCallback(FunctionReward(brightness, differentiable=False), prompts)


def test_fk_callback_resamples_stochastic_ddim(sd_pipe):
    prompts, n = ["a red circle", "a blue square"], 4
    cb = FKResampleCallback(
        brightness, prompts, lam=3e3, resample_every=1, resampler="multinomial", height=32, width=32
    )
    images = _run(sd_pipe, prompts, cb, num_images_per_prompt=n, eta=1.0)
    assert images.shape == (2 * n, 3, 32, 32)
    assert cb.rewards.shape == (2, n) and cb.best_index.shape == (2,)
    assert len(cb.ess) == len(cb.ancestry) == 5 and all(bool(r.all()) for r in cb.resampled)
    assert any(bool((a != torch.arange(n)).any()) for a in cb.ancestry)  # particles moved
    # The rewards it reports are those of the images the pipeline returned.
    torch.testing.assert_close(cb.rewards.flatten(), brightness(images, None), rtol=0, atol=1e-5)
    # A second call starts afresh.
    _run(sd_pipe, prompts, cb, num_images_per_prompt=n, eta=1.0)
    assert len(cb.ess) == 5


def test_fk_callback_refuses_deterministic_schedulers(sd3_pipe, sd_pipe):
    with pytest.raises(SamplerError, match="deterministic FlowMatchEulerDiscreteScheduler"):
        _run(sd3_pipe, ["a"], FKResampleCallback(brightness, ["a"], height=32, width=32), num_images_per_prompt=2)
    cb = FKResampleCallback(brightness, ["a"], lam=3e3, resample_every=1, resampler="multinomial", height=32, width=32)
    with pytest.raises(SamplerError, match="eta > 0"):
        _run(sd_pipe, ["a"], cb, num_images_per_prompt=4, eta=0.0)
