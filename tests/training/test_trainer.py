"""The shared training loop, exercised through GRPO: precision, checkpointing, references, data columns."""

import csv

import pytest
import torch

import visalign as va
from visalign.errors import CheckpointError, ConfigError
from visalign.testing import brightness, tiny_pipeline
from visalign.training.checkpoint import list_checkpoints, resolve_resume

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        num_steps=4,
        group_size=2,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=2.0,
        trackers=["jsonl"],
    )
    return va.GRPOConfig(**{**base, **overrides})


def test_bf16_mixed_precision_keeps_trainable_weights_fp32(tmp_path):
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, config(tmp_path, mixed_precision="bf16"))
    metrics = trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters)
    assert torch.isfinite(torch.tensor(metrics["grad_norm"]))


def test_bf16_model_weights_train_in_fp32(tmp_path):
    pipe = tiny_pipeline("sd3", dtype=torch.bfloat16)
    trainer = va.GRPOTrainer(pipe, brightness, PROMPTS, config(tmp_path))
    trainer.train()
    assert trainer.policy.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters)


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    states = []
    for gc in (False, True):
        trainer = va.GRPOTrainer(
            tiny_pipeline("sd3"),
            brightness,
            PROMPTS,
            config(tmp_path / str(gc), gradient_checkpointing=gc, learning_rate=1e-2),
        )
        trainer.train()
        states.append(torch.cat([p.detach().flatten() for p in trainer.trainable_parameters]))
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=1e-6)


def test_full_fine_tuning_kl_uses_a_frozen_copy(tmp_path):
    trainer = va.GRPOTrainer(
        tiny_pipeline("sd3"),
        brightness,
        PROMPTS,
        config(tmp_path, use_lora=False, kl_beta=0.1, max_steps=2, learning_rate=1e-2),
    )
    before = [p.detach().clone() for p in trainer.reference_model.parameters()]
    metrics = trainer.train()
    assert trainer.reference_model is not None and metrics["kl"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.reference_model.parameters()))


def test_extra_prompt_columns_reach_the_reward(tmp_path):
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "target"])
        writer.writerows([["a red circle", "0.2"], ["a blue square", "0.8"]])
    seen = []

    def target_reward(images, prompts, target=None):
        seen.append(list(target))
        return -(images.float().flatten(1).mean(1) - torch.tensor([float(t) for t in target])).abs()

    va.GRPOTrainer(tiny_pipeline("sd3"), target_reward, str(path), config(tmp_path)).train()
    assert sorted(set(seen[0])) == ["0.2", "0.8"] and len(seen[0]) == 4  # one per sample, groups expanded


def test_checkpoints_keep_the_last_k(tmp_path):
    trainer = va.GRPOTrainer(
        tiny_pipeline("sd3"), brightness, PROMPTS, config(tmp_path, max_steps=3, checkpoint_every=1, keep_last=2)
    )
    trainer.train()
    assert [step for step, _ in list_checkpoints(str(tmp_path / "run"))] == [2, 3]
    # LoRA checkpoints hold the adapter only, not the frozen base model.
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-3" / "model.safetensors"))
    assert state and all("lora" in key for key in state)


def test_resume_errors(tmp_path):
    assert resolve_resume("latest", str(tmp_path)) is None  # nothing yet: a fresh start
    with pytest.raises(CheckpointError, match="not a complete visalign checkpoint"):
        resolve_resume(str(tmp_path), str(tmp_path))


def test_wrong_config_type():
    with pytest.raises(ConfigError, match="needs a GRPOConfig"):
        va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, va.training.TrainConfig())
