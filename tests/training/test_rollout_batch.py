"""``rollout_batch_size``: the rollout sampled in chunks is the unchunked rollout, and every trainer's
update with chunked sampling and ``micro_batch_size=1`` is the update without them.

CPU kernels are not batch-size invariant: a (B, C) matmul or a convolution takes another code path
for another B, which changes a sample's last bits with the batch it runs in (with no chunking at
all, too). So the bit-for-bit checks use :func:`row_by_row`, the tiny SD3 policy with its denoiser
and VAE called one sample at a time: each sample's numbers then cannot depend on its batch, and
what is left to differ is exactly what the chunking controls (the noise, the generators, the SDE
window, the group's shared noise, the conditioning's rows). The plain policy is checked to float
precision, with its initial noise bit for bit.
"""

import dataclasses

import pytest
import torch

import visalign as va
from visalign.errors import ConfigError, InvalidInputError
from visalign.testing import brightness, tiny_pipeline
from visalign.training import OnlineTrainer, RolloutConfig

PROMPTS = ["a red circle", "a blue square on the left of a big green thing", "a green square"]


def _rows(value, i):
    if isinstance(value, torch.Tensor):
        return value[i : i + 1]
    if isinstance(value, dict):
        return {k: _rows(v, i) for k, v in value.items()}
    return value


def row_by_row(pipe):
    """The pipeline's policy with the denoiser and the VAE decoder run one sample at a time."""
    policy = va.wrap(pipe)
    base = type(policy)

    class RowByRow(base):
        def forward(self, latents, timesteps, kwargs, shared):
            rows = range(latents.shape[0])
            return torch.cat(
                [base.forward(self, latents[i : i + 1], timesteps[i : i + 1], _rows(kwargs, i), shared) for i in rows]
            )

        def decode(self, latents, geometry):
            return torch.cat([base.decode(self, latents[i : i + 1], geometry) for i in range(latents.shape[0])])

    policy.__class__ = RowByRow
    return policy


def _trainer(tmp_path, policy, **overrides):
    cfg = RolloutConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        num_steps=4,
        group_size=3,
        prompts_per_step=2,
        height=32,
        width=32,
        guidance_scale=4.5,  # CFG on: the unconditional branch is chunked too
        **overrides,
    )
    return OnlineTrainer(policy, brightness, PROMPTS, cfg)


def _assert_same_trajectory(a, b):
    for name in ("images", "latents", "log_probs", "means", "stds", "sde_mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), name
    assert a.prompts == b.prompts and a.group_size == b.group_size and a.spec == b.spec
    assert torch.equal(a.conditioning.cond["encoder_hidden_states"], b.conditioning.cond["encoder_hidden_states"])


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "sde"},  # GRPO's rollout
        {"sampler": "ode"},
        {"sampler": "sde", "same_noise_in_group": True},
        {"sampler": "sde", "sde_window_size": 2, "sde_window_mode": "random"},
    ],
    ids=["sde", "ode", "same_noise_in_group", "sde_window"],
)
def test_chunked_rollout_is_the_unchunked_one_bit_for_bit(tmp_path, options):
    records = [{"prompt": p} for p in PROMPTS[:2]]
    whole = _trainer(tmp_path / "whole", row_by_row(tiny_pipeline("sd3")), **options).rollout(3, records)
    # 2 and 4 split groups of 3 across chunks; 4 leaves a short last chunk
    for size in (1, 2, 4):
        trainer = _trainer(tmp_path / str(size), row_by_row(tiny_pipeline("sd3")), rollout_batch_size=size, **options)
        chunked = trainer.rollout(3, records)
        _assert_same_trajectory(chunked, whole)
    if options["sampler"] == "sde":
        assert whole.log_probs is not None and whole.sde_mask.any() and not whole.sde_mask.all()
    if options.get("same_noise_in_group"):  # the groups' shared noise survives a chunk boundary inside a group
        assert torch.equal(whole.latents[1, 0], whole.latents[2, 0])
        assert not torch.equal(whole.latents[2, 0], whole.latents[3, 0])


def test_chunked_rollout_of_the_plain_policy_differs_only_by_kernel_rounding(tmp_path):
    records = [{"prompt": p} for p in PROMPTS[:2]]
    whole = _trainer(tmp_path / "whole", tiny_pipeline("sd3")).rollout(0, records)
    chunked = _trainer(tmp_path / "chunked", tiny_pipeline("sd3"), rollout_batch_size=1).rollout(0, records)
    assert torch.equal(chunked.latents[:, 0], whole.latents[:, 0])
    for name in ("images", "latents", "log_probs", "means"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-4, atol=1e-5)


def test_sample_max_batch_size_on_a_ddpm_family_with_x0():
    policy = row_by_row(tiny_pipeline("sd"))
    kwargs = dict(num_steps=3, sampler="ddim", group_size=2, height=32, width=32, return_x0=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    whole = va.sample(policy, PROMPTS[:2], generator=gens(), **kwargs)
    chunked = va.sample(policy, PROMPTS[:2], generator=gens(), max_batch_size=3, **kwargs)
    _assert_same_trajectory(chunked, whole)
    assert torch.equal(chunked.x0, whole.x0)
    with pytest.raises(InvalidInputError, match="max_batch_size"):
        va.sample(policy, PROMPTS[:1], num_steps=2, max_batch_size=0)


def test_rollout_batch_size_is_validated_and_described(tmp_path):
    with pytest.raises(ConfigError, match="rollout_batch_size"):
        RolloutConfig(rollout_batch_size=0).validate()
    assert RolloutConfig.field_help("rollout_batch_size")
    assert "sampled 2 at a time" in _trainer(tmp_path, tiny_pipeline("sd3"), rollout_batch_size=2).rollout_summary()


# ---------------------------------------------------------------------------- every trainer, one iteration
def _config(algorithm, tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        num_steps=4,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        trackers=["jsonl"],
        learning_rate=1e-2,
    )
    if algorithm == "grpo":
        return va.GRPOConfig(**base, group_size=2, clip_range=0.2, **overrides)
    if algorithm == "prdp":
        return va.PRDPConfig(**base, group_size=3, beta=0.01, **overrides)
    if algorithm == "dpo":
        return va.DPOConfig(**base, mode="online", group_size=3, **overrides)
    if algorithm == "nft":
        return va.NFTConfig(**base, group_size=2, **overrides)
    if algorithm == "awm":
        return va.AWMConfig(**base, group_size=2, **overrides)
    return va.DRaFTConfig(**base, sampler="sde", truncation=2, **overrides)


TRAINERS = {
    "grpo": va.GRPOTrainer,
    "prdp": va.PRDPTrainer,
    "dpo": va.DPOTrainer,
    "nft": va.NFTTrainer,
    "awm": va.AWMTrainer,
    "draft": va.DRaFTTrainer,
}


def _weights_after_one_iteration(algorithm, tmp_path, pipe, **overrides):
    cfg = _config(algorithm, tmp_path, **overrides)
    trainer = TRAINERS[algorithm](pipe, brightness, PROMPTS, cfg)
    before = [p.detach().clone() for p in trainer.trainable_parameters]
    trainer.train()
    after = [p.detach().clone() for p in trainer.trainable_parameters]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the iteration trained something
    return after


@pytest.mark.parametrize("algorithm", list(TRAINERS))
def test_every_trainer_gives_the_same_weights_with_chunked_sampling(tmp_path, algorithm):
    """One iteration: rollouts of 1 sample at a time give the very same weights; rollouts of 2 with
    micro-batches of 1 the same up to the gradient accumulation's summation order.

    DRaFT samples with gradient, one micro-batch at a time (rollout_batch_size bounds only its
    evaluations), so for it the second run checks that micro-batches of 1 accumulate the same update.
    """

    def run(name, **overrides):
        return _weights_after_one_iteration(algorithm, tmp_path / name, row_by_row(tiny_pipeline("sd3")), **overrides)

    base = run("base")
    for a, b in zip(run("rollout1", rollout_batch_size=1), base):
        assert torch.equal(a, b)
    for a, b in zip(run("rollout2_micro1", rollout_batch_size=2, micro_batch_size=1), base):
        # lr 1e-2 moves the weights by ~1e-2; the summation order moves them by < 1e-7
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_config_carries_rollout_batch_size_for_every_trainer():
    for config_class in (va.GRPOConfig, va.PRDPConfig, va.DPOConfig, va.NFTConfig, va.AWMConfig, va.DRaFTConfig):
        assert "rollout_batch_size" in {f.name for f in dataclasses.fields(config_class)}
