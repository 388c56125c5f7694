"""Gradient checkpointing on every family: ``Policy.enable_gradient_checkpointing()``.

For each tiny family, with a LoRA attached as training attaches it, a training-mode forward and
backward through ``policy.predict`` must give the same loss and LoRA gradients with checkpointing
as without, while the checkpointed path really runs (diffusers' blocks call
``torch.utils.checkpoint.checkpoint``) and autograd saves fewer tensors.
"""

import pytest
import torch

import visalign as va
from tests.conftest import PROMPTS, first_frames, size_kwargs
from visalign.errors import ConfigError
from visalign.sampling.prepare import prepare_sampling
from visalign.testing import brightness, tiny_pipeline
from visalign.testing.pipelines import FAMILIES


def _policy_and_inputs(family):
    """A tiny policy with a random (non-zero) LoRA, in training mode, and one batch for ``predict``."""
    policy = va.wrap(tiny_pipeline(family, seed=0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # init_lora_weights=False draws B ≠ 0 too, so that both LoRA matrices get non-zero gradients.
        policy.add_lora(rank=4, init_lora_weights=False)
    policy.training_module().train()
    images = first_frames(family, len(PROMPTS))
    setup = prepare_sampling(
        policy,
        PROMPTS,
        num_steps=4,
        guidance_scale=4.0,
        images=images,
        generator=torch.Generator().manual_seed(0),
        **size_kwargs(family),
    )
    # One row at the first (noisiest) step and one at the last: two-expert Wan 2.2 then runs both
    # experts in one call, so both are checked.
    timesteps = setup.schedule.timesteps[[0, -1]]
    return policy, (setup.latents, timesteps, setup.conditioning)


def _lora_parameters(policy, name=None):
    modules = policy.trainable_denoisers()
    chosen = modules.values() if name is None else [modules[name]]
    return [p for m in chosen for p in m.parameters() if p.requires_grad]


def _loss_and_grads(policy, inputs, seed=0):
    latents, timesteps, conditioning = inputs
    params = _lora_parameters(policy)
    for p in params:
        p.grad = None
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += 1
        return tensor

    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(seed)  # the same dropout masks (if any) in both runs
        out = policy.predict(latents, timesteps, conditioning)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        loss = (out * weights).mean()
    loss.backward()
    # None for LoRA layers the output does not depend on (e.g. a last block's unused text stream).
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    return loss.detach(), grads, saved


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gives_the_same_gradients(family, monkeypatch):
    policy, inputs = _policy_and_inputs(family)
    assert not policy.gradient_checkpointing
    loss, grads, saved = _loss_and_grads(policy, inputs)
    for name in policy.trainable_denoisers():  # both Wan 2.2 experts ran
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora_parameters(policy, name)), name

    calls = 0
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        nonlocal calls
        calls += 1
        return checkpoint(*args, **kwargs)

    # diffusers' default checkpointing function looks torch.utils.checkpoint.checkpoint up at call time.
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    policy.enable_gradient_checkpointing()
    assert policy.gradient_checkpointing
    for module in policy.trainable_denoisers().values():
        assert module.is_gradient_checkpointing
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_and_grads(policy, inputs)

    assert calls > 0, "no block ran through torch.utils.checkpoint"
    assert saved_ckpt < saved, f"checkpointing saved {saved_ckpt} tensors for backward, without it {saved}"
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert len(grads_ckpt) == len(grads)
    assert [g is None for g in grads_ckpt] == [g is None for g in grads]
    for g_ckpt, g in zip(grads_ckpt, grads):
        if g is not None:
            torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)

    policy.disable_gradient_checkpointing()
    assert not policy.gradient_checkpointing
    calls = 0
    _loss_and_grads(policy, inputs)
    assert calls == 0


def test_an_unsupported_denoiser_names_the_family_and_the_fix(monkeypatch):
    policy = va.wrap(tiny_pipeline("wan22"))
    # As for a diffusers model class that does not implement checkpointing.
    monkeypatch.setattr(policy.pipe.transformer_2, "_supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match=r"wan22 family.*transformer_2.*Turn it off"):
        policy.enable_gradient_checkpointing()
    assert not policy.pipe.transformer.is_gradient_checkpointing  # checked before anything was changed


def test_the_trainer_checkpoints_every_trained_denoiser(tmp_path):
    policy = va.wrap(tiny_pipeline("wan22"))
    config = va.GRPOConfig(
        output_dir=str(tmp_path), gradient_checkpointing=True, max_steps=1, num_steps=2, **size_kwargs("wan22")
    )
    va.GRPOTrainer(policy, brightness, PROMPTS, config)
    assert policy.pipe.transformer.is_gradient_checkpointing
    assert policy.pipe.transformer_2.is_gradient_checkpointing
