"""PRDP (docs/math.md §4): the pure loss against hand-computed numbers, the proximal clip, the trainer."""

import json

import pytest
import torch

import visalign as va
from visalign.algorithms.prdp import pair_indices, prdp_loss
from visalign.errors import ConfigError
from visalign.testing import brightness, tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def make_config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        num_steps=4,
        group_size=3,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        trackers=["jsonl"],
    )
    base.update(overrides)
    return va.PRDPConfig(**base)


# ---------------------------------------------------------------------------- pure math
def test_pair_indices_are_all_pairs_within_groups():
    a, b = pair_indices(6, 3)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]
    with pytest.raises(ConfigError, match="groups of 4"):
        pair_indices(6, 4)


def test_prdp_loss_hand_computed():
    # r̂ = (0.1+0.2, 0.0+0.1) = (0.3, 0.1); target (1 − 0)/10 = 0.1; l = ((0.3−0.1) − 0.1)² = 0.01
    ratios = torch.tensor([[0.1, 0.2], [0.0, 0.1]])
    loss, m = prdp_loss(ratios, ratios.clone(), torch.tensor([1.0, 0.0]), group_size=2, beta=10.0, clip_range=0.05)
    assert loss.item() == pytest.approx(0.01, abs=1e-7) and m["loss_unclipped"] == pytest.approx(0.01, abs=1e-7)
    assert m["clipfrac"] == 0.0 and m["clipped_pair_frac"] == 0.0
    # three samples, β = 1, rewards (1, 0, 2), r̂ = (0.5, 0, 1) → pairs (0,1): (0.5 − 1)² = 0.25,
    # (0,2): (−0.5 + 1)² = 0.25, (1,2): (−1 + 2)² = 1; mean 0.5
    r3 = torch.tensor([[0.5], [0.0], [1.0]])
    loss3, _ = prdp_loss(r3, r3.clone(), torch.tensor([1.0, 0.0, 2.0]), group_size=3, beta=1.0, clip_range=1.0)
    assert loss3.item() == pytest.approx(0.5, abs=1e-7)


def test_clipped_branch_engages_beyond_eps():
    """A step moved beyond r̂_old ± ε: max(l, l_clip) takes the clipped branch and that step gets no gradient."""
    ratios = torch.tensor([[0.1, 0.0], [0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    # unclipped: r̂ = (0.1, 0), target 0.1 → l = 0; clipped: r̂ = (0.05, 0) → l_clip = (0.05 − 0.1)² = 0.0025
    loss, m = prdp_loss(ratios, old, torch.tensor([1.0, 0.0]), group_size=2, beta=10.0, clip_range=0.05)
    assert loss.item() == pytest.approx(0.0025, abs=1e-8)
    assert m["clipped_pair_frac"] == 1.0 and m["clipfrac"] == 0.25 and m["loss_unclipped"] == pytest.approx(0.0)
    loss.backward()
    # d l_clip / d r̂_a = 2·(−0.05) for a's unclipped step, 0 for its clipped step, +0.1 for b
    assert ratios.grad.flatten().tolist() == pytest.approx([0.0, -0.1, 0.1, 0.1], abs=1e-7)
    # within ε the two branches agree and the gradient is the plain regression gradient
    inside = torch.tensor([[0.01, 0.0], [0.0, 0.0]], requires_grad=True)
    loss_in, m_in = prdp_loss(inside, old, torch.tensor([1.0, 0.0]), 2, 10.0, 0.05)
    assert m_in["clipfrac"] == 0.0 and loss_in.item() == pytest.approx(0.09**2, abs=1e-8)


# ---------------------------------------------------------------------------- trainer
def test_first_update_is_on_policy(tmp_path):
    """Recomputed log-probs equal the rollout's and LoRA starts at the reference: r̂_θ = r̂_old = 0."""
    metrics = va.PRDPTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, make_config(tmp_path)).train()
    assert metrics["clipfrac"] == 0.0 and metrics["clipped_pair_frac"] == 0.0
    assert metrics["pred_reward_mean"] == 0.0
    assert metrics["loss"] == metrics["loss_unclipped"] > 0
    assert {"reward_mean", "reward_std", "grad_norm", "time_sampling", "time_training"} <= set(metrics)


def test_later_gradient_steps_are_clipped(tmp_path):
    cfg = make_config(tmp_path, updates_per_rollout=3, learning_rate=5e-2, clip_range=1e-5, beta=0.01)
    metrics = va.PRDPTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg).train()
    assert metrics["clipfrac_last"] > 0 and metrics["clipped_pair_frac"] > 0
    assert metrics["clipfrac"] < metrics["clipfrac_last"]  # the first step had none


def test_ddim_policy(tmp_path):
    """SD (DDPM family) samples with DDIM η > 0 and trains on its exact log-probs."""
    cfg = make_config(
        tmp_path,
        group_size=2,
        prompts_per_step=1,
        num_steps=3,
        updates_per_rollout=2,
        learning_rate=5e-2,
        clip_range=1e-5,
        beta=0.01,
    )
    trainer = va.PRDPTrainer(tiny_pipeline("sd"), brightness, PROMPTS, cfg)
    metrics = trainer.train()
    assert metrics["grad_norm"] > 0 and metrics["clipfrac_last"] > 0


def test_micro_batches_give_the_same_gradient(tmp_path):
    """The two-pass micro-batched update equals the one-pass gradient of the coupled pairwise loss."""
    grads = {}
    for micro in (None, 2):
        cfg = make_config(tmp_path / str(micro), micro_batch_size=micro, use_lora=False, beta=0.01)
        trainer = va.PRDPTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        step = trainer.optimizer_step

        def capture(trainer=trainer, step=step, micro=micro):
            grads[micro] = torch.cat([p.grad.flatten() for p in trainer.trainable_parameters])
            return step()

        trainer.optimizer_step = capture
        trainer.train()
    assert grads[None].abs().max() > 0
    torch.testing.assert_close(grads[2], grads[None], rtol=1e-4, atol=1e-5 * float(grads[None].abs().max()))


def captured_gradient(trainer) -> torch.Tensor:
    """Runs ``trainer`` and returns its first gradient (the optimizer step replaced by a capture)."""
    grads = []

    def capture():
        grads.append(torch.cat([p.grad.flatten() for p in trainer.trainable_parameters]))
        trainer.optimizer.zero_grad()
        return {}

    trainer.optimizer_step = capture
    trainer.train()
    return grads[0]


def test_group_normalised_first_gradient_is_grpos():
    """At the reference, reward_norm='group' gives exactly GRPO's policy gradient, scaled.

    Σ_pairs (A_a − A_b)(∇r̂_a − ∇r̂_b) = G·Σ_a A_a ∇r̂_a because the standardised A sum to 0 per group,
    so ∇PRDP = −2G/(β·P)·Σ_a A_a Σ_i ∇log π_a,i with P = n·G(G−1)/2 pairs, while GRPO's on-policy
    loss −mean(A·ratio) over N = n·G samples and k steps has ∇ = −1/(N·k)·Σ_a A_a Σ_i ∇log π_a,i:
    the ratio is 4·G·k/(β·(G − 1)).
    """
    import tempfile

    G, beta, num_steps = 3, 2.0, 4
    shared = dict(
        max_steps=1,
        num_steps=num_steps,
        group_size=G,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        trackers=[],
        timestep_fraction=1.0,
        max_grad_norm=None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        prdp = captured_gradient(
            va.PRDPTrainer(
                tiny_pipeline("sd3"),
                brightness,
                PROMPTS,
                va.PRDPConfig(output_dir=f"{tmp}/prdp", beta=beta, reward_norm="group", **shared),
            )
        )
        grpo = captured_gradient(
            va.GRPOTrainer(
                tiny_pipeline("sd3"),
                brightness,
                PROMPTS,
                va.GRPOConfig(output_dir=f"{tmp}/grpo", advantage_clip=None, **shared),
            )
        )
    k = num_steps - 1  # the last step is deterministic and never trained
    assert grpo.abs().max() > 0
    torch.testing.assert_close(
        prdp, grpo * 4 * G * k / (beta * (G - 1)), rtol=1e-4, atol=1e-5 * float(prdp.abs().max())
    )


def test_prdp_raises_brightness(tmp_path):
    """20 seeded iterations of full fine-tuning lift the mean reward by more than 3× its starting spread."""
    cfg = make_config(
        tmp_path,
        max_steps=20,
        num_steps=6,
        group_size=4,
        use_lora=False,
        learning_rate=1e-2,
        max_grad_norm=None,
        beta=0.01,
        clip_range=0.01,
    )
    va.PRDPTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    start, spread = rows[0]["reward_mean"], rows[0]["reward_std"]
    end = sum(r["reward_mean"] for r in rows[-5:]) / 5
    # measured: 0.4967 → 0.59 with a starting spread of 0.0036
    assert end - start > 3 * spread, (start, end, spread)


# ---------------------------------------------------------------------------- bad input
def test_config_errors(tmp_path):
    for beta in (0.0, -2.0):
        with pytest.raises(ConfigError, match="'beta' must be > 0"):
            make_config(tmp_path, beta=beta)
    with pytest.raises(ConfigError, match="ODE sampler does not have"):
        make_config(tmp_path, sampler="ode")
    with pytest.raises(ConfigError, match="group_size"):
        make_config(tmp_path, group_size=1)
    with pytest.raises(ConfigError, match="clip_range"):
        make_config(tmp_path, clip_range=0.0)
    with pytest.raises(ConfigError, match="'reward_norm' must be one of 'none', 'group'"):
        make_config(tmp_path, reward_norm="batch")
    with pytest.raises(ConfigError, match="needs a reward"):
        va.PRDPTrainer(tiny_pipeline("sd3"), None, PROMPTS, make_config(tmp_path))
