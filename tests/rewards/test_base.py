"""The Reward interface: validation, call_reward, differentiability, chunking, placement."""

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.errors import InvalidInputError, NotDifferentiableError, RewardError
from visalign.rewards import FunctionReward, Reward, as_reward, call_reward
from visalign.testing import brightness


class Mean(Reward):
    """A tiny reward with a weight: w * mean(images); counts its calls."""

    default_name = "mean"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.w = torch.nn.Parameter(torch.tensor(2.0))
        self.chunks = []

    def score(self, images, prompts, offset: float = 0.0):
        self.chunks.append(images.shape[0])
        return self.w * images.mean(dim=(1, 2, 3)) + offset


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "images, match",
    [
        (rand_images()[0], r"rank 3.*images\[None\]"),
        (rand_images(2)[:, None].expand(2, 4, 3, 40, 48), r"video.*SegmentalVideoReward"),
        (rand_images(2).permute(0, 2, 3, 1), r"channels-last"),
        (rand_images(2)[:, :1], r"got 1.*grayscale"),
        (rand_images(2) * 2 - 1, r"\[-1, 1\].*\(images \+ 1\) / 2"),
        (rand_images(2) * 255, r"\[0, 255\].*divide by 255"),
        ((rand_images(2) * 255).to(torch.uint8), r"floating point.*255"),
        (rand_images(2).numpy(), r"torch.Tensor"),
        (torch.full((1, 3, 4, 4), float("nan")), r"NaN"),
    ],
)
def test_bad_images_get_clear_errors(images, match):
    with pytest.raises(InvalidInputError, match=match):
        Mean()(images, ["p"] * len(images))


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([], r"empty prompt list"),
        (["only one"], r"got 1 prompts for 2 images"),
        ("a bare string", r"single str.*\[prompt\] \* 2"),
        (["ok", 3], r"item 1 is int"),
        (None, r"needs prompts"),
    ],
)
def test_bad_prompts_get_clear_errors(prompts, match):
    with pytest.raises(InvalidInputError, match=match):
        Mean()(rand_images(2), prompts)


def test_unknown_conditioning_is_refused_on_direct_calls_but_dropped_by_call_reward():
    r = Mean()
    with pytest.raises(InvalidInputError, match=r"unexpected conditioning \['typo'\]"):
        r(rand_images(2), ["a", "b"], typo=1)
    out = call_reward(r, rand_images(2), ["a", "b"], typo=1, offset=1.0)
    assert torch.allclose(out.total, 2 * rand_images(2).mean(dim=(1, 2, 3)) + 1.0)


# ---------------------------------------------------------------- output, placement, chunking
def test_output_is_float32_on_the_images_device():
    out = Mean()(rand_images(3).double(), ["a"] * 3)
    assert out.dtype == torch.float32 and out.shape == (3,) and out.device.type == "cpu"


def test_batch_size_chunks_and_slices_per_sample_conditioning():
    r = Mean(batch_size=2)
    x = rand_images(5)
    offsets = torch.arange(5.0)
    out = r(x, ["p"] * 5, offset=offsets)
    assert r.chunks == [2, 2, 1]
    assert torch.allclose(out, 2 * x.mean(dim=(1, 2, 3)) + offsets)


# ---------------------------------------------------------------- differentiability
def test_differentiable_reward_passes_gradients_to_pixels():
    x = rand_images(2, requires_grad=True)
    Mean()(x, ["a", "b"]).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, torch.full_like(x, 2.0 / x[0].numel()))


def test_non_differentiable_reward_refuses_backprop_with_a_clear_error():
    r = Mean(differentiable=False)
    x = rand_images(2, requires_grad=True)
    out = r(x, ["a", "b"])
    assert out.requires_grad  # attached to the graph only to refuse
    assert torch.allclose(out.detach(), 2 * x.detach().mean(dim=(1, 2, 3)))
    with pytest.raises(NotDifferentiableError, match=r"reward 'mean' is not differentiable"):
        (out * 3).sum().backward()
    # detached scores (e.g. advantages) are fine, and inputs without grad give a constant
    assert not r(x.detach(), ["a", "b"]).requires_grad


# ---------------------------------------------------------------- plain callables
def test_plain_callables_are_rewards_and_outputs_are_checked():
    x = rand_images(3)
    assert torch.allclose(call_reward(brightness, x, ["p"] * 3).total, x.mean(dim=(1, 2, 3)))
    assert torch.allclose(call_reward(lambda im, pr: [1, 2, 3], x, None).total, torch.tensor([1.0, 2, 3]))
    with pytest.raises(RewardError, match=r"shape \(3, 1\).*squeeze"):
        call_reward(lambda im, pr: torch.zeros(3, 1), x, None)
    with pytest.raises(RewardError, match=r"non-finite"):
        call_reward(lambda im, pr: torch.tensor([0.0, float("nan"), 1.0]), x, None)
    with pytest.raises(RewardError, match=r"returned str"):
        call_reward(lambda im, pr: "nope", x, None)
    with pytest.raises(InvalidInputError, match=r"must be a visalign Reward or a callable"):
        call_reward(42, x, None)


def test_as_reward_wraps_callables_and_keeps_rewards():
    r = Mean()
    assert as_reward(r) is r
    wrapped = as_reward(brightness)
    assert isinstance(wrapped, FunctionReward) and wrapped.name == "brightness"
    assert wrapped.differentiable

    def not_diff(images, prompts):
        return images.mean(dim=(1, 2, 3))

    not_diff.differentiable = False
    w = as_reward(not_diff)
    x = rand_images(2, requires_grad=True)
    with pytest.raises(NotDifferentiableError):
        w(x, None).sum().backward()
