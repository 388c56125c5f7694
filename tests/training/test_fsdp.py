"""FSDP2 full fine-tuning under a real ``accelerate launch`` (2 CPU processes over gloo), and its bad input.

The launched runs use configs/accelerate/fsdp_cpu_2proc.yaml, the file users launch with.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.distributed import launch_two_processes
from tests.training import fsdp_common
from visalign.errors import ConfigError
from visalign.testing import tiny_pipeline
from visalign.training import fsdp

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml")
SCRIPT = str(Path(__file__).with_name("fsdp_draft_script.py"))
# Two iterations of AdamW at lr 1e-3 move weights by up to 2e-3. The two runs differ only in float
# rounding (a batch of 4 in one process vs 2 per rank, FSDP's reduce-scatter vs one sum), which
# Adam's g/√v magnifies for near-zero gradients: measured up to 1.5e-6. 1e-5 is 1% of one step,
# 200 times smaller than the movement, so a wrong shard, a lost gradient or a missed step fails it.
ATOL = 1e-5


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The FSDP run (2 iterations, checkpoints at 1 and 2), and one crashed after step 1 then resumed."""
    out = tmp_path_factory.mktemp("fsdp")
    launch_two_processes(SCRIPT, str(out), config_file=CONFIG)
    return out


def test_fsdp_shards_and_matches_one_process(fsdp_runs, tmp_path):
    notes = [json.loads((fsdp_runs / "run" / f"sharding-rank{r}.json").read_text()) for r in range(2)]
    for note in notes:
        assert note["distributed_type"] == "DistributedType.FSDP" and note["world_size"] == 2
        # Every trainable parameter is a DTensor holding half the weights, and the optimizer steps those.
        assert note["all_dtensor"] and note["optimizer_holds_them"]
        assert note["local"] == note["global"] // 2

    sharded = torch.load(fsdp_runs / "run" / "weights.pt")
    torch.set_num_threads(1)  # as in the launched processes
    one = fsdp_common.one_process_union(tiny_pipeline("sd3"), tmp_path / "one")
    one.train()
    single = one.model.state_dict()
    initial = tiny_pipeline("sd3").transformer.state_dict()
    assert sharded.keys() == single.keys()
    moved = max(float((sharded[k] - initial[k]).abs().max()) for k in sharded)
    assert moved > 100 * ATOL  # training moved the weights well beyond the tolerance
    for k in sharded:
        torch.testing.assert_close(sharded[k], single[k].detach(), rtol=0, atol=ATOL, msg=k)

    # save_pretrained gathered the shards: the export is the EMA of the one-process run too.
    from diffusers import SD3Transformer2DModel

    exported = SD3Transformer2DModel.from_pretrained(fsdp_runs / "run" / "model" / "transformer").state_dict()
    with one.ema_weights():
        ema = {k: v.detach().clone() for k, v in one.model.state_dict().items()}
    assert any(not torch.equal(ema[k], single[k]) for k in ema)  # EMA lags the live weights
    for k in ema:
        torch.testing.assert_close(exported[k], ema[k], rtol=0, atol=ATOL, msg=k)


def test_fsdp_resume_is_exact(fsdp_runs):
    """A run stopped after its step-1 checkpoint and resumed (a new trainer on a fresh pipeline) ends
    where the uninterrupted run did, bit for bit: the weights, and the EMA export, whose shards the
    checkpoint holds whole."""
    assert sorted(os.listdir(fsdp_runs / "crashed" / "checkpoints")) == ["step-1", "step-2"]
    straight = torch.load(fsdp_runs / "run" / "weights.pt")
    resumed = torch.load(fsdp_runs / "crashed" / "weights.pt")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    from safetensors.torch import load_file

    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = (load_file(fsdp_runs / run / "model" / name) for run in ("run", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- bad input, before training
def plugin(**kwargs):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, **kwargs)


def test_wrap_classes_not_in_the_model():
    denoiser = tiny_pipeline("sd3").transformer
    bad = plugin(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=["FluxTransformerBlock"])
    with pytest.raises(ConfigError, match="'FluxTransformerBlock'.*does not contain.*JointTransformerBlock"):
        fsdp.check_wrap_classes(bad, denoiser)
    fsdp.check_wrap_classes(
        plugin(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=["JointTransformerBlock"]),
        denoiser,
    )


def test_wrap_classes_listed_for_flux():
    denoiser = tiny_pipeline("flux").transformer
    bad = plugin(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=["JointTransformerBlock"])
    with pytest.raises(ConfigError, match="FluxSingleTransformerBlock, FluxTransformerBlock"):
        fsdp.check_wrap_classes(bad, denoiser)


def test_no_wrap_policy_is_refused():
    with pytest.raises(ConfigError, match="NO_WRAP.*TRANSFORMER_BASED_WRAP.*JointTransformerBlock"):
        fsdp.check_wrap_classes(plugin(auto_wrap_policy="NO_WRAP"), tiny_pipeline("sd3").transformer)


def test_fsdp_version_1_is_refused(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1.*fsdp_version: 2"):
        fsdp.fsdp_plugin_from_launch(use_lora=False)
    with pytest.raises(ConfigError, match="LoRA adapters"):
        fsdp.fsdp_plugin_from_launch(use_lora=True)


def test_settings_accelerate_rejects(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "BLOCK_WRAP")
    with pytest.raises(ConfigError, match="accelerate rejected.*BLOCK_WRAP"):
        fsdp.fsdp_plugin_from_launch(use_lora=False)
