"""Wan 2.2: the two-expert A14B adapters (wan22, wan22-i2v) and TI2V-5B (wan22-ti2v, wan22-ti2v-i2v).

The TI2V families are in ``FAMILIES`` (tests/conftest.py), so the parametrised stock, log-prob and
LoRA tests cover them. The two-expert ones run the same sampler tests here, plus what only they
have: a second CFG scale, the expert switch inside one batch, LoRA on both experts (a stock pipeline
loads it in two lines), training both experts (also under DDP), and their bad inputs.
"""

import os
import textwrap

import pytest
import torch
from PIL import Image

import visalign as va
from tests.conftest import FAMILIES, PROMPTS, TWO_EXPERT_FAMILIES, first_frames, size_kwargs
from tests.sampling import test_sampler as generic
from visalign.errors import ConfigError, UnsupportedPipelineError
from visalign.pipelines.wan22 import ExpertRouter
from visalign.testing import brightness, tiny_pipeline

WAN22 = ("wan22", "wan22-i2v", "wan22-ti2v", "wan22-ti2v-i2v")


def _images(family, batch):
    frames = first_frames(family, 1)
    return None if frames is None else frames.repeat(batch, 1, 1, 1)


def _stock_image(family):
    frames = first_frames(family, 1)
    if frames is None:
        return {}
    return {"image": Image.fromarray((frames[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))}


# ---------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize(
    "family, adapter",
    [
        ("wan-t2v", "WanT2VPolicy"),
        ("wan-i2v", "WanI2VPolicy"),
        ("wan22", "Wan22Policy"),
        ("wan22-i2v", "Wan22I2VPolicy"),
        ("wan22-ti2v", "Wan22TI2VPolicy"),
        ("wan22-ti2v-i2v", "Wan22TI2VI2VPolicy"),
    ],
)
def test_one_pipeline_class_several_adapters(tiny_policies, family, adapter):
    policy = tiny_policies(family)
    assert type(policy).__name__ == adapter and policy.family == family
    listing = va.pipelines.supported_pipelines()
    assert {"wan-t2v", "wan22", "wan22-ti2v"} <= set(listing["WanPipeline"].split(", "))
    assert {"wan-i2v", "wan22-i2v", "wan22-ti2v-i2v"} <= set(listing["WanImageToVideoPipeline"].split(", "))


def test_an_object_named_like_the_pipeline_gets_the_wan21_adapter():
    # visalign.plan looks adapters up with a bare stand-in object of the pipeline's class name.
    from visalign.pipelines.registry import adapter_for

    assert adapter_for(type("WanPipeline", (), {})()).family == "wan-t2v"


def test_tiny_pipelines_build_fast_and_round_trip(tmp_path):
    import time

    for family in WAN22:
        start = time.perf_counter()
        pipe = tiny_pipeline(family)
        assert time.perf_counter() - start < 1.0
    pipe = tiny_pipeline("wan22", seed=1)
    kwargs = dict(
        prompt="a red circle",
        num_inference_steps=2,
        guidance_scale=4.0,
        guidance_scale_2=2.0,
        output_type="pt",
        max_sequence_length=16,
        **size_kwargs("wan22"),
    )
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        loaded(generator=torch.Generator().manual_seed(0), **kwargs).frames, before, rtol=0, atol=1e-6
    )
    assert va.wrap(loaded).family == "wan22"


# ---------------------------------------------------------------------------- the parametrised sampler tests
@pytest.mark.parametrize("family", TWO_EXPERT_FAMILIES)
def test_ode_matches_stock_pipeline(tiny_policies, family):
    generic.test_ode_matches_stock_pipeline(tiny_policies, family)


@pytest.mark.parametrize("family", TWO_EXPERT_FAMILIES)
def test_zero_noise_reproduces_ode(tiny_policies, family):
    generic.test_zero_noise_reproduces_ode(tiny_policies, family)


@pytest.mark.parametrize("family", TWO_EXPERT_FAMILIES)
def test_stored_log_prob_is_the_gaussian_density(tiny_policies, family):
    generic.test_stored_log_prob_is_the_gaussian_density(tiny_policies, family)


@pytest.mark.parametrize("family", TWO_EXPERT_FAMILIES)
def test_recomputed_ratio_is_one_on_policy(tiny_policies, family):
    generic.test_recomputed_ratio_is_one_on_policy(tiny_policies, family)


def test_ti2v_families_are_in_the_parametrised_tests():
    assert {"wan22-ti2v", "wan22-ti2v-i2v"} <= set(FAMILIES)


# ---------------------------------------------------------------------------- two experts
@pytest.mark.parametrize("family", TWO_EXPERT_FAMILIES)
def test_each_expert_has_its_cfg_scale_as_stock(tiny_policies, family):
    """guidance_scale_2 guides the low-noise expert's steps, as stock; the tiny schedule gives each expert two."""
    policy = tiny_policies(family)
    schedule = policy.schedule(4, policy.geometry(**size_kwargs(family)))
    assert (schedule.timesteps >= policy.boundary_timestep).tolist() == [True, True, False, False]
    kwargs = dict(guidance_scale=4.0, guidance_scale_2=1.5, **size_kwargs(family))
    stock = policy.pipe(
        prompt=PROMPTS,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **_stock_image(family),
        **kwargs,
    ).frames
    ours = va.sample(
        policy,
        PROMPTS,
        num_steps=4,
        sampler="ode",
        generator=torch.Generator().manual_seed(0),
        images=_images(family, 2),
        **kwargs,
    )
    torch.testing.assert_close(ours.final_latents, stock.float(), rtol=0, atol=1e-5)
    same = va.sample(
        policy,
        PROMPTS,
        num_steps=4,
        sampler="ode",
        generator=torch.Generator().manual_seed(0),
        images=_images(family, 2),
        **{**kwargs, "guidance_scale_2": 4.0},
    )
    assert (same.final_latents - ours.final_latents).abs().max() > 1e-3  # the second scale matters
    # The policy-wide default, as va.wrap(pipe, guidance_scale_2=...) sets it.
    wrapped = va.wrap(policy.pipe, guidance_scale_2=1.5)
    again = va.sample(
        wrapped,
        PROMPTS,
        num_steps=4,
        sampler="ode",
        generator=torch.Generator().manual_seed(0),
        images=_images(family, 2),
        guidance_scale=4.0,
        **size_kwargs(family),
    )
    torch.testing.assert_close(again.final_latents, ours.final_latents, rtol=0, atol=0)


def test_a_batch_of_both_experts_is_routed_row_by_row(tiny_policies):
    """log_prob batches every (sample, step) pair into one call: rows of high- and low-noise steps
    go to their own expert and give what each step alone gives (with per-row CFG scales)."""
    policy = tiny_policies("wan22")
    calls = []

    def record(name):
        return lambda module, args, kwargs: calls.append((name, kwargs["hidden_states"].shape[0]))

    hooks = [
        module.register_forward_pre_hook(record(name), with_kwargs=True)
        for name, module in policy.trainable_denoisers().items()
    ]
    try:
        traj = va.sample(
            policy,
            PROMPTS,
            num_steps=4,
            sampler="sde",
            guidance_scale=3.0,
            guidance_scale_2=1.5,
            generator=torch.Generator().manual_seed(0),
            **size_kwargs("wan22"),
        )
        calls.clear()
        with torch.no_grad():
            both = va.log_prob(policy, traj, [0, 1, 2])  # steps 0, 1: high-noise expert; 2: low-noise
        # one call of each expert per CFG branch, with the rows of its steps (2 samples × 2 steps, 2 × 1)
        assert sorted(calls) == sorted([("transformer", 4), ("transformer_2", 2)] * 2)
        with torch.no_grad():
            alone = [va.log_prob(policy, traj, [i]) for i in (0, 1, 2)]
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(both.log_probs, torch.cat([a.log_probs for a in alone], 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(both.log_probs, traj.log_probs[:, :3], rtol=0, atol=1e-5)


def test_training_module_holds_both_experts(tiny_policies):
    policy = tiny_policies("wan22")
    router = policy.training_module()
    assert isinstance(router, ExpertRouter) and router is policy.training_module()
    assert router.transformer is policy.pipe.transformer and router.transformer_2 is policy.pipe.transformer_2
    assert router.boundary == 0.8 * 1000
    assert list(policy.trainable_denoisers()) == ["transformer", "transformer_2"]


# ---------------------------------------------------------------------------- LoRA on both experts
def _stock_load(pipe, folder):
    """The two lines a stock Wan 2.2 pipeline loads a visalign export with."""
    pipe.load_lora_weights(folder)
    pipe.load_lora_weights(
        folder, weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True
    )


@pytest.mark.parametrize(
    "family, expert_lora", [("wan22", "per_expert"), ("wan22", "shared"), ("wan22-i2v", "per_expert")]
)
def test_lora_export_loads_into_both_experts(family, expert_lora, tmp_path):
    policy = va.wrap(tiny_pipeline(family, seed=0), expert_lora=expert_lora)
    policy.add_lora(rank=4, alpha=8, init_lora_weights=False)  # random B, alpha ≠ rank: the scale matters
    for denoiser in policy.trainable_denoisers().values():
        trainable = [n for n, p in denoiser.named_parameters() if p.requires_grad]
        assert trainable and all("lora" in n for n in trainable)
    kwargs = dict(num_steps=4, sampler="ode", images=_images(family, 2), guidance_scale=3.0, **size_kwargs(family))
    ours = va.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    policy.save_lora(str(tmp_path))
    assert os.path.exists(tmp_path / "pytorch_lora_weights.safetensors")
    assert os.path.exists(tmp_path / "pytorch_lora_weights_transformer_2.safetensors")
    high, low = policy.lora_state_dict(denoiser="transformer"), policy.lora_state_dict(denoiser="transformer_2")
    shared = all(torch.equal(high[k], low[k]) for k in high)
    assert shared == (expert_lora == "shared")

    fresh = tiny_pipeline(family, seed=0)
    _stock_load(fresh, str(tmp_path))
    loaded = va.sample(va.wrap(fresh), PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(loaded.images, ours.images, rtol=0, atol=1e-5)
    # One expert's LoRA alone does not reproduce the policy: both are needed.
    half = tiny_pipeline(family, seed=0)
    half.load_lora_weights(str(tmp_path))
    partial = va.sample(va.wrap(half), PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (partial.images - ours.images).abs().max() > 1e-4
    # policy.load_lora does both lines.
    other = va.wrap(tiny_pipeline(family, seed=0))
    other.load_lora(str(tmp_path))
    again = va.sample(other, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(again.images, ours.images, rtol=0, atol=1e-5)


def test_adapters_disabled_and_merge_cover_both_experts(tmp_path):
    policy = va.wrap(tiny_pipeline("wan22", seed=0))
    kwargs = dict(num_steps=4, sampler="ode", guidance_scale=3.0, **size_kwargs("wan22"))
    base = va.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    policy.add_lora(rank=4, init_lora_weights=False)
    ours = va.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    with policy.adapters_disabled():
        off = va.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(off.images, base.images, rtol=0, atol=1e-6)
    merged = va.wrap(policy.merged_pipeline())
    assert not merged.has_lora
    fused = va.sample(merged, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(fused.images, ours.images, rtol=0, atol=1e-5)
    policy.remove_lora()
    assert not policy.has_lora


# ---------------------------------------------------------------------------- training both experts
def _grpo_config(tmp_path, family="wan22", **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        num_steps=4,
        group_size=2,
        prompts_per_step=2,
        lora_rank=4,
        guidance_scale=1.0,
        clip_range=0.2,
        learning_rate=1e-2,
        trackers=["jsonl"],
        **size_kwargs(family),
    )
    base.update(overrides)
    return va.GRPOConfig(**base)


@pytest.mark.parametrize("expert_lora", ["per_expert", "shared"])
def test_grpo_trains_both_experts_and_exports_both(tmp_path, expert_lora):
    policy = va.wrap(tiny_pipeline("wan22"), expert_lora=expert_lora)
    trainer = va.GRPOTrainer(
        policy, brightness, ["a red circle", "a blue square", "a green triangle"], _grpo_config(tmp_path)
    )
    assert isinstance(trainer.model, ExpertRouter)  # accelerate prepared the module holding both experts
    before = {
        n: p.detach().clone()
        for n, d in policy.trainable_denoisers().items()
        for n, p in d.named_parameters(prefix=n)
        if p.requires_grad
    }
    trainer.train()
    after = {
        n: p.detach()
        for n, d in policy.trainable_denoisers().items()
        for n, p in d.named_parameters(prefix=n)
        if p.requires_grad
    }
    for expert in ("transformer.", "transformer_2."):
        moved = [n for n in before if n.startswith(expert) and not torch.equal(before[n], after[n])]
        assert moved, f"{expert} did not train"
    n_trained = sum(p.numel() for p in trainer.trainable_parameters)
    n_lora = sum(p.numel() for n, p in after.items())
    assert n_trained == (n_lora if expert_lora == "per_expert" else n_lora // 2)  # shared: one set of weights

    trainer.save_lora(str(tmp_path / "lora"))
    kwargs = dict(num_steps=4, sampler="ode", guidance_scale=1.0, **size_kwargs("wan22"))
    ours = va.sample(policy, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    fresh = tiny_pipeline("wan22")
    fresh.load_lora_weights(str(tmp_path / "lora"))
    fresh.load_lora_weights(
        str(tmp_path / "lora"),
        weight_name="pytorch_lora_weights_transformer_2.safetensors",
        load_into_transformer_2=True,
    )
    theirs = va.sample(va.wrap(fresh), PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(theirs.images, ours.images, rtol=0, atol=1e-5)
    base = va.sample(va.wrap(tiny_pipeline("wan22")), PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (base.images - ours.images).abs().max() > 1e-5  # training changed something


_DDP_SCRIPT = """
import json, sys
import torch
import visalign as va
from visalign.testing import brightness, tiny_pipeline
from visalign.testing.pipelines import DEFAULT_SIZES

torch.set_num_threads(1)
out = sys.argv[1]
# The SDE window covers steps 0 and 1, both of the high-noise expert: the low-noise expert gets no
# rows in training, yet DDP must reduce its gradients on every rank.
cfg = va.GRPOConfig(output_dir=out, max_steps=2, num_steps=4, group_size=2, prompts_per_step=1, lora_rank=4,
                    guidance_scale=1.0, learning_rate=1e-2, sde_window_size=2, trackers=["jsonl"],
                    **DEFAULT_SIZES["wan22"])
trainer = va.GRPOTrainer(tiny_pipeline("wan22"), brightness, ["a red circle", "a blue square", "a green triangle"], cfg)
trainer.train()
state = {n: p.detach().cpu() for n, d in trainer.policy.trainable_denoisers().items()
         for n, p in d.named_parameters(prefix=n) if p.requires_grad}
torch.save(state, f"{out}/weights-rank{trainer.accelerator.process_index}.pt")
"""


def test_two_process_ddp_trains_both_experts(tmp_path):
    from tests.distributed import launch_two_processes

    script = tmp_path / "ddp_wan22.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    launch_two_processes(str(script), str(tmp_path))
    w0, w1 = (torch.load(tmp_path / f"weights-rank{r}.pt") for r in range(2))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(v.abs().sum() > 0 for k, v in w0.items() if k.startswith("transformer.") and "lora_B" in k)


# ---------------------------------------------------------------------------- TI2V
def test_ti2v_i2v_keeps_the_first_frame_clean(tiny_policies):
    """x̂0 of the first latent frame is the image's latent at every step, the output lands on it, and
    its transitions do not depend on the weights (their log-prob terms are constant)."""
    family = "wan22-ti2v-i2v"
    policy = tiny_policies(family)
    images = _images(family, 2)
    traj = va.sample(
        policy,
        PROMPTS,
        num_steps=4,
        sampler="sde",
        images=images,
        return_x0=True,
        generator=torch.Generator().manual_seed(0),
        **size_kwargs(family),
    )
    first = traj.conditioning.cond["first_frame"]
    torch.testing.assert_close(
        traj.x0[:, :, :, :1], first.unsqueeze(1).expand_as(traj.x0[:, :, :, :1]), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(traj.final_latents[:, :, :1], first, rtol=0, atol=1e-5)
    latents = traj.latents[:, 1].clone()
    out = policy.forward(latents, traj.timesteps[1].expand(2), traj.conditioning.cond, traj.conditioning.shared)
    moved = latents.clone()
    moved[:, :, 1:] += 0.5  # the other frames change the model's prediction for them, not for frame 0
    out2 = policy.forward(moved, traj.timesteps[1].expand(2), traj.conditioning.cond, traj.conditioning.shared)
    torch.testing.assert_close(out2[:, :, :1], out[:, :, :1], rtol=0, atol=0)
    assert (out2[:, :, 1:] - out[:, :, 1:]).abs().max() > 1e-4


def test_ti2v_timesteps_are_per_token(tiny_policies):
    seen = []
    policy = tiny_policies("wan22-ti2v-i2v")
    hook = policy.denoiser.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["timestep"].clone()), with_kwargs=True
    )
    try:
        va.sample(
            policy,
            PROMPTS[:1],
            num_steps=2,
            sampler="ode",
            images=_images("wan22-ti2v-i2v", 1),
            guidance_scale=1.0,
            **size_kwargs("wan22-ti2v-i2v"),
        )
    finally:
        hook.remove()
    # a 4x4 latent of 2 frames in 2x2 patches: 4 tokens per frame, the first frame's at t = 0
    assert seen[0].shape == (1, 8) and seen[0][0, :4].tolist() == [0.0] * 4 and seen[0][0, 4:].tolist() == [1000.0] * 4


# ---------------------------------------------------------------------------- bad input
def test_one_expert_lora_is_refused_where_both_are_needed(tmp_path):
    policy = va.wrap(tiny_pipeline("wan22"))
    from peft import LoraConfig

    policy.pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q"]), adapter_name="default")
    with pytest.raises(ConfigError, match="only transformer has a LoRA adapter 'default'.*transformer_2 has none"):
        policy.save_lora(str(tmp_path / "out"))

    single = tmp_path / "single"  # a one-expert LoRA, as Wan 2.1 tools write it
    other = va.wrap(tiny_pipeline("wan22"))
    other.pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q"]))
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(other.pipe.transformer)
    type(other.pipe).save_lora_weights(str(single), transformer_lora_layers=state)
    with pytest.raises(ConfigError, match="one expert only.*load_into_transformer_2=True"):
        va.wrap(tiny_pipeline("wan22")).load_lora(str(single))


def test_expert_options_on_a_one_expert_pipeline():
    with pytest.raises(ConfigError, match="expert_lora is an option of the two-expert.*wan-t2v"):
        va.wrap(tiny_pipeline("wan-t2v"), expert_lora="per_expert")
    with pytest.raises(ConfigError, match="guidance_scale_2"):
        va.wrap(tiny_pipeline("wan22-ti2v"), guidance_scale_2=3.0)
    with pytest.raises(ConfigError, match="'per_expert'.*'shared'"):
        va.wrap(tiny_pipeline("wan22"), expert_lora="both")
    pipe = tiny_pipeline("wan22", transformer_2={"num_layers": 1})
    with pytest.raises(ConfigError, match="same architecture"):
        va.wrap(pipe, expert_lora="shared")


def test_unsupported_wan22_variants():
    no_low = tiny_pipeline("wan22", transformer_2=None)
    with pytest.raises(UnsupportedPipelineError, match="no 'transformer_2'.*low-noise expert"):
        va.wrap(no_low)
    no_boundary = tiny_pipeline("wan22", boundary_ratio=None)
    with pytest.raises(UnsupportedPipelineError, match="boundary_ratio=None.*never runs the second expert"):
        va.wrap(no_boundary)
    no_high = tiny_pipeline("wan22", transformer=None)
    with pytest.raises(UnsupportedPipelineError, match="no 'transformer'"):
        va.wrap(no_high)
    both = tiny_pipeline("wan22-ti2v", transformer_2=tiny_pipeline("wan22-ti2v").transformer, boundary_ratio=0.8)
    with pytest.raises(UnsupportedPipelineError, match="expand_timesteps=True.*second expert"):
        va.wrap(both)
