"""``offload_copies``: the reference and EMA / lagged copies kept in host memory.

On these CPU tests the device is the CPU, so offloading changes where nothing lives; what they check
is that the offloaded code paths (host clones, swaps that copy one way, updates on the host, EMA
placement on load) give bit-identical training to the plain ones, that the placement logic picks the
host (pinned for CUDA), and that the memory check speaks before training. The CUDA-only parts
(pinning, asynchronous copies) run where a GPU is present.
"""

import json

import pytest
import torch

import visalign as va
from tests.algorithms.helpers import train_with_crash
from visalign.errors import ConfigError, InsufficientMemoryError
from visalign.testing import brightness, tiny_pipeline
from visalign.training import offload
from visalign.training.lagged import LaggedWeights
from visalign.training.offload import (
    GiB,
    OffloadableEMA,
    check_fits,
    check_offload_memory,
    copy_placement,
    host_clone,
    host_copy,
    on_device,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SMALL = dict(max_steps=2, num_steps=4, group_size=2, prompts_per_step=2, height=32, width=32, lora_rank=4)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run(trainer_class, config_class, tmp_path, name, crash_at=None, **overrides):
    cfg = config_class(**{**SMALL, "output_dir": str(tmp_path / name), "trackers": ["jsonl"], **overrides})
    return train_with_crash(trainer_class(tiny_pipeline("sd3"), brightness, PROMPTS, cfg), crash_at)


def weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.trainable_parameters]


def metrics(tmp_path, name) -> list[dict]:
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    return [{k: v for k, v in row.items() if not k.startswith("time")} for row in rows]


def assert_equal(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- placement
def test_placement_of_a_copy():
    assert copy_placement(torch.device("cuda", 1), offload=True) == (torch.device("cpu"), True)
    assert copy_placement("cuda:1", offload=False) == (torch.device("cuda", 1), False)
    assert copy_placement("cpu", offload=True) == (torch.device("cpu"), False)  # nothing to overlap with
    assert copy_placement("meta", offload=True) == (torch.device("cpu"), False)
    assert copy_placement("meta", offload=False) == (torch.device("meta"), False)


def test_host_copy_and_host_clone_are_separate_host_tensors():
    t = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous: strides are kept
    c = host_copy(t, pin=True)  # pinned only where CUDA exists
    assert torch.equal(c, t) and c.stride() == t.stride() and c.data_ptr() != t.data_ptr()
    assert c.device.type == "cpu" and c.is_pinned() == torch.cuda.is_available()
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    module(torch.randn(8, 3))  # moves the batch-norm statistics, buffers that must be copied too
    clone = host_clone(module, pin=False)
    for (name, a), b in zip(module.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr() and b.device.type == "cpu", name
    assert not any(p.requires_grad for p in clone.parameters())
    x = torch.randn(5, 3)
    module.eval(), clone.eval()
    assert torch.equal(module(x), clone(x))


def test_host_clone_keeps_tied_weights_tied():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    module[1].weight = module[0].weight
    clone = host_clone(module, pin=False)
    assert clone[1].weight is clone[0].weight and clone[0].weight is not module[0].weight


def test_on_device_restores_the_host_tensors():
    module = torch.nn.Linear(3, 2)
    ptrs = [p.data_ptr() for p in module.parameters()]
    with on_device(module, "cpu"):
        pass
    assert [p.data_ptr() for p in module.parameters()] == ptrs


@cuda
def test_on_device_brings_weights_in_and_drops_them():
    module = host_clone(torch.nn.Linear(3, 2), pin=True)
    ptrs = [p.data_ptr() for p in module.parameters()]
    x = torch.randn(4, 3)
    with on_device(module, "cuda"):
        assert all(p.device.type == "cuda" for p in module.parameters())
        y = module(x.cuda()).cpu()
    assert all(p.device.type == "cpu" and p.is_pinned() for p in module.parameters())
    assert [p.data_ptr() for p in module.parameters()] == ptrs and torch.equal(y, module(x))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_offloaded_lagged_weights_match_the_plain_ones(device):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(device)) for _ in range(2)]
    plain, off = LaggedWeights(params), LaggedWeights(params, offload=True)
    assert all(t.device.type == "cpu" and t.is_pinned() == (device == "cuda") for t in off.tensors)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    for decay in (0.7, 1.0, 0.25):
        plain.update(decay), off.update(decay)
        assert_equal([t.cpu() for t in plain.tensors], off.tensors)
    assert plain.distance() == off.distance() > 0
    live = [p.detach().clone() for p in params]
    with off.swapped():
        assert_equal([p.detach().cpu() for p in params], off.tensors)
    assert_equal([p.detach() for p in params], live)  # swapped back, host copy untouched
    state = off.state_dict()
    again = LaggedWeights(params, copy=False, offload=True)
    again.load_state_dict(state)
    assert_equal(again.tensors, off.tensors)
    assert all(t.device.type == "cpu" and t.is_pinned() == (device == "cuda") for t in again.tensors)
    off.refresh()
    assert off.distance() == 0.0 and not torch.equal(off.tensors[0], start[0].cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_offloaded_ema_matches_diffusers_and_lands_on_the_host_after_load(device):
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 4, generator=g).to(device)) for _ in range(3)]
    reference, off = EMAModel(params, decay=0.9), OffloadableEMA(params, decay=0.9, offload=True)
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.mul_(0.5).add_(0.1)
        reference.step(params), off.step(params)
    assert_equal([s.cpu() for s in reference.shadow_params], off.shadow_params)
    assert all(s.device.type == "cpu" and s.is_pinned() == (device == "cuda") for s in off.shadow_params)
    # accelerate loads custom state onto the CPU: it goes back to the host (offloaded) or beside θ (plain)
    state = {**off.state_dict(), "shadow_params": [s.clone() for s in off.shadow_params]}
    plain = OffloadableEMA(params, decay=0.9)
    plain.load_state_dict(state), off.load_state_dict(state)
    assert all(s.device == p.device for s, p in zip(plain.shadow_params, params))
    assert all(s.device.type == "cpu" for s in off.shadow_params)
    assert off.optimization_step == plain.optimization_step == 3


# ---------------------------------------------------------------------------- training is unchanged
def test_full_finetuning_grpo_with_reference_and_ema(tmp_path):
    kw = dict(use_lora=False, kl_beta=0.5, ema_decay=0.8, learning_rate=1e-3, guidance_scale=1.0)
    plain = run(va.GRPOTrainer, va.GRPOConfig, tmp_path, "plain", **kw)
    off = run(va.GRPOTrainer, va.GRPOConfig, tmp_path, "off", offload_copies=True, **kw)
    assert_equal(weights(plain), weights(off))
    assert_equal(plain.ema.shadow_params, off.ema.shadow_params)
    assert_equal(list(plain.reference_model.state_dict().values()), list(off.reference_model.state_dict().values()))
    rows = metrics(tmp_path, "off")
    assert rows == metrics(tmp_path, "plain") and rows[-1]["kl"] > 0  # the reference pass ran
    assert all(t.device.type == "cpu" for t in [*off.reference_model.parameters(), *off.ema.shadow_params])
    assert "copies in host memory (offload_copies): reference model, EMA" in off.describe()


def test_lora_has_nothing_big_to_offload_and_just_works(tmp_path):
    kw = dict(kl_beta=0.5, learning_rate=1e-2, guidance_scale=1.0, max_steps=1)
    plain = run(va.GRPOTrainer, va.GRPOConfig, tmp_path, "plain", **kw)
    off = run(va.GRPOTrainer, va.GRPOConfig, tmp_path, "off", offload_copies=True, **kw)
    assert off.reference_model is None and "offload_copies): none" in off.describe()
    assert_equal(weights(plain), weights(off)) and metrics(tmp_path, "off") == metrics(tmp_path, "plain")


@pytest.mark.parametrize("use_lora", [True, False])
def test_nft_old_policy(tmp_path, use_lora):
    kw = dict(use_lora=use_lora, kl_beta=0.1 * (not use_lora), learning_rate=1e-2 if use_lora else 1e-3)
    plain = run(va.NFTTrainer, va.NFTConfig, tmp_path, "plain", **kw)
    off = run(va.NFTTrainer, va.NFTConfig, tmp_path, "off", offload_copies=True, **kw)
    assert off.old.offload and all(t.device.type == "cpu" for t in off.old.tensors)
    assert_equal(weights(plain), weights(off)) and assert_equal(plain.old.tensors, off.old.tensors)
    assert metrics(tmp_path, "off") == metrics(tmp_path, "plain")


@pytest.mark.parametrize("use_lora", [True, False])
def test_awm_ema_anchor_and_behaviour_snapshot(tmp_path, use_lora):
    kw = dict(use_lora=use_lora, learning_rate=1e-2 if use_lora else 1e-3, updates_per_rollout=2, ema_anchor_rate=0.3)
    plain = run(va.AWMTrainer, va.AWMConfig, tmp_path, "plain", **kw)
    off = run(va.AWMTrainer, va.AWMConfig, tmp_path, "off", offload_copies=True, **kw)
    assert off.ema_anchor.offload and off.behaviour.offload
    assert_equal(weights(plain), weights(off)) and assert_equal(plain.ema_anchor.tensors, off.ema_anchor.tensors)
    rows = metrics(tmp_path, "off")
    assert rows == metrics(tmp_path, "plain") and rows[-1]["ratio_mean"] != 1.0  # the snapshot was used


def test_online_dpo_refreshed_reference(tmp_path):
    kw = dict(mode="online", ref_refresh_every=2, max_steps=2, group_size=3, learning_rate=1e-2, beta=50.0)
    plain = run(va.DPOTrainer, va.DPOConfig, tmp_path, "plain", **kw)
    off = run(va.DPOTrainer, va.DPOConfig, tmp_path, "off", offload_copies=True, **kw)
    assert off.snapshot.offload and all(t.device.type == "cpu" for t in off.snapshot.tensors)
    assert_equal(weights(plain), weights(off)) and metrics(tmp_path, "off") == metrics(tmp_path, "plain")


def test_an_offloaded_run_resumes_exactly(tmp_path):
    """Full-fine-tuning AWM with every kind of copy (reference, EMA, EMA anchor, behaviour), crashed and resumed
    with offload, ends where an uninterrupted run without offload does."""
    kw = dict(
        use_lora=False,
        max_steps=4,
        checkpoint_every=2,
        keep_last=1,
        learning_rate=1e-3,
        updates_per_rollout=2,
        ema_anchor_rate=0.2,
        ema_decay=0.8,
    )
    plain = run(va.AWMTrainer, va.AWMConfig, tmp_path, "plain", **kw)
    run(va.AWMTrainer, va.AWMConfig, tmp_path, "off", crash_at=3, offload_copies=True, **kw)
    resumed = run(va.AWMTrainer, va.AWMConfig, tmp_path, "off", offload_copies=True, resume="latest", **kw)
    assert resumed.state.step == 4
    assert_equal(weights(plain), weights(resumed))
    assert_equal(plain.ema_anchor.tensors, resumed.ema_anchor.tensors)
    assert_equal(plain.ema.shadow_params, resumed.ema.shadow_params)
    assert all(t.device.type == "cpu" for t in [*resumed.ema_anchor.tensors, *resumed.ema.shadow_params])


# ---------------------------------------------------------------------------- memory that cannot hold it
def test_check_fits_names_the_numbers_and_the_fixes():
    check_fits(5 * GiB, 5 * GiB, "fits exactly")
    check_fits(5 * GiB, None, "unknown availability passes")
    with pytest.raises(InsufficientMemoryError, match=r"the copies: 10\.00 GiB of host memory .* only 4\.00 GiB") as e:
        check_fits(10 * GiB, 4 * GiB, "the copies", "host memory")
    assert isinstance(e.value, ConfigError) and isinstance(e.value, MemoryError)
    assert "LoRA" in str(e.value) and "FSDP" in str(e.value) and "offload_copies=false" in str(e.value)
    with pytest.raises(InsufficientMemoryError, match=r"3\.00 GiB of GPU memory .* only 1\.50 GiB.*beside the model"):
        check_fits(3 * GiB, int(1.5 * GiB), "a pass", "GPU memory")


def test_check_offload_memory_counts_every_copy_per_process_and_one_pass_on_the_gpu():
    copies = {"the reference model": 4 * GiB, "the EMA": 2 * GiB}
    check_offload_memory(copies, "cuda", 4 * GiB, processes=2, host_available=12 * GiB, device_free=4 * GiB)
    with pytest.raises(
        InsufficientMemoryError, match=r"reference model \(4\.00 GiB\), the EMA \(2\.00 GiB\).*x 2 proc"
    ):
        check_offload_memory(copies, "cuda", 4 * GiB, processes=2, host_available=11 * GiB, device_free=8 * GiB)
    with pytest.raises(InsufficientMemoryError, match="GPU memory"):
        check_offload_memory(copies, "cuda", 4 * GiB, host_available=64 * GiB, device_free=3 * GiB)
    check_offload_memory(copies, "cpu", 4 * GiB, host_available=6 * GiB, device_free=0)  # no GPU to check
    check_offload_memory({}, "cuda", 0, host_available=0, device_free=0)  # nothing to offload


def test_a_host_that_cannot_hold_the_copies_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(offload, "host_available_bytes", lambda: 1024)
    cfg = va.GRPOConfig(**SMALL, output_dir=str(tmp_path / "run"), use_lora=False, kl_beta=0.1, offload_copies=True)
    with pytest.raises(InsufficientMemoryError, match=r"offload_copies keeps the reference model \(0\.\d+ GiB\)"):
        va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    cfg.offload_copies = False  # the option is what is checked: the same run without it starts
    va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
