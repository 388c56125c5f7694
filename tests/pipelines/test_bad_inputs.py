"""Bad inputs found by the hardening audit: each gives a visalign error that says what to do."""

import importlib.util
import sys
import warnings

import pytest
import torch

import visalign as va
from tests.conftest import PROMPTS, first_frames, size_kwargs
from visalign.errors import ConfigError, InvalidInputError, MissingDependencyError
from visalign.testing import brightness, tiny_pipeline


# ---------------------------------------------------------------------------- va.load of a local path
@pytest.mark.parametrize(
    "name",
    [
        "/some/local/folder/that/does/not/exist",
        "./no_such_model",
        "../no_such_model",
        "~/no_such_visalign_model",
        "runs/demo/no_such_model",
        "C:\\models\\sd3",
    ],
)
def test_load_of_a_missing_local_folder_says_it_does_not_exist(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match="does not exist; pass a local folder written by save_pretrained"):
        va.load(name)


def test_load_of_a_folder_without_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="has no model_index.json.*save_pretrained or a hub id"):
        va.load(str(tmp_path / "empty"))
    # A folder one level above the pipeline folder: the error points at the right one.
    tiny_pipeline("sd3").save_pretrained(str(tmp_path / "outer" / "model"))
    with pytest.raises(InvalidInputError, match="seems to be '.*outer/model'"):
        va.load(str(tmp_path / "outer"))
    # A LoRA folder: the error says how LoRAs load.
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="load_lora_weights"):
        va.load(str(lora))
    with pytest.raises(InvalidInputError, match="this is a file.*from_single_file"):
        va.load(str(lora / "pytorch_lora_weights.safetensors"))


def test_load_of_a_mistyped_local_path_that_looks_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(InvalidInputError, match="'models' exists, but has no 'sd3'"):
        va.load("models/sd3", local_files_only=True)


def test_load_of_a_saved_pipeline_and_of_a_home_relative_path(tmp_path, monkeypatch):
    tiny_pipeline("sd3").save_pretrained(str(tmp_path / "model"))
    assert va.load(str(tmp_path / "model")).family == "sd3"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert va.load("~/model").family == "sd3"  # ~ is expanded (diffusers alone would not)


# ---------------------------------------------------------------------------- LoRA on a policy twice
def test_add_lora_twice_replaces_the_adapter_with_a_warning():
    policy = va.wrap(tiny_pipeline("sd3"))
    base = {k: v.clone() for k, v in policy.denoiser.state_dict().items()}
    policy.add_lora(rank=4)
    with pytest.warns(UserWarning, match="already had a LoRA adapter 'default'; it was replaced.*remove_lora"):
        policy.add_lora(rank=2)
    assert policy.denoiser.peft_config["default"].r == 2
    policy.remove_lora()
    assert not policy.has_lora
    state = policy.denoiser.state_dict()
    assert state.keys() == base.keys() and all(torch.equal(state[k], base[k]) for k in base)  # the base model
    with pytest.raises(ConfigError, match="no adapter of that name"):
        policy.remove_lora()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # after remove_lora, adding again is silent
        policy.add_lora(rank=4)


def test_a_second_trainer_on_the_same_policy_warns_and_trains(tmp_path):
    """A notebook cell that builds a GRPO trainer, run twice on the same policy."""
    policy = va.wrap(tiny_pipeline("sd3"))

    def config(name):
        return va.GRPOConfig(
            output_dir=str(tmp_path / name),
            max_steps=1,
            num_steps=4,
            group_size=2,
            prompts_per_step=2,
            height=32,
            width=32,
            lora_rank=4,
            guidance_scale=1.0,
            learning_rate=1e-2,
            trackers=["jsonl"],
        )

    first = va.GRPOTrainer(policy, brightness, PROMPTS, config("first"))
    first.train()
    with pytest.warns(UserWarning, match="adapter 'default'; it was replaced"):
        second = va.GRPOTrainer(policy, brightness, PROMPTS, config("second"))
    lora = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    second.train()
    assert second.state.step == 1
    after = {n: p.detach() for n, p in policy.denoiser.named_parameters() if p.requires_grad}
    assert any(not torch.equal(lora[n], after[n]) for n in lora)  # the fresh adapter trained


# ---------------------------------------------------------------------------- Wan without ftfy
@pytest.mark.parametrize("family", ["wan-t2v", "wan-i2v"])
def test_wan_without_ftfy_names_the_video_extra(tiny_policies, monkeypatch, family):
    policy = tiny_policies(family)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "ftfy", None)  # as if the package were not installed
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "ftfy" else real_find_spec(name, *a, **k)
    )
    with pytest.raises(MissingDependencyError, match=r"pip install 'visalign\[video\]'") as info:
        va.sample(policy, PROMPTS[:1], num_steps=2, images=first_frames(family, 1), **size_kwargs(family))
    assert isinstance(info.value, ImportError) and "ftfy" in str(info.value)
