"""Combined: weighted sums, components that add up, running normalisation."""

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.testing import brightness
from visalign.errors import ConfigError, NotDifferentiableError
from visalign.rewards import Combined, Reward, RunningNorm, call_reward


def redness(images, prompts=None):
    return images[:, 0].mean(dim=(1, 2))


class Offset(Reward):
    """Takes an optional per-sample conditioning the other rewards don't."""

    default_name = "offset"

    def score(self, images, prompts, bonus=None):
        return images.mean(dim=(1, 2, 3)) + (0 if bonus is None else bonus)


def test_components_add_up_to_the_total():
    x = rand_images(4)
    r = Combined({"bright": (brightness, 2.0), "red": (redness, -0.5), "plain": brightness})
    out = r.evaluate(x, ["p"] * 4)
    torch.testing.assert_close(sum(out.components.values()), out.total)
    torch.testing.assert_close(out.total, 2 * brightness(x) - 0.5 * redness(x) + brightness(x))
    torch.testing.assert_close(out.raw["red"], redness(x))
    torch.testing.assert_close(r(x, ["p"] * 4), out.total)
    assert r.last_output is not None and r.differentiable and r.name == "combined"


def test_conditioning_goes_only_to_rewards_that_take_it():
    x = rand_images(3)
    bonus = torch.tensor([1.0, 2.0, 3.0])
    r = Combined({"off": Offset(), "bright": brightness})
    out = r.evaluate(x, ["p"] * 3, bonus=bonus)
    torch.testing.assert_close(out.raw["off"], brightness(x) + bonus)
    torch.testing.assert_close(call_reward(r, x, ["p"] * 3, bonus=bonus, unused=1), out.total)


def test_running_normalisation_matches_pooled_statistics():
    batches = [rand_images(4, seed=s) for s in range(3)]
    r = Combined({"bright": brightness, "red": (redness, 3.0)}, normalize=True)
    seen = {"bright": [], "red": []}
    for x in batches:
        out = r.evaluate(x, None)
        seen["bright"].append(brightness(x))
        seen["red"].append(redness(x))
        for key, w in (("bright", 1.0), ("red", 3.0)):
            pooled = torch.cat(seen[key]).double()
            expected = (out.raw[key].double() - pooled.mean()) / torch.sqrt(
                pooled.var(unbiased=False) + 1e-6)
            torch.testing.assert_close(out.normalized[key].double(), expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.components[key], w * out.normalized[key])
        torch.testing.assert_close(sum(out.components.values()), out.total)
    # frozen statistics: the same batch normalises the same way twice
    r.update_stats = False
    a, b = r(batches[0], None), r(batches[0], None)
    torch.testing.assert_close(a, b)
    assert int(r.norms["bright"].count) == 12
    assert "norms.red.mean" in r.state_dict()  # statistics are checkpointed


def test_running_norm_with_momentum_and_a_single_sample():
    n = RunningNorm(momentum=0.5)
    n.update(torch.tensor([1.0]))
    assert n.normalize(torch.tensor([3.0])).item() == pytest.approx(2.0)  # only centred
    n.update(torch.tensor([3.0, 5.0]))
    assert n.mean.item() == pytest.approx(0.5 * 1 + 0.5 * 4)
    assert n.var.item() == pytest.approx(0.5 * 0 + 0.5 * 1 + 0.25 * 9)
    with pytest.raises(ConfigError):
        RunningNorm(momentum=0.0)


def test_differentiability_is_that_of_the_parts():
    x = rand_images(2, requires_grad=True)
    Combined({"a": brightness, "b": redness})(x, None).sum().backward()
    assert x.grad.abs().sum() > 0

    def frozen(images, prompts):
        return images.mean(dim=(1, 2, 3))

    frozen.differentiable = False
    mixed = Combined({"a": brightness, "b": frozen})
    assert not mixed.differentiable
    with pytest.raises(NotDifferentiableError):
        mixed(rand_images(2, requires_grad=True), None).sum().backward()
    with pytest.raises(ConfigError, match="without '.'"):
        Combined({"a.b": brightness})
