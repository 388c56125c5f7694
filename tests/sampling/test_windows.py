"""SDE windows (docs/math.md §10, §13 "Windows"): Flow-GRPO-Fast's random window in a range, MixGRPO's sliding one."""

import os
from collections import Counter

import pytest
import torch

import visalign as va
import visalign.algorithms.grpo as grpo_module
from visalign.errors import ConfigError
from visalign.losses.grpo import select_train_steps
from visalign.recipes import parse_recipe
from visalign.sampling.options import SamplingOptions
from visalign.testing import brightness, tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["a red circle", "a blue square"]
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def sd3():
    return va.wrap(tiny_pipeline("sd3"))


def _sample(policy, **kwargs):
    return va.sample(policy, PROMPTS, num_steps=6, generator=torch.Generator().manual_seed(0), **SIZE, **kwargs)


# ---------------------------------------------------------------------------- sampling in a window
def test_zero_noise_reproduces_the_ode_bit_for_bit(sd3):
    ode = _sample(sd3, sampler="ode")
    for window in (None, (1, 4)):
        for noise in ("flow", "dance"):
            traj = _sample(sd3, sampler="sde", noise=noise, eta=0.0, sde_window=window)
            assert torch.equal(traj.latents, ode.latents), (window, noise)
            assert not traj.sde_mask.any()
    # CPS at noise 0 lands on the ODE's point through x̂0 and x̂1, equal up to float rounding
    cps = _sample(sd3, sampler="cps", eta=0.0, sde_window=(1, 4))
    torch.testing.assert_close(cps.latents, ode.latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["cps", "sde"])
def test_only_the_window_carries_log_probs(sd3, sampler):
    options = SamplingOptions(
        num_steps=6, sampler=sampler, sde_window_size=3, sde_window_mode="random", sde_window_range=(0, 5)
    )
    ode = _sample(sd3, sampler="ode")
    for iteration in range(4):
        start, end = options.sde_window_at(iteration, seed=0)
        traj = va.sample(
            sd3, PROMPTS, **options.sample_kwargs(iteration, 0), generator=torch.Generator().manual_seed(0), **SIZE
        )
        inside = [start <= i < end for i in range(6)]
        assert traj.sde_mask.tolist() == inside
        assert ((traj.log_probs != 0) == torch.tensor(inside)).all()  # exactly W log-probs per sample
        assert (traj.log_probs != 0).sum(1).tolist() == [3, 3]
        # before the window: the ODE, bit for bit; after it: deterministic steps (state = mean)
        assert torch.equal(traj.latents[:, : start + 1], ode.latents[:, : start + 1])
        for i in range(end, 6):
            assert torch.equal(traj.latents[:, i + 1], traj.means[:, i])
        # the W trained transitions touch W+1 states, and every one of them moved off the ODE
        assert not torch.equal(traj.latents[:, end], ode.latents[:, end])
        steps = select_train_steps(traj.sde_mask, 2, 0.6, None, window=(start, end))
        assert steps.tolist() == [list(range(start, end))] * 2


def test_a_window_on_the_last_step_loses_it():
    """The last step is always the ODE: a window that covers it has W−1 stochastic steps."""
    policy = va.wrap(tiny_pipeline("sd3"))
    traj = va.sample(
        policy,
        PROMPTS,
        num_steps=6,
        sampler="cps",
        sde_window=(3, 6),
        **SIZE,
        generator=torch.Generator().manual_seed(0),
    )
    assert traj.sde_mask.tolist() == [False, False, False, True, True, False]
    assert select_train_steps(traj.sde_mask, 2, 1.0, None, window=(3, 6)).tolist() == [[3, 4]] * 2


# ---------------------------------------------------------------------------- window schedules
def test_random_start_is_uniform_on_the_range():
    options = SamplingOptions(num_steps=10, sde_window_size=3, sde_window_mode="random", sde_window_range=(0, 5))
    starts = Counter(options.sde_window_at(i, seed=3)[0] for i in range(600))
    assert set(starts) == {0, 1, 2}  # [lo, hi − W]
    assert min(starts.values()) > 150  # about 200 each
    shifted = SamplingOptions(num_steps=10, sde_window_size=2, sde_window_mode="random", sde_window_range=(3, 8))
    assert {shifted.sde_window_at(i, seed=0)[0] for i in range(200)} == {3, 4, 5, 6}
    # one draw per iteration from (seed, iteration) only: the same on every rank and on a resumed run
    assert options.sde_window_at(17, seed=3) == options.sde_window_at(17, seed=3)
    assert [options.sde_window_at(i, seed=3) for i in range(30)] != [
        options.sde_window_at(i, seed=4) for i in range(30)
    ]


def test_a_range_confines_fixed_and_sliding_windows():
    fixed = SamplingOptions(num_steps=10, sde_window_size=3, sde_window_start=6, sde_window_range=(2, 7))
    assert fixed.sde_window_at(0) == (4, 7)  # the start is clamped to hi − W
    sliding = SamplingOptions(num_steps=10, sde_window_size=2, sde_window_mode="sliding", sde_window_range=(2, 6))
    assert [sliding.sde_window_at(i)[0] for i in range(7)] == [2, 3, 4, 2, 3, 4, 2]


def test_mixgrpo_window_slides_shrinks_and_rolls_back():
    # MixGRPO: 25 steps, W = 4, start += 1 every 25 iterations, window [start, min(start+4, 23))
    options = SamplingOptions(
        num_steps=25, sde_window_size=4, sde_window_mode="mixgrpo", sde_window_shift_every=25, sde_window_range=(0, 23)
    )
    for iteration in range(0, 23 * 25, 7):
        start = iteration // 25
        assert options.sde_window_at(iteration) == (start, min(start + 4, 23)), iteration
    assert options.sde_window_at(19 * 25) == (19, 23)
    assert options.sde_window_at(20 * 25) == (20, 23)  # shrinks near the end of the range
    assert options.sde_window_at(22 * 25) == (22, 23)
    assert options.sde_window_at(23 * 25) == (0, 4)  # rolls back instead of an empty window
    # without a range it stops short of the last step, which is always the ODE
    default = SamplingOptions(num_steps=6, sde_window_size=3, sde_window_mode="mixgrpo")
    assert [default.sde_window_at(i) for i in range(6)] == [(0, 3), (1, 4), (2, 5), (3, 5), (4, 5), (0, 3)]


@pytest.mark.parametrize(
    "bad",
    [
        dict(sde_window_size=3, sde_window_range=(0, 2)),  # narrower than the window
        dict(sde_window_size=3, sde_window_range=(-1, 5)),
        dict(sde_window_size=3, sde_window_range=(0, 11)),  # past num_steps
        dict(sde_window_range=(0, 5)),  # no window
    ],
)
def test_bad_ranges_are_config_errors(bad):
    with pytest.raises(ConfigError, match="sde_window_range"):
        SamplingOptions(num_steps=10, **bad)


def test_range_reads_from_yaml_and_overrides():
    cfg = va.GRPOConfig(sde_window_size=3, sde_window_mode="random").with_overrides(["sde_window_range=[0, 5]"])
    assert cfg.sde_window_range == (0, 5) and cfg.to_dict()["sde_window_range"] == [0, 5]


# ---------------------------------------------------------------------------- recipes
def test_flow_grpo_fast_recipes():
    _, _, sd3 = parse_recipe(os.path.join(ROOT, "configs", "sd35m_grpo_fast.yaml"))
    assert (sd3.num_steps, sd3.sampler, sd3.eta, sd3.sde_window_size, sd3.sde_window_range) == (
        10,
        "cps",
        0.8,
        3,
        (0, 5),
    )
    assert (sd3.guidance_scale, sd3.cfg_in_training, sd3.kl_beta, sd3.group_size, sd3.updates_per_rollout) == (
        1.0,
        False,
        0.0,
        24,
        2,
    )
    assert sd3.learning_rate == 3e-4 and sd3.advantage_std == "global" and not sd3.same_noise_in_group
    assert {sd3.sde_window_at(i, sd3.seed)[0] for i in range(100)} == {0, 1, 2}
    _, _, flux = parse_recipe(os.path.join(ROOT, "configs", "flux_grpo_fast.yaml"))
    assert (flux.num_steps, flux.sampler, flux.eta, flux.guidance_scale, flux.mixed_precision) == (
        6,
        "cps",
        0.8,
        3.5,
        "bf16",
    )
    # FLUX's defaults leave one position: the window is always steps 0-2
    assert {flux.sde_window_at(i, flux.seed) for i in range(100)} == {(0, 3)}


# ---------------------------------------------------------------------------- GRPO trains the window
def test_grpo_trains_exactly_the_window_steps(tmp_path, monkeypatch):
    scored = []
    real = grpo_module.log_prob

    def spy(policy, traj, steps, **kwargs):
        scored.append(torch.as_tensor(steps).tolist())
        return real(policy, traj, steps, **kwargs)

    monkeypatch.setattr(grpo_module, "log_prob", spy)
    cfg = va.GRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        num_steps=6,
        group_size=2,
        prompts_per_step=2,
        sampler="cps",
        sde_window_size=2,
        sde_window_mode="random",
        sde_window_range=(0, 5),
        guidance_scale=1.0,
        lora_rank=4,
        clip_range=0.2,
        trackers=["jsonl"],
        **SIZE,
    )
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    windows = []
    trainer.add_callback(lambda t, step, m: windows.append(cfg.sde_window_at(step - 1, cfg.seed)))
    trainer.train()
    assert len(scored) == 3  # one optimizer step, one micro-batch, per iteration
    for steps, (start, end) in zip(scored, windows):
        assert steps == [list(range(start, end))] * 4  # each of the 4 samples: exactly the window
    # x_T differs within a group (same_noise_in_group is off by default)
    traj = trainer.rollout(0, [{"prompt": PROMPTS[0]}])
    assert not torch.equal(traj.latents[0, 0], traj.latents[1, 0])


def test_grpo_refuses_a_window_on_the_last_step_alone():
    """A window of only the last step has no log-prob to train: refused up front, not at a random iteration."""
    with pytest.raises(ConfigError, match="last step"):
        va.GRPOConfig(num_steps=6, sde_window_size=1, sde_window_mode="random")
    with pytest.raises(ConfigError, match="last step"):
        va.GRPOConfig(num_steps=6, sde_window_size=2, sde_window_mode="mixgrpo", sde_window_range=(0, 6))
    assert (
        va.GRPOConfig(
            num_steps=6, sde_window_size=1, sde_window_mode="random", sde_window_range=(0, 5)
        ).sde_window_last_start()
        == 4
    )
    assert va.GRPOConfig(num_steps=6, sde_window_size=2, sde_window_mode="mixgrpo").sde_window_last_start() == 4
