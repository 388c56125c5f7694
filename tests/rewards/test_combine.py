"""Combined: weighted sums, components that add up, running normalisation; the RewardResult."""

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.errors import ConfigError, NotDifferentiableError, RewardError
from visalign.rewards import Combined, Reward, RewardResult, RunningNorm, call_reward
from visalign.testing import brightness


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
    assert isinstance(out, RewardResult) and r.differentiable and r.name == "combined"


def test_the_result_has_components_raw_scores_and_weights():
    x = rand_images(4)
    members = {"bright": (brightness, 2.0), "red": (redness, -0.5)}
    out = call_reward(Combined(members), x, ["p"] * 4)
    assert set(out.components) == set(out.raw) == set(out.weights) == {"bright", "red"}
    assert out.weights == {"bright": 2.0, "red": -0.5}
    torch.testing.assert_close(sum(out.components.values()), out.total)
    for key, (fn, w) in members.items():
        torch.testing.assert_close(out.raw[key], fn(x))  # each member's own score
        torch.testing.assert_close(out.components[key], w * fn(x))
    assert all(v.dtype == torch.float32 and v.shape == (4,) for v in [out.total, *out.raw.values()])


def test_each_member_is_scored_once_per_call():
    calls = []

    def counted(images, prompts=None):
        calls.append(images.shape[0])
        return images.mean(dim=(1, 2, 3))

    r = Combined({"a": counted, "b": redness})
    x = rand_images(3)
    call_reward(r, x, None)
    r(x, None)
    assert calls == [3, 3]


def test_a_plain_callable_gives_a_result_without_parts():
    x = rand_images(3)
    out = call_reward(brightness, x, ["p"] * 3)
    assert isinstance(out, RewardResult)
    assert out.components == {} and out.raw == {} and out.weights == {}
    torch.testing.assert_close(out.total, brightness(x))
    single = Offset().evaluate(x, ["p"] * 3)  # a single Reward has no parts either
    assert single.components == {} and single.raw == {} and single.weights == {}


def test_wrong_shapes_still_raise_reward_errors():
    x = rand_images(3)
    with pytest.raises(RewardError, match=r"shape \(3, 1\)"):
        call_reward(lambda im, pr: torch.zeros(3, 1), x, None)
    with pytest.raises(RewardError, match=r"shape \(2,\)"):
        call_reward(Combined({"a": brightness, "bad": lambda im, pr: torch.zeros(2)}), x, None)


def test_result_helpers_select_detach_move_and_concatenate():
    x = rand_images(4, requires_grad=True)
    out = Combined({"bright": (brightness, 2.0), "red": redness}).evaluate(x, None)
    assert out.total.requires_grad and not out.detach().total.requires_grad
    assert not out.detach().components["red"].requires_grad
    head = out.select(slice(0, 2))
    picked = out.select([3, 0])
    torch.testing.assert_close(picked.raw["red"], out.raw["red"][[3, 0]])
    torch.testing.assert_close(out.select(torch.tensor([1])).total, out.total[1:2])
    whole = RewardResult.cat([head, out.select(slice(2, 4))])
    torch.testing.assert_close(whole.total, out.total)
    torch.testing.assert_close(whole.components["bright"], out.components["bright"])
    assert whole.weights == out.weights
    assert out.to("cpu").total.device.type == "cpu"
    assert out.to(torch.float64).total.dtype == torch.float64
    assert out.to(torch.float64).float().raw["bright"].dtype == torch.float32
    with pytest.raises(ValueError, match="different parts"):
        RewardResult.cat([out, RewardResult(out.total)])


def test_conditioning_goes_only_to_rewards_that_take_it():
    x = rand_images(3)
    bonus = torch.tensor([1.0, 2.0, 3.0])
    r = Combined({"off": Offset(), "bright": brightness})
    out = r.evaluate(x, ["p"] * 3, bonus=bonus)
    torch.testing.assert_close(out.raw["off"], brightness(x) + bonus)
    torch.testing.assert_close(call_reward(r, x, ["p"] * 3, bonus=bonus, unused=1).total, out.total)


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
            expected = (out.raw[key].double() - pooled.mean()) / torch.sqrt(pooled.var(unbiased=False) + 1e-6)
            normalized = out.components[key] / out.weights[key]
            assert out.weights[key] == w
            torch.testing.assert_close(normalized.double(), expected, rtol=1e-4, atol=1e-5)
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
