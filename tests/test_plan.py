"""``visalign plan``: hand-computed plan arithmetic, the meta measurements, the CLI and its errors."""

import dataclasses

import pytest
import torch

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
