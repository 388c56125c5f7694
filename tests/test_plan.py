"""``visalign plan``: hand-computed plan arithmetic, the meta measurements, the CLI and its errors."""

import dataclasses

import pytest
import torch

from visalign import architectures as arch
from visalign.cli import main
from visalign.errors import ConfigError
from visalign.plan import Workload, _LiveBytes, format_plan, make_plan, measure, peak_bf16_flops, workload_from_recipe

# A made-up measurement, so that every row below can be computed by hand.
MEASURED = {
    "params": 1000,
    "buffer_bytes": 50,
    "blocks": 4,
    "block_classes": ["JointTransformerBlock"],
    "block_params": 200,
    "trainable": 10,
    "largest_trainable": 4,
    "act_train": 100,
    "act_train_ckpt": 30,
    "flops_train": 7,
    "act_infer": 20,
    "flops_forward": 3,
    "vae_params": 40,
    "act_decode": 60,
    "flops_decode": 5,
    "text_params": 100,
    "latent_numel": 16,
    "cond_numel": 8,
}
WORKLOAD = Workload(
    "sd35-medium",
    dtype="bfloat16",
    compute_dtype="bfloat16",
    height=64,
    width=64,
    use_lora=True,
    lora_rank=4,
    ema=True,
    rollout_batch=4,
    num_steps=3,
    trained_steps=2,
    micro_batch=2,
    cfg=2,
    train_cfg=2,
    text_tokens=10,
    text_encoder_params=100,
)


def test_lora_plan_matches_hand_computed_bytes():
    plan = make_plan(WORKLOAD, gpus=2, measured=dict(MEASURED))
    ddp, fsdp = plan.rows["ddp"], plan.rows["fsdp"]
    # weights: 1000 frozen bf16 + 10 LoRA fp32 + 50 buffer bytes; text encoders + VAE: 140 params in bf16
    assert ddp["denoiser weights"] == 2090 and ddp["text encoders + VAE"] == 280
    assert (ddp["gradients (fp32)"], ddp["AdamW moments (2 x fp32)"]) == (40, 80)
    assert (ddp["EMA (fp32)"], ddp["DDP buckets"]) == (40, 40)
    assert ddp["static"] == 2570
    # trajectory: 4 samples x (16 latents x 4 B x (2*3+1) states and means + a 3x64x64 fp32 image); prompts 4x2x8x2 B
    assert ddp["rollout: trajectory + prompts"] == 4 * (16 * 4 * 7 + 3 * 64 * 64 * 4) + 128 == 198528
    assert ddp["rollout: peak above static"] == 198528 + 198400  # stacking the states doubles them
    assert ddp["train: activations, no checkpointing"] == 100 * 8  # 2 samples x 2 steps x 2 CFG branches
    assert ddp["train: activations, checkpointing"] == 30 * 8
    assert ddp["train: peak above static"] == 198528 + 800
    assert ddp["PEAK per GPU"] == 2570 + 396928
    # FSDP over 2 GPUs halves what it shards and gathers two blocks (this one and the prefetched next) in bf16.
    assert fsdp["denoiser weights"] == 1045 and fsdp["FSDP gathered blocks"] == 2 * 200 * 2
    assert fsdp["static"] == 1045 + 280 + 20 + 40 + 20 + 800
    assert fsdp["PEAK per GPU"] == fsdp["static"] + 396928
    # FLOPs: rollout 4 samples x 3 steps x 2 branches x 3 + 4 decodes x 5; training 4 x 2 steps x 2 branches x 7
    assert plan.flops == {"rollout": 92, "training": 112, "iteration": 204}
    text = format_plan(plan)
    assert "PEAK per GPU" in text and "FSDP x2" in text


def test_full_fine_tuning_counts_fp32_weights_reference_and_autocast_copies():
    w = dataclasses.replace(WORKLOAD, use_lora=False, reference=True, ema=False)
    rows = make_plan(w, gpus=1, strategies=("ddp",), measured={**MEASURED, "trainable": 1000}).rows["ddp"]
    assert rows["denoiser weights"] == 4050 and rows["reference copy"] == 4050  # fp32, buffers included
    assert rows["gradients (fp32)"] == 4000 and rows["AdamW moments (2 x fp32)"] == 8000 and rows["DDP buckets"] == 0
    # training adds the reference's no-grad pass (20 x 2 x 2 x 2) and autocast's bf16 weight copies (1000 x 2)
    assert rows["train: peak above static"] == 198528 + 800 + 160 + 2000
    assert rows["optimizer step: temporaries"] == 4000  # foreach AdamW's temporaries on CUDA
    assert rows["PEAK per GPU"] == 20380 + 396928


def test_offloaded_copies_are_host_memory_and_one_visits_the_gpu_per_pass():
    """offload_copies: the reference, EMA and lagged copies leave the GPU rows for host_bytes, and a
    training pass brings the largest (the fp32 reference with its buffers, 4050 B) onto the GPU."""
    w = dataclasses.replace(WORKLOAD, use_lora=False, reference=True, ema=True, lagged_copies=2)
    measured = {**MEASURED, "trainable": 1000}
    on_gpu = make_plan(w, gpus=1, strategies=("ddp",), measured=dict(measured))
    off = make_plan(dataclasses.replace(w, offload_copies=True), gpus=1, strategies=("ddp",), measured=dict(measured))
    gpu, host = on_gpu.rows["ddp"], off.rows["ddp"]
    assert (gpu["EMA (fp32)"], gpu["reference copy"], gpu["lagged copies (fp32)"]) == (4000, 4050, 8000)
    assert (host["EMA (fp32)"], host["reference copy"], host["lagged copies (fp32)"]) == (0, 0, 0)
    assert (on_gpu.host_bytes, off.host_bytes) == (0, 4050 + 4000 + 8000)
    assert host["static"] == gpu["static"] - 16050
    assert host["train: peak above static"] == gpu["train: peak above static"] + 4050
    assert host["rollout: peak above static"] == gpu["rollout: peak above static"]  # GRPO samples from θ, not a copy
    assert host["PEAK per GPU"] == gpu["PEAK per GPU"] - 16050  # the rollout is still the largest phase
    assert "host memory per process" in format_plan(off) and "host memory" not in format_plan(on_gpu)


def test_recipes_count_lagged_copies_and_the_offload_option(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: awm\nmodel: stabilityai/stable-diffusion-3.5-medium\nupdates_per_rollout: 2\n")
    awm = workload_from_recipe(str(recipe), ["offload_copies=true", "use_lora=false"])
    assert (awm.lagged_copies, awm.reference, awm.offload_copies) == (2, True, True)  # EMA anchor + behaviour; ref_beta
    recipe.write_text("algorithm: nft\nmodel: stabilityai/stable-diffusion-3.5-medium\n")
    nft = workload_from_recipe(str(recipe))
    assert (nft.lagged_copies, nft.offload_copies) == (1, False)


def test_live_bytes_tracker_counts_what_is_alive():
    a = torch.empty(1000, device="meta")
    with _LiveBytes([a]) as tracker:
        b = a + 1
        c = b * 2
        del b
        d = c + 1
    assert tracker.peak == 8000 and tracker.now == 8000  # b and c, then c and d
    del c, d
    assert tracker.now == 0


def test_measure_on_meta_scales_linearly_with_depth_and_counts_backward():
    w = Workload(
        "wan21-t2v-1.3b",
        dtype="float32",
        compute_dtype="float32",
        height=64,
        width=64,
        num_frames=5,
        text_tokens=16,
        text_encoder_params=0,
        lora_rank=4,
    )
    m1, m2, m3 = (measure(dataclasses.replace(w), depth=d) for d in (1, 2, 3))
    assert m2["flops_forward"] - m1["flops_forward"] == m3["flops_forward"] - m2["flops_forward"] > 0
    # LoRA: input gradients only (none into the embedders, whose inputs need none), so a bit under 2x a forward
    assert 1.5 * m1["flops_forward"] < m1["flops_train"] <= 2.05 * m1["flops_forward"]
    assert m3["act_train_ckpt"] < m3["act_train"] and m2["act_train"] > m1["act_train"]  # (one block: no saving)
    assert m1["trainable"] < 10**6 < m1["params"]
    full = measure(dataclasses.replace(w, use_lora=False), depth=1)
    assert 2.5 * full["flops_forward"] < full["flops_train"] <= 3.05 * full["flops_forward"]  # + weight gradients
    assert full["trainable"] == full["params"]


def test_plan_cli_on_a_real_recipe_downloads_nothing(capsys, monkeypatch):
    import diffusers
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("visalign plan tried to load or download a model")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    assert main(["plan", "configs/sd35m_grpo.yaml", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "sd35-medium" in out and "DDP x2" in out and "FSDP x2" in out and "PEAK per GPU" in out
    assert "trainable 23,887,872 (LoRA r32)" in out  # rank 32 on SD3's default attention targets
    assert "FLOPs per iteration" in out


def test_unknown_model_names_the_known_architectures(capsys):
    with pytest.raises(ConfigError, match="black-forest-labs/FLUX.1-dev"):
        workload_from_recipe("configs/toy_grpo.yaml")
    assert main(["plan", "configs/toy_grpo.yaml"]) == 1
    assert "architecture:" in capsys.readouterr().err


def test_explicit_architecture_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "algorithm: grpo\nmodel: me/my-sd35-finetune\narchitecture: sd35-medium\ngroup_size: 4\n"
        "prompts_per_step: 2\nnum_steps: 6\ntimestep_fraction: 0.5\nmicro_batch_size: 2\n"
    )
    w = workload_from_recipe(str(recipe))
    assert (w.architecture, w.rollout_batch, w.trained_steps, w.micro_batch, w.cfg) == ("sd35-medium", 8, 2, 2, 2)
    flux = workload_from_recipe("configs/flux_grpo.yaml")
    assert (flux.cfg, flux.use_lora, flux.height) == (1, False, 720)  # embedded guidance: no CFG batch


def test_fsdp_settings_it_cannot_shard(tmp_path):
    with pytest.raises(ConfigError, match="nothing to shard"):
        make_plan(WORKLOAD, gpus=1, strategies=("fsdp",), measured=dict(MEASURED))
    # The shipped FSDP config wraps FLUX's blocks; an SD3 run would gather the whole model at once.
    with pytest.raises(ConfigError, match="JointTransformerBlock"):
        make_plan(WORKLOAD, gpus=8, measured=dict(MEASURED), accelerate_config="configs/accelerate/fsdp.yaml")
    v1 = tmp_path / "fsdp1.yaml"
    v1.write_text(
        "distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n"
        "  fsdp_transformer_layer_cls_to_wrap: JointTransformerBlock\n"
    )
    with pytest.raises(ConfigError, match="FSDP1"):
        make_plan(WORKLOAD, gpus=8, measured=dict(MEASURED), accelerate_config=str(v1))
    full = dataclasses.replace(WORKLOAD, use_lora=False, reference=True)
    plan = make_plan(full, gpus=8, measured={**MEASURED, "trainable": 1000}, accelerate_config=str(v1))
    assert any("not sharded" in note for note in plan.notes)


def test_peak_flops_table():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("Some CPU") is None


def test_rollout_batch_size_bounds_the_rollouts_inference_and_decode():
    """rollout_batch_size: the denoiser's inference temporaries and the VAE decode are per sampling call,
    while the trajectory (every state and mean) is kept for all samples."""
    measured = {**MEASURED, "act_infer": 100_000, "act_decode": 300_000}
    plan = lambda w: make_plan(w, gpus=1, strategies=("ddp",), measured=dict(measured))  # noqa: E731
    whole, chunked = plan(WORKLOAD).rows["ddp"], plan(dataclasses.replace(WORKLOAD, rollout_chunk=1)).rows["ddp"]
    # trajectory + prompts 198528 B (test_lora_plan_matches_hand_computed_bytes), stacking them 198400 B
    assert whole["rollout: trajectory + prompts"] == chunked["rollout: trajectory + prompts"] == 198528
    assert whole["rollout: peak above static"] == 198528 + max(100_000 * 4 * 2, 300_000 * 4, 198400)
    assert chunked["rollout: peak above static"] == 198528 + max(100_000 * 1 * 2, 300_000 * 1, 198400)
    assert chunked["train: peak above static"] == whole["train: peak above static"]
    larger = plan(dataclasses.replace(WORKLOAD, rollout_chunk=64)).rows["ddp"]  # more than the rollout: all at once
    assert larger["rollout: peak above static"] == whole["rollout: peak above static"]
    assert "rollout 4 samples (1 at a time) x 3 steps" in format_plan(
        plan(dataclasses.replace(WORKLOAD, rollout_chunk=1))
    )
    assert "at a time" not in format_plan(plan(WORKLOAD))
    assert workload_from_recipe("configs/sd35m_grpo.yaml").rollout_chunk is None
    assert workload_from_recipe("configs/sd35m_grpo.yaml", ["rollout_batch_size=2"]).rollout_chunk == 2


# The shipped recipes of the 2025 families: the architecture each resolves to and its CFG batch (1: the
# guidance is embedded, or guidance_scale is 1).
NEW_FAMILY_RECIPES = {
    "configs/qwen_image_grpo.yaml": ("qwen-image", 2),
    "configs/qwen_image_edit_grpo.yaml": ("qwen-image-edit", 2),
    "configs/flux2_grpo.yaml": ("flux2-dev", 1),
    "configs/flux2_klein_grpo.yaml": ("flux2-klein-9b", 2),
    "configs/z_image_grpo.yaml": ("z-image-turbo", 1),
    "configs/flux_kontext_grpo.yaml": ("flux1-kontext-dev", 1),
    "configs/wan22_grpo.yaml": ("wan22-t2v-a14b", 2),
    "configs/wan22_i2v_grpo.yaml": ("wan22-i2v-a14b", 2),
    "configs/wan22_ti2v_grpo.yaml": ("wan22-ti2v-5b", 2),
    "configs/hunyuan_video15_grpo.yaml": ("hunyuan-video15-480p", 2),
    "configs/hunyuan_video15_i2v_grpo.yaml": ("hunyuan-video15-480p-i2v", 2),
}


@pytest.mark.parametrize("recipe", sorted(NEW_FAMILY_RECIPES))
def test_plan_runs_on_the_new_families_recipes(recipe):
    """Each shipped recipe plans on meta (one block per stack: the code paths of the full plan, in seconds)."""
    name, cfg = NEW_FAMILY_RECIPES[recipe]
    w = workload_from_recipe(recipe)
    assert (w.architecture, w.cfg) == (name, cfg)
    plan = make_plan(w, gpus=8, depth=1)
    m, ddp, fsdp = plan.measured, plan.rows["ddp"], plan.rows["fsdp"]
    experts = 2 if "denoiser_2" in arch.spec(name) else 1  # Wan 2.2 A14B holds and trains both experts
    assert m["params"] == experts * arch.parameter_count(name, depth=1)
    assert m["text_params"] == sum(arch.parameter_count(name, part) for part in arch.spec(name)["text_encoders"])
    assert m["vae_params"] == arch.parameter_count(name, "vae")
    assert 0 < m["trainable"] < m["params"] if w.use_lora else m["trainable"] == m["params"]
    assert fsdp["denoiser weights"] * 8 == ddp["denoiser weights"] > 0  # FSDP shards the weights over 8 GPUs
    assert ddp["AdamW moments (2 x fp32)"] == 8 * m["trainable"]
    text = format_plan(plan)
    if name.startswith("hunyuan"):  # its forward cannot run on meta: counts only, said plainly
        assert m["unmeasured"] and ddp["PEAK per GPU"] is None and plan.flops["iteration"] is None
        assert "n/a" in text and "no activation, peak or FLOP figures" in text and "not measured" in text
    else:
        assert "unmeasured" not in m and ddp["PEAK per GPU"] > ddp["static"] > 0
        assert m["flops_train"] > m["flops_forward"] > 0 and m["act_train"] > 0 and m["act_train_ckpt"] > 0
        assert m["flops_decode"] > 0 and plan.flops["iteration"] > 0 and "n/a" not in text


@pytest.mark.parametrize(
    "name",
    [
        "qwen-image-edit",
        "wan22-ti2v-5b",
        pytest.param("flux2-klein-4b", marks=pytest.mark.slow),
        pytest.param("z-image-turbo", marks=pytest.mark.slow),
    ],
)
def test_new_families_measure_linearly_in_depth(name):
    video = arch.spec(name)["family"].startswith("wan")
    w = Workload(name, height=128, width=128, num_frames=5 if video else None, text_tokens=16, text_encoder_params=0)
    m1, m2, m3 = (measure(dataclasses.replace(w), depth=d) for d in (1, 2, 3))
    assert m2["flops_forward"] - m1["flops_forward"] == m3["flops_forward"] - m2["flops_forward"] > 0
    assert m1["flops_train"] > m1["flops_forward"] and m2["act_train"] > m1["act_train"]


def test_a_plan_without_measurements_leaves_those_rows_empty():
    unmeasured = {
        **MEASURED,
        **dict.fromkeys(("act_train", "act_train_ckpt", "act_infer", "act_decode")),
        "unmeasured": "why",
    }
    unmeasured.update(dict.fromkeys(("flops_train", "flops_forward", "flops_decode")))
    plan = make_plan(WORKLOAD, gpus=2, measured=unmeasured)
    full = make_plan(WORKLOAD, gpus=2, measured=dict(MEASURED))
    for strategy in ("ddp", "fsdp"):
        rows, exact = plan.rows[strategy], full.rows[strategy]
        assert (
            rows["static"] == exact["static"]
            and rows["rollout: trajectory + prompts"] == exact["rollout: trajectory + prompts"]
        )
        assert rows["optimizer step: temporaries"] == exact["optimizer step: temporaries"]
        assert rows["PEAK per GPU"] is None and rows["train: activations, checkpointing"] is None
    assert plan.flops == {"rollout": None, "training": None, "iteration": None}
    text = format_plan(plan)
    assert "n/a" in text and "because why" in text and "FLOPs per iteration per GPU: not measured" in text


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(NEW_FAMILY_RECIPES))
def test_plan_cli_on_the_new_families_recipes_at_full_depth(recipe, capsys):
    assert main(["plan", recipe, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert NEW_FAMILY_RECIPES[recipe][0] in out and "PEAK per GPU" in out and "FSDP x8" in out
