"""Resuming when checkpoint files are broken: fall back to the newest checkpoint that loads, with a
warning; a clear CheckpointError when none does; nothing the user wrote is deleted."""

import os
import shutil

import pytest
import torch

import visalign as va
from visalign.errors import CheckpointError
from visalign.testing import brightness, tiny_pipeline
from visalign.training.checkpoint import list_checkpoints

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def config(output_dir, **overrides):
    base = dict(
        output_dir=str(output_dir),
        max_steps=2,
        num_steps=4,
        group_size=2,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        learning_rate=1e-2,
        checkpoint_every=1,
        trackers=["jsonl"],
    )
    return va.GRPOConfig(**{**base, **overrides})


def train(output_dir, **overrides):
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, config(output_dir, **overrides))
    trainer.train()
    return trainer


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.denoiser.named_parameters() if p.requires_grad}


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with checkpoints step-1 and step-2, and its final adapter."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = train(out)
    assert [s for s, _ in list_checkpoints(str(out))] == [1, 2]
    return out, trainable(trainer)


def copy_run(finished_run, tmp_path):
    out, final = finished_run
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", final


@pytest.mark.parametrize("broken", ["model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "missing"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, broken):
    out, final = copy_run(finished_run, tmp_path)
    newest = out / "checkpoints" / "step-2"
    if broken == "missing":
        os.remove(newest / "optimizer.bin")
    else:
        truncate(newest / broken)
    fell_back = r"Resumed from .*step-1, not from the newest checkpoint, which could not be loaded: .*step-2"
    with pytest.warns(UserWarning, match=fell_back):
        resumed = train(out, resume="latest")
    # step 2 was trained again from step-1's state: exactly the uninterrupted run's result
    assert resumed.state.step == 2
    after = trainable(resumed)
    assert all(torch.equal(after[n], final[n]) for n in final)
    # the broken step-2 was rewritten by training, and step-1 is still there
    assert [s for s, _ in list_checkpoints(str(out))] == [1, 2]
    assert os.path.getsize(newest / "model.safetensors") == os.path.getsize(
        finished_run[0] / "checkpoints" / "step-2" / "model.safetensors"
    )


def test_no_loadable_checkpoint_raises_a_checkpoint_error(finished_run, tmp_path):
    out, _ = copy_run(finished_run, tmp_path)
    for step in (1, 2):
        truncate(out / "checkpoints" / f"step-{step}" / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"none of them could be loaded.*step-2/model\.safetensors: it is "
        r"truncated.*delete the broken checkpoint folders.*resume=None",
    ):
        train(out, resume="latest")
    # nothing was deleted
    assert sorted(os.listdir(out / "checkpoints")) == ["step-1", "step-2"]
    assert (out / "checkpoints" / "step-1" / "model.safetensors").exists()


def test_an_explicit_broken_checkpoint_raises(finished_run, tmp_path):
    out, _ = copy_run(finished_run, tmp_path)
    path = out / "checkpoints" / "step-2"
    truncate(path / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"Could not resume from .*step-2.*optimizer\.bin.*resume='latest'"):
        train(out, resume=str(path))


def test_a_crash_while_writing_a_checkpoint_loses_nothing(finished_run, tmp_path, monkeypatch):
    """save_checkpoint writes into .tmp-step-N and renames it only when complete."""
    out, _ = copy_run(finished_run, tmp_path)
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, config(out, max_steps=3, resume="latest"))
    real_save_state = trainer.accelerator.save_state

    def save_state_then_crash(path, *args, **kwargs):
        real_save_state(path, *args, **kwargs)
        truncate(os.path.join(path, "model.safetensors"))  # as if killed mid-write
        raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(trainer.accelerator, "save_state", save_state_then_crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [s for s, _ in list_checkpoints(str(out))] == [1, 2]  # step-3 never looked complete
    assert (out / "checkpoints" / ".tmp-step-3").exists()
    monkeypatch.undo()
    resumed = train(out, max_steps=3, resume="latest")  # no warning needed: step-2 is intact
    assert resumed.state.step == 3 and [s for s, _ in list_checkpoints(str(out))] == [2, 3]
    assert not (out / "checkpoints" / ".tmp-step-3").exists()
