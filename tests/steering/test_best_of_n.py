"""Best-of-N: the best candidate per prompt, batched and chunked."""

import torch

import visalign as va
from tests.conftest import PROMPTS, first_frames, size_kwargs
from visalign.testing import brightness


def test_best_of_n_keeps_the_best_candidate(tiny_policies):
    policy, n = tiny_policies("sd3"), 4
    out = va.best_of_n(
        policy, PROMPTS, brightness, n=n, num_steps=4, generator=torch.Generator().manual_seed(0), **size_kwargs("sd3")
    )
    assert out.images.shape == (2, 3, 32, 32) and out.all_images.shape == (2, n, 3, 32, 32)
    torch.testing.assert_close(out.all_rewards, brightness(out.all_images.flatten(0, 1), None).view(2, n))
    torch.testing.assert_close(out.rewards, out.all_rewards.max(1).values)
    for p in range(2):
        assert torch.equal(out.images[p], out.all_images[p, out.best_index[p]])
    assert out.all_rewards.std(1).min() > 0  # candidates differ
    assert out.num_model_evals == 2 * n * 4
    # The candidates are exactly visalign.sample's group of n, for the same generator.
    traj = va.sample(
        policy, PROMPTS, num_steps=4, group_size=n, generator=torch.Generator().manual_seed(0), **size_kwargs("sd3")
    )
    assert torch.equal(out.all_images.flatten(0, 1), traj.images)


def test_chunking_does_not_change_candidates(tiny_policies):
    # With one generator per candidate the result is independent of how the batch is chunked.
    policy, n = tiny_policies("sd"), 3
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2 * n)]  # noqa: E731
    whole = va.best_of_n(policy, PROMPTS, brightness, n=n, num_steps=3, generator=gens(), **size_kwargs("sd"))
    chunked = va.best_of_n(
        policy,
        PROMPTS,
        brightness,
        n=n,
        num_steps=3,
        generator=gens(),
        max_batch_size=4,
        return_all=False,
        **size_kwargs("sd"),
    )
    torch.testing.assert_close(chunked.all_rewards, whole.all_rewards, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.images, whole.images, rtol=0, atol=1e-5)
    assert chunked.all_images is None


def test_best_of_n_i2v_with_ode(tiny_policies):
    policy = tiny_policies("wan-i2v")
    out = va.best_of_n(
        policy,
        PROMPTS,
        va.rewards.SegmentalVideoReward(brightness, segments=2, sampling="fixed"),
        n=2,
        num_steps=2,
        sampler="ode",
        images=first_frames("wan-i2v", 2),
        generator=torch.Generator().manual_seed(0),
        max_batch_size=3,
        **size_kwargs("wan-i2v"),
    )
    assert out.images.shape == (2, 5, 3, 32, 32) and out.all_rewards.shape == (2, 2)
