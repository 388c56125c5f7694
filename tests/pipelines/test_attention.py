"""Attention backends through diffusers' dispatcher: sdpa is the stock computation; missing ones fail clearly."""

import importlib.util

import pytest
import torch

import visalign as va
from visalign.errors import ConfigError, MissingDependencyError
from visalign.pipelines import attention
from visalign.pipelines.attention import apply_attention_backend, resolve_attention_backend
from visalign.testing import tiny_pipeline
from visalign.testing.pipelines import DEFAULT_SIZES


def _sample(policy, family):
    return va.sample(
        policy,
        ["a red circle"],
        num_steps=2,
        sampler="ode",
        generator=torch.Generator().manual_seed(0),
        **DEFAULT_SIZES[family],
    ).images


@pytest.mark.parametrize("family", ["sd3", "flux", "wan-t2v"])
def test_sdpa_is_the_default_computation(family):
    policy = va.wrap(tiny_pipeline(family))
    default = _sample(policy, family)
    assert apply_attention_backend(policy, "sdpa") == "sdpa"
    assert torch.equal(_sample(policy, family), default)
    assert apply_attention_backend(policy, "native") == "sdpa"  # diffusers' name for the same kernel
    assert torch.equal(_sample(policy, family), default)


@pytest.mark.parametrize("family", ["sd3", "flux", "wan-t2v"])
def test_the_dispatcher_path_matches_stock_exactly(family):
    """What flash/xformers/sage use, run with the native kernel: SD3 gets a dispatcher processor."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    policy = va.wrap(tiny_pipeline(family))
    default = _sample(policy, family)
    active = _AttentionBackendRegistry._active_backend
    assert attention._use_dispatcher(policy.denoiser, "native") == []
    names = {type(p).__name__ for p in policy.denoiser.attn_processors.values()}
    if family == "sd3":
        assert names == {"DispatchJointAttnProcessor"}
    assert torch.equal(_sample(policy, family), default)
    assert _AttentionBackendRegistry._active_backend == active  # per model: the process default is unchanged
    apply_attention_backend(policy, "sdpa")  # restores the stock processors
    assert "DispatchJointAttnProcessor" not in {type(p).__name__ for p in policy.denoiser.attn_processors.values()}


@pytest.mark.parametrize(
    "backend,package,extra",
    [("xformers", "xformers", "xformers"), ("flash", "flash_attn", "flash"), ("sage", "sageattention", "sage")],
)
def test_a_backend_that_is_not_installed_names_its_extra(backend, package, extra):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    policy = va.wrap(tiny_pipeline("sd3"))
    with pytest.raises(MissingDependencyError, match=rf"pip install 'visalign\[{extra}\]'"):
        apply_attention_backend(policy, backend)
    with pytest.raises(MissingDependencyError, match=package):
        va.load("/nonexistent/folder", attention_backend=backend)  # checked before anything is loaded


def test_unknown_backend_and_config_field():
    with pytest.raises(ConfigError, match="sdpa, native, xformers, flash, sage"):
        resolve_attention_backend("fast")
    assert va.GRPOConfig(attention_backend="flash").attention_backend == "flash"
    assert va.DPOConfig().attention_backend == "sdpa"
    with pytest.raises(ConfigError):
        va.GRPOConfig(attention_backend="fast")


def test_unet_cannot_use_flash(monkeypatch):
    monkeypatch.setattr(attention, "check_attention_backend", lambda name: "flash")  # pretend flash-attn is here
    policy = va.wrap(tiny_pipeline("sd"))
    before = dict(policy.denoiser.attn_processors)
    with pytest.raises(ConfigError, match="do not go through diffusers' attention dispatcher"):
        apply_attention_backend(policy, "flash")
    assert all(policy.denoiser.attn_processors[k] is v for k, v in before.items())


def test_a_trainer_config_applies_its_backend_or_says_what_is_missing(tmp_path):
    import visalign as va
    from visalign.errors import MissingDependencyError
    from visalign.testing import brightness, tiny_pipeline

    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="xformers"):
            va.GRPOTrainer(
                tiny_pipeline("sd3"),
                brightness,
                ["a red circle"],
                va.GRPOConfig(attention_backend="xformers", output_dir=str(tmp_path)),
            )
    else:
        pytest.skip("xformers is installed here; the missing-package path cannot be shown")
