"""SamplingOptions: the one home of the sampling defaults, shared by va.sample, the trainers and the CLI."""

import dataclasses
import inspect
import warnings

import pytest
import torch

import visalign as va
from visalign.errors import ConfigError
from visalign.sampling import DEFAULT_ETA, SamplingOptions, prepare_sampling
from visalign.sampling.options import DEFAULTS
from visalign.testing import tiny_pipeline
from visalign.training.config import RolloutConfig, TrainConfig


def test_sample_defaults_come_from_the_options():
    signature = inspect.signature(va.sample)
    for name in ("num_steps", "guidance_scale", "sampler", "noise", "eta", "same_noise_in_group"):
        assert signature.parameters[name].default == getattr(DEFAULTS, name), name
    assert signature.parameters["reduce"].default == DEFAULTS.log_prob_reduce
    # prepare_sampling holds the keyword list once; sample and the steering functions show it
    assert (
        list(inspect.signature(prepare_sampling).parameters)[2:-1]
        == [
            p
            for p in signature.parameters
            if p not in ("policy", "prompts", "return_x0", "decode", "progress", "max_batch_size")
        ][:-1]
    )
    for fn in (va.best_of_n, va.fk_steer, va.reward_guidance):
        assert inspect.signature(fn).parameters["num_steps"].default == DEFAULTS.num_steps


def test_every_trainer_config_carries_the_sampling_fields_flat():
    names = SamplingOptions.sampling_field_names()
    for config_class in (va.GRPOConfig, va.PRDPConfig, va.DPOConfig, va.DRaFTConfig):
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        for name in names:
            assert name in fields, (config_class.__name__, name)
            # the help text is written once, in SamplingOptions
            assert fields[name].metadata["help"] == SamplingOptions.field_help(name)
    assert va.GRPOConfig(num_steps=7, eta=0.5).sampling_options() == SamplingOptions(num_steps=7, eta=0.5)


def test_algorithm_defaults_override_the_shared_ones():
    assert SamplingOptions().num_steps == 20 and va.GRPOConfig().num_steps == 10
    assert va.DPOConfig().sampler == "ode" and va.DRaFTConfig().sampler == "ode" and va.PRDPConfig().sampler == "sde"


def test_eta_help_states_the_defaults_table():
    help_text = SamplingOptions.field_help("eta")
    for key, value in DEFAULT_ETA.items():
        assert f"{'/'.join(key) if isinstance(key, tuple) else key} {value:g}" in help_text


def test_window_schedule():
    fixed = SamplingOptions(num_steps=10, sde_window_size=3, sde_window_start=2)
    assert [fixed.sde_window_at(i) for i in range(3)] == [(2, 5)] * 3
    sliding = SamplingOptions(num_steps=6, sde_window_size=3, sde_window_mode="sliding", sde_window_shift_every=2)
    # 4 positions; the start moves every 2 iterations and wraps around
    assert [sliding.sde_window_at(i)[0] for i in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    rand = SamplingOptions(num_steps=10, sde_window_size=3, sde_window_mode="random")
    starts = {rand.sde_window_at(i, seed=0)[0] for i in range(50)}
    assert starts <= set(range(8)) and len(starts) > 3
    assert rand.sde_window_at(7, seed=1) == rand.sde_window_at(7, seed=1)
    assert SamplingOptions().sde_window_at(3) is None
    kwargs = fixed.sample_kwargs(0)
    assert kwargs["sde_window"] == (2, 5) and kwargs["reduce"] == "mean"


def test_sample_kwargs_reproduce_a_direct_call():
    policy = va.wrap(tiny_pipeline("sd3"))
    options = SamplingOptions(num_steps=4, sampler="sde", eta=0.5, sde_window_size=2, sde_window_start=1)
    a = va.sample(
        policy,
        ["a red circle"],
        **options.sample_kwargs(),
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
    )
    b = va.sample(
        policy,
        ["a red circle"],
        num_steps=4,
        sampler="sde",
        eta=0.5,
        sde_window=(1, 3),
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
    )
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert a.sde_mask.tolist() == [False, True, True, False]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(eta=-0.1), "eta"),
        (dict(sampler="euler"), "sampler"),
        (dict(num_steps=4, sde_window_size=5), "sde_window_size"),
        (dict(noise="brownian"), "noise"),
    ],
)
def test_bad_options_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        SamplingOptions(**bad)


def test_renamed_keys_keep_working_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="'pairs_per_step' is now called 'prompts_per_step'"):
        cfg = va.DPOConfig(pairs_per_step=3, online_sampler="sde", gradient_steps=2)
    assert (cfg.prompts_per_step, cfg.sampler, cfg.updates_per_rollout) == (3, "sde", 2)
    with pytest.warns(FutureWarning, match="samples_per_step"):
        assert va.DRaFTConfig(samples_per_step=5).prompts_per_step == 5
    with pytest.warns(FutureWarning, match="gradient_steps"):
        assert va.PRDPConfig.from_dict({"gradient_steps": 3}).updates_per_rollout == 3
    recipe = tmp_path / "old.yaml"
    recipe.write_text("pairs_per_step: 6\nbeta: 100\n")
    with pytest.warns(FutureWarning, match="in .*old.yaml"):
        assert va.DPOConfig.from_yaml(str(recipe), ["gradient_steps=2"]).prompts_per_step == 6
    with pytest.raises(ConfigError, match="both given"):
        va.DPOConfig(pairs_per_step=3, prompts_per_step=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        va.DPOConfig(prompts_per_step=3)  # the new name is silent


def test_config_layers():
    assert issubclass(RolloutConfig, TrainConfig) and issubclass(TrainConfig, SamplingOptions)
    assert not issubclass(va.DRaFTConfig, RolloutConfig)
