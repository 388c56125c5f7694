"""Reward-gradient guidance: exact at scale 0, moves the reward the right way, refuses non-differentiable rewards."""

import pytest
import torch

import visalign as va
from tests.conftest import PROMPTS, size_kwargs
from visalign.errors import NotDifferentiableError
from visalign.rewards import FunctionReward
from visalign.testing import brightness


def redness(images, prompts):
    return images[:, 0].flatten(1).mean(1) - images[:, 1:].flatten(1).mean(1)


def _guide(policy, family, reward, **kwargs):
    return va.reward_guidance(
        policy,
        PROMPTS,
        reward,
        num_steps=5,
        generator=torch.Generator().manual_seed(0),
        **size_kwargs(family),
        **kwargs,
    )


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_guidance_moves_the_reward(tiny_policies, family):
    policy = tiny_policies(family)
    plain = va.sample(policy, PROMPTS, num_steps=5, generator=torch.Generator().manual_seed(0), **size_kwargs(family))
    off = _guide(policy, family, brightness, scale=0.0)
    assert torch.equal(off.images, plain.images)  # scale 0 is plain sampling, same noise
    up = _guide(policy, family, brightness, scale=0.3, normalize_grad=True)
    down = _guide(policy, family, brightness, scale=-0.3, normalize_grad=True)
    cheap = _guide(
        policy,
        family,
        brightness,
        scale=0.3,
        normalize_grad=True,
        through_model=False,
        guidance_steps=(1, 5),
        max_batch_size=1,
    )
    base = brightness(plain.images, None)
    assert bool((up.rewards > base + 0.01).all()) and bool((down.rewards < base - 0.01).all())
    assert bool((cheap.rewards > base + 0.01).all())
    assert cheap.guided_steps == [1, 2, 3, 4] and bool((cheap.grad_norms[:, 0] == 0).all())
    assert bool((up.grad_norms > 0).all())


def test_weighted_rewards_and_components(tiny_policies):
    policy = tiny_policies("sd3")
    out = _guide(policy, "sd3", {"red": (redness, 1.0), "bright": (brightness, 0.5)}, scale=0.3, normalize_grad=True)
    plain = _guide(policy, "sd3", {"red": (redness, 1.0), "bright": (brightness, 0.5)}, scale=0.0)
    assert set(out.components) == {"red", "bright"}
    torch.testing.assert_close(out.components["red"] + out.components["bright"], out.rewards)
    assert bool((out.rewards > plain.rewards).all())
    assert bool((redness(out.images, None) > redness(plain.images, None)).all())


def test_non_differentiable_reward_is_refused(tiny_policies):
    frozen = FunctionReward(brightness, name="frozen_brightness", differentiable=False)
    with pytest.raises(NotDifferentiableError, match="frozen_brightness"):
        _guide(tiny_policies("sd3"), "sd3", [(brightness, 1.0), (frozen, 1.0)], scale=1.0)


def test_a_reward_without_gradient_is_refused_clearly(tiny_policies):
    """differentiable=False, or scores that come back detached, end in NotDifferentiableError, not torch's error."""
    policy = tiny_policies("sd3")
    with pytest.raises(NotDifferentiableError, match=r"'frozen'.*not differentiable"):
        _guide(policy, "sd3", FunctionReward(brightness, name="frozen", differentiable=False), scale=1.0)

    def detached(images, prompts):  # claims nothing, but its scores carry no gradient
        with torch.no_grad():
            return images.mean(dim=(1, 2, 3))

    with pytest.raises(NotDifferentiableError, match=r"'detached'.*carry no gradient"):
        _guide(policy, "sd3", detached, scale=1.0)


def test_steering_functions_take_the_sampling_keywords(tiny_policies):
    """The sampling keywords show in each signature (defaults: SamplingOptions'); group_size is the function's own."""
    import inspect

    from visalign.errors import ConfigError
    from visalign.sampling import SamplingOptions

    for fn in (va.best_of_n, va.fk_steer, va.reward_guidance):
        params = inspect.signature(fn).parameters
        assert params["num_steps"].default == SamplingOptions().num_steps
        assert params["sampler"].default == SamplingOptions().sampler
        assert {"eta", "noise", "guidance_scale", "generator", "height", "negative_prompt"} <= set(params)
        assert "group_size" not in params
    with pytest.raises(ConfigError, match="num_samples="):
        _guide(tiny_policies("sd3"), "sd3", brightness, scale=0.0, group_size=2)
