"""Segmental video reward (InstructVideo) and the multi-head video reward adapter."""

import math

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.errors import InvalidInputError, NotDifferentiableError, RewardError
from visalign.rewards import (
    CLIPScore,
    MultiHeadVideoReward,
    SegmentalVideoReward,
    attenuation_weights,
    call_reward,
    segment_indices,
)
from visalign.testing import brightness


def videos(batch=2, frames=10, size=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, size, size, generator=g).requires_grad_(requires_grad)


def test_fixed_indices_are_the_first_frame_of_each_segment():
    assert segment_indices(16, 4).tolist() == [0, 4, 8, 12]
    assert segment_indices(10, 4).tolist() == [0, 2, 5, 7]  # floor(s * 10 / 4)
    assert segment_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert segment_indices(10, 4, batch=3).tolist() == [[0, 2, 5, 7]] * 3
    with pytest.raises(InvalidInputError, match="cannot split 3 frames into 4"):
        segment_indices(3, 4)


def test_tsn_indices_stay_in_their_segments_and_are_seeded():
    g = torch.Generator().manual_seed(0)
    idx = segment_indices(10, 4, "tsn", batch=500, generator=g)
    lo, hi = torch.tensor([0, 2, 5, 7]), torch.tensor([2, 5, 7, 10])
    assert bool(((idx >= lo) & (idx < hi)).all())
    for s in range(4):  # every frame of every segment gets drawn
        assert set(idx[:, s].tolist()) == set(range(lo[s], hi[s]))
    again = segment_indices(10, 4, "tsn", batch=500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def test_attenuation_weights_follow_the_formula_and_sum_to_one():
    idx = torch.tensor([0, 4, 8, 12])
    w = attenuation_weights(idx, 16, 0.5)
    raw = torch.tensor([math.exp(-0.5 * abs(f - 8)) for f in (0, 4, 8, 12)])
    torch.testing.assert_close(w, raw / raw.sum())
    assert torch.allclose(attenuation_weights(idx, 16, 0.0), torch.full((4,), 0.25))
    many = attenuation_weights(torch.randint(0, 100, (7, 5)), 100, 1.0)
    torch.testing.assert_close(many.sum(-1), torch.ones(7))


def test_segmental_reward_equals_the_weighted_frame_average():
    v = videos(frames=10)
    reward = SegmentalVideoReward(brightness, segments=4, sampling="fixed", attenuation=0.3)
    idx = [0, 2, 5, 7]
    w = attenuation_weights(torch.tensor(idx), 10, 0.3)
    expected = (v[:, idx].mean(dim=(2, 3, 4)) * w).sum(-1)
    torch.testing.assert_close(reward(v, ["a", "b"]), expected)
    assert reward.last_frame_indices.tolist() == [idx, idx]
    # TSN: reproducible from the seed, different per video, and the reported weights sum to 1
    tsn_a, tsn_b = (SegmentalVideoReward(brightness, 4, "tsn", seed=3) for _ in range(2))
    torch.testing.assert_close(tsn_a(v, ["a", "b"]), tsn_b(v, ["a", "b"]))
    torch.testing.assert_close(tsn_a.last_weights.sum(-1), torch.ones(2))


def test_segmental_reward_keeps_differentiability_of_its_image_reward(clip_pair):
    v = videos(frames=6, size=16, requires_grad=True)
    reward = SegmentalVideoReward(CLIPScore(*clip_pair, variant="cosine"), segments=3)
    assert reward.differentiable and reward.name == "segmental_clipscore"
    reward(v, ["a red cat", "a dog"]).sum().backward()
    touched = (v.grad.abs().sum(dim=(2, 3, 4)) > 0).sum(-1)
    assert touched.tolist() == [3, 3]  # exactly one frame per segment gets a gradient

    def frozen(images, prompts):
        return images.mean(dim=(1, 2, 3))

    frozen.differentiable = False
    v2 = videos(requires_grad=True)
    with pytest.raises(NotDifferentiableError):
        SegmentalVideoReward(frozen, 2)(v2, ["a", "b"]).sum().backward()


def test_video_to_an_image_reward_and_image_to_a_video_reward_are_refused(clip_pair):
    with pytest.raises(InvalidInputError, match="SegmentalVideoReward"):
        CLIPScore(*clip_pair)(videos(), ["a", "b"])
    with pytest.raises(InvalidInputError, match=r"video reward.*images\[:, None\]"):
        SegmentalVideoReward(brightness, 2)(rand_images(2), ["a", "b"])


def test_multi_head_adapter_sums_normalised_heads():
    def model(v, prompts):  # a VideoAlign-like model: named sub-scores
        m = v.mean(dim=(1, 2, 3, 4))
        return {"VQ": m, "MQ": 2 * m, "TA": torch.ones_like(m)}

    v = videos()
    m = v.mean(dim=(1, 2, 3, 4))
    plain = MultiHeadVideoReward(model)
    torch.testing.assert_close(plain(v, ["a", "b"]), 3 * m + 1)
    normed = MultiHeadVideoReward(model, heads=["VQ", "MQ"], weights={"MQ": 0.5}, normalization={"VQ": (0.5, 0.1)})
    out = normed.evaluate(v, ["a", "b"])  # the summed heads are the result's parts
    assert set(out.components) == set(out.raw) == {"VQ", "MQ"}
    assert out.weights == {"VQ": 1.0, "MQ": 0.5}
    torch.testing.assert_close(out.components["VQ"], (m - 0.5) / 0.1)
    torch.testing.assert_close(out.components["MQ"], 0.5 * 2 * m)
    torch.testing.assert_close(out.raw["VQ"], m)
    torch.testing.assert_close(out.total, (m - 0.5) / 0.1 + 0.5 * 2 * m)
    torch.testing.assert_close(sum(out.components.values()), out.total)
    torch.testing.assert_close(normed(v, ["a", "b"]), out.total)
    chunked = MultiHeadVideoReward(
        model, heads=["VQ", "MQ"], weights={"MQ": 0.5}, normalization={"VQ": (0.5, 0.1)}, batch_size=1
    )
    torch.testing.assert_close(call_reward(chunked, v, ["a", "b"]).components["MQ"], out.components["MQ"])
    # a (B, K) tensor output with head names
    as_tensor = MultiHeadVideoReward(
        lambda v, p: torch.stack([v.mean((1, 2, 3, 4))] * 3, 1), head_names=["VQ", "MQ", "TA"]
    )
    torch.testing.assert_close(as_tensor(v, ["a", "b"]), 3 * m)
    with pytest.raises(RewardError, match="head_names"):
        MultiHeadVideoReward(lambda v, p: torch.zeros(2, 3))(v, ["a", "b"])
