"""DRaFT (docs/math.md §5): gradient windows checked with hooks, LV and ReFL, checkpointing, learning, bad input."""

import json
import textwrap

import pytest
import torch

import visalign as va
from tests.algorithms.helpers import assert_lora_export_reproduces, train_with_crash
from tests.distributed import launch_two_processes
from visalign.algorithms.draft import draft_loss, grad_window
from visalign.errors import ConfigError, NotDifferentiableError
from visalign.testing import brightness, tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def make_config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        num_steps=4,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        trackers=["jsonl"],
    )
    base.update(overrides)
    return va.DRaFTConfig(**base)


class StepProbe:
    """A forward hook on the denoiser: records each call's grad mode and batch, and adds a zero-valued
    scalar parameter to its output — ``early`` on calls before ``boundary``, ``late`` from it on — so
    the gradient those parameters receive shows which steps the loss reaches."""

    def __init__(self, denoiser, boundary):
        self.calls, self.boundary = [], boundary
        self.early, self.late = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))
        self.handle = denoiser.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        index = len(self.calls)
        latents = args[0] if args else kwargs["hidden_states"]  # the UNet takes them positionally
        self.calls.append((torch.is_grad_enabled(), latents.shape[0]))
        bias = self.early if index < self.boundary else self.late
        return (output[0] + bias, *output[1:])


def parameter_grads(trainer):
    return torch.cat([p.grad.flatten() for p in trainer.trainable_parameters])


# ---------------------------------------------------------------------------- pure pieces
def test_grad_window():
    assert grad_window(5, 2, "fixed", None) == 3
    assert grad_window(5, None, "fixed", None) == 0
    starts = {grad_window(5, 3, "random", torch.Generator().manual_seed(s)) for s in range(40)}
    assert starts == {2, 3, 4}  # K' ∈ [1, 3]: the window is always the last K' steps
    assert grad_window(5, 3, "random", torch.Generator().manual_seed(7)) == grad_window(
        5, 3, "random", torch.Generator().manual_seed(7)
    )
    with pytest.raises(ConfigError, match="truncation=6"):
        grad_window(5, 6, "fixed", None)


def test_draft_loss():
    assert draft_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    assert draft_loss(torch.tensor([1.0, 3.0]), total=4).item() == -1.0  # a micro-batch of a batch of 4


# ---------------------------------------------------------------------------- gradient windows
def test_draft_k_gives_no_gradient_before_the_window(tmp_path):
    cfg = make_config(tmp_path, truncation=2, checkpoint_steps=False, use_lora=False)
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    probe = StepProbe(trainer.policy.denoiser, boundary=2)
    loss, rewards, info = trainer.rollout_loss(0, trainer.next_records())
    loss.backward()
    assert [grad for grad, _ in probe.calls] == [False, False, True, True]  # steps 0, 1 ran under no_grad
    assert probe.early.grad is None  # used only before the window: no gradient reaches it
    assert probe.late.grad is not None and probe.late.grad.abs() > 0
    assert parameter_grads(trainer).abs().max() > 0 and info["grad_start"] == 2.0
    assert rewards.shape == (2,) and loss.item() == pytest.approx(-rewards.mean().item())


def test_random_truncation_is_one_contiguous_window_per_rollout(tmp_path):
    cfg = make_config(tmp_path, num_steps=5, truncation=4, truncation_mode="random", checkpoint_steps=False)
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    seen = set()
    for step in range(6):
        probe = StepProbe(trainer.policy.denoiser, boundary=0)
        _, _, info = trainer.rollout_loss(step, trainer.next_records())
        probe.handle.remove()
        modes = [grad for grad, _ in probe.calls]
        start = int(info["grad_start"])
        assert modes == [False] * start + [True] * (5 - start)  # contiguous, ending at the last step
        assert 1 <= 5 - start <= 4
        seen.add(start)
    assert len(seen) > 1  # drawn per rollout, from the iteration's seed


def test_step_checkpointing_gives_the_same_gradients(tmp_path):
    grads = {}
    for checkpointing in (False, True):
        cfg = make_config(
            tmp_path / str(checkpointing), checkpoint_steps=checkpointing, use_lora=False, guidance_scale=3.0
        )
        trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        probe = StepProbe(trainer.policy.denoiser, boundary=0)
        loss, _, _ = trainer.rollout_loss(0, trainer.next_records())
        loss.backward()
        grads[checkpointing] = parameter_grads(trainer)
        calls = sum(grad for grad, _ in probe.calls)
        # with checkpointing each step (and the decode) runs again in backward
        assert calls == (8 if checkpointing else 4)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_lv_renoises_the_last_step(tmp_path):
    cfg = make_config(tmp_path, variant="lv", lv_samples=3, checkpoint_steps=False, use_lora=False)
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    probe = StepProbe(trainer.policy.denoiser, boundary=4)
    loss, rewards, _ = trainer.rollout_loss(0, trainer.next_records())
    loss.backward()
    # the whole chain without gradient, then one batched step with gradient on 2 samples × 3 re-noisings
    assert probe.calls == [(False, 2)] * 4 + [(True, 6)]
    assert probe.early.grad is None and probe.late.grad.abs() > 0
    assert rewards.shape == (2,)


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_refl_takes_one_late_step(tmp_path, family):
    cfg = make_config(tmp_path, variant="refl", refl_steps=(1, 2), checkpoint_steps=False, use_lora=False)
    trainer = va.DRaFTTrainer(tiny_pipeline(family), brightness, PROMPTS, cfg)
    probe = StepProbe(trainer.policy.denoiser, boundary=0)
    loss, _, info = trainer.rollout_loss(0, trainer.next_records())
    loss.backward()
    start = int(info["grad_start"])
    assert start in (1, 2)
    assert [grad for grad, _ in probe.calls] == [False] * start + [True]  # the chain stops at the ReFL step
    assert parameter_grads(trainer).abs().max() > 0


def test_micro_batches_accumulate_the_same_update(tmp_path):
    grads = {}
    for micro in (None, 1):
        cfg = make_config(tmp_path / str(micro), micro_batch_size=micro, use_lora=False, sampler="sde", truncation=2)
        trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        step = trainer.optimizer_step

        def capture(trainer=trainer, step=step, micro=micro):
            grads[micro] = parameter_grads(trainer)
            return step()

        trainer.optimizer_step = capture
        trainer.train()
    torch.testing.assert_close(grads[1], grads[None], rtol=1e-4, atol=1e-5 * float(grads[None].abs().max()))


# ---------------------------------------------------------------------------- learning
def test_draft_raises_brightness(tmp_path):
    """10 seeded iterations of DRaFT-2 (full fine-tuning) lift the mean reward by more than 5× its starting spread."""
    cfg = make_config(
        tmp_path,
        max_steps=10,
        num_steps=6,
        truncation=2,
        prompts_per_step=4,
        use_lora=False,
        learning_rate=1e-2,
        max_grad_norm=None,
    )
    va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    start, spread = rows[0]["reward_mean"], rows[0]["reward_std"]
    end = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert end - start > 5 * spread, (start, end, spread)


def test_draft_on_video_with_the_segmental_reward(tmp_path):
    """Wan T2V: the gradient flows through the video VAE decode and a segmental frame reward."""
    reward = va.rewards.SegmentalVideoReward(brightness, segments=2, sampling="fixed", attenuation=0.0)
    cfg = make_config(
        tmp_path, max_steps=8, num_frames=5, truncation=2, use_lora=False, learning_rate=1e-2, max_grad_norm=None
    )
    va.DRaFTTrainer(tiny_pipeline("wan-t2v"), reward, PROMPTS, cfg).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    start, spread = rows[0]["reward_mean"], rows[0]["reward_std"]
    end = sum(r["reward_mean"] for r in rows[-3:]) / 3
    # measured: 0.5019 → 0.506 with a starting spread of 0.0008
    assert end - start > 3 * spread, (start, end, spread)


# ---------------------------------------------------------------------------- resume and export
def test_exact_resume_after_a_crash(tmp_path):
    def run(output_dir, crash_at=None, resume=None):
        cfg = make_config(
            tmp_path,
            output_dir=str(output_dir),
            max_steps=4,
            checkpoint_every=2,
            keep_last=1,
            resume=resume,
            sampler="sde",
            truncation=3,
            truncation_mode="random",
            learning_rate=5e-2,
        )
        trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
        return train_with_crash(trainer, crash_at)

    full = run(tmp_path / "full")
    run(tmp_path / "crashed", crash_at=3)
    resumed = run(tmp_path / "crashed", resume="latest")
    assert resumed.state.step == 4
    assert all(torch.equal(a, b) for a, b in zip(full.trainable_parameters, resumed.trainable_parameters))


def test_lora_export_reproduces_the_trained_policy(tmp_path):
    cfg = make_config(tmp_path, max_steps=3, learning_rate=5e-2, truncation=2)
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)
    trainer.train()
    assert_lora_export_reproduces(trainer, "sd3", PROMPTS[:2], tmp_path / "lora")


# ---------------------------------------------------------------------------- bad input
def test_non_differentiable_reward_is_refused(tmp_path):
    flagged = va.rewards.as_reward(brightness, differentiable=False)
    with pytest.raises(NotDifferentiableError, match="not differentiable"):
        va.DRaFTTrainer(tiny_pipeline("sd3"), flagged, PROMPTS, make_config(tmp_path))
    detaching = lambda images, prompts: brightness(images.detach(), prompts)  # noqa: E731
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), detaching, PROMPTS, make_config(tmp_path))
    with pytest.raises(NotDifferentiableError, match="no gradient"):
        trainer.train()
    with pytest.raises(ConfigError, match="needs a differentiable reward"):
        va.DRaFTTrainer(tiny_pipeline("sd3"), None, PROMPTS, make_config(tmp_path))


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'truncation' must be in \[1, num_steps=4\]"):
        make_config(tmp_path, truncation=5)
    with pytest.raises(ConfigError, match="truncation"):
        make_config(tmp_path, truncation=0)
    with pytest.raises(ConfigError, match="refl_steps"):
        make_config(tmp_path, variant="refl", refl_steps=(2, 4))
    with pytest.raises(ConfigError, match="None unless variant='draft'"):
        make_config(tmp_path, variant="lv", truncation=1)
    with pytest.raises(ConfigError, match="lv_samples"):
        make_config(tmp_path, variant="lv", lv_samples=0)


# ---------------------------------------------------------------------------- distributed
DDP_SCRIPT = """
import json, sys, torch
import visalign as va
from visalign.testing import brightness, tiny_pipeline

torch.set_num_threads(1)
out = sys.argv[1]
cfg = va.DRaFTConfig(output_dir=out, max_steps=2, num_steps=3, prompts_per_step=2, truncation=2, height=32,
                     width=32, guidance_scale=3.0, lora_rank=4, learning_rate=1e-2, checkpoint_steps=True,
                     trackers=["jsonl"])
trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), brightness, ["a", "b", "c", "d"], cfg)
before = [p.detach().clone() for p in trainer.trainable_parameters]
trainer.train()
rank = trainer.accelerator.process_index
torch.save({"before": before, "after": [p.detach() for p in trainer.trainable_parameters]}, f"{out}/weights-{rank}.pt")
"""


@pytest.mark.slow
def test_two_process_draft_with_step_checkpointing(tmp_path):
    """Several forwards per backward, recomputed in backward, under gloo DDP: the ranks stay in sync."""
    script = tmp_path / "ddp_draft.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    launch_two_processes(str(script), str(tmp_path))
    w0, w1 = (torch.load(tmp_path / f"weights-{r}.pt") for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(w0["after"], w1["after"]))
    assert any(not torch.equal(a, b) for a, b in zip(w0["before"], w0["after"]))  # training moved the weights


def test_bad_rewards_are_skipped(tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        if calls["n"] == 2:
            return torch.full((images.shape[0],), float("nan"))
        return brightness(images, prompts)

    cfg = make_config(tmp_path, max_steps=3, truncation=1)
    trainer = va.DRaFTTrainer(tiny_pipeline("sd3"), flaky, PROMPTS, cfg)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r.get("skipped", 0) for r in rows] == [0, 1.0, 0] and "non-finite" in rows[1]["skip_reason"]
