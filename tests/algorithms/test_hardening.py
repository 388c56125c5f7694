"""What the outside audit found in the trainers' math: KL calibration, near-tie groups, the reference's dtype."""

import pytest
import torch

import visalign as va
from visalign.losses.grpo import flow_grpo_kl, group_advantages
from visalign.steps import flow_diffusion_coefficient, flow_sde_mean_std, gaussian_kl
from visalign.testing import brightness, tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]


# ---------------------------------------------------------------------------- KL calibration
def test_flow_grpo_kl_is_the_exact_kl_times_minus_dt():
    """Flow-GRPO divides ‖Δμ‖² by 2g² (no √(−dt) in the std): that is the exact step KL times (−dt)."""
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(3, 4, 8, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor(0.6), torch.tensor(0.5)
    coeff = flow_diffusion_coefficient("flow", 0.7, sigma, torch.tensor(0.9))
    mean, std = flow_sde_mean_std(x, v, sigma, sigma_next, coeff)
    mean_ref, _ = flow_sde_mean_std(x, v_ref, sigma, sigma_next, coeff)
    exact = gaussian_kl(mean, mean_ref, std)
    hand = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * coeff**2)  # Flow-GRPO's expression
    torch.testing.assert_close(flow_grpo_kl(exact, sigma - sigma_next), hand, rtol=1e-5, atol=0)
    # on SD3's 10-step schedule the exact form is ~1/(−dt) ≈ 10–20× larger
    assert float(exact.mean() / hand.mean()) == pytest.approx(1 / 0.1, rel=1e-4)


def test_kl_form_scales_the_trained_kl(tmp_path):
    metrics = {}
    for form in ("flow_grpo", "exact"):
        cfg = va.GRPOConfig(
            output_dir=str(tmp_path / form),
            max_steps=2,
            num_steps=4,
            group_size=3,
            prompts_per_step=2,
            height=32,
            width=32,
            guidance_scale=1.0,
            kl_beta=0.1,
            kl_form=form,
            learning_rate=5e-2,
            use_lora=False,
            updates_per_rollout=2,
            clip_range=10.0,
        )
        trainer = va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        metrics[form] = trainer.train()
    # the second update is off the reference, so the KL is positive; the exact form is larger by ~1/(−dt)
    assert 0 < metrics["flow_grpo"]["kl"] < metrics["exact"]["kl"]
    assert va.GRPOConfig().kl_form == "flow_grpo"


# ---------------------------------------------------------------------------- near-tie groups
def test_near_tie_groups_get_small_advantages():
    """Rewards that differ by 3e-6 are jitter: with the 1e-4 floor their advantages are ~0.03, not ±1.4."""
    rewards = torch.tensor([0.5, 0.5 + 3e-6, 0.5, 0.5 + 3e-6, 0.1, 0.9, 0.3, 0.7])
    adv, zero = group_advantages(rewards, 4)
    assert adv[:4].abs().max() < 0.05 and not bool(zero[0])
    assert adv[4:].abs().max() > 1.0  # a real spread keeps full-strength advantages
    legacy, _ = group_advantages(rewards, 4, eps=1e-8)
    assert legacy[:4].abs().max() > 0.9  # the audit's finding, without the floor


# ---------------------------------------------------------------------------- the reference's dtype
def _bf16_pipeline():
    return tiny_pipeline("sd3").to(torch.bfloat16)


def test_full_finetuning_reference_matches_the_policy_at_init_in_bf16(tmp_path):
    """The frozen copy is taken after the trainable weights are upcast, so at initialisation the KL,
    PRDP's predicted reward and DPO's margin are exactly 0 under mixed precision."""
    common = dict(
        max_steps=1,
        num_steps=4,
        group_size=3,
        prompts_per_step=2,
        height=32,
        width=32,
        guidance_scale=1.0,
        use_lora=False,
        mixed_precision="bf16",
        learning_rate=1e-3,
    )
    grpo = va.GRPOTrainer(
        _bf16_pipeline(), brightness, PROMPTS, va.GRPOConfig(output_dir=str(tmp_path / "grpo"), kl_beta=0.1, **common)
    )
    ref = dict(grpo.reference_model.named_parameters())
    for name, p in grpo.policy.denoiser.named_parameters():
        assert ref[name].dtype == p.dtype == torch.float32
    assert grpo.train()["kl"] == 0.0
    prdp = va.PRDPTrainer(
        _bf16_pipeline(), brightness, PROMPTS, va.PRDPConfig(output_dir=str(tmp_path / "prdp"), **common)
    )
    assert prdp.train()["pred_reward_mean"] == 0.0
    dpo = va.DPOTrainer(
        _bf16_pipeline(), brightness, PROMPTS, va.DPOConfig(output_dir=str(tmp_path / "dpo"), mode="online", **common)
    )
    out = dpo.train()
    assert out["reward_margin"] == 0.0 and out["err_chosen"] == out["ref_err_chosen"]
