"""Helpers shared by the algorithm tests."""


def train_with_crash(trainer, crash_at=None):
    """Trains; with ``crash_at``, stops with a simulated crash right after that step. Returns the trainer."""
    if crash_at is not None:

        def crash(trainer, step, metrics):
            if step == crash_at:
                raise KeyboardInterrupt("simulated crash")

        trainer.add_callback(crash)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


def assert_lora_export_reproduces(trainer, family: str, prompts, lora_dir) -> None:
    """``trainer.save_lora`` loads into a fresh stock pipeline with ``load_lora_weights`` and samples
    exactly like the trained policy, and training changed the samples (so the check can fail)."""
    import torch

    import visalign as va
    from visalign.testing import tiny_pipeline

    trainer.save_lora(str(lora_dir))
    kwargs = dict(num_steps=4, sampler="ode", height=32, width=32, guidance_scale=1.0)
    ours = va.sample(trainer.policy, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    fresh = tiny_pipeline(family)
    fresh.load_lora_weights(str(lora_dir))
    theirs = va.sample(va.wrap(fresh), prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(theirs.images, ours.images, rtol=0, atol=1e-5)
    base = va.sample(va.wrap(tiny_pipeline(family)), prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (base.images - ours.images).abs().max() > 1e-5  # training changed something


def tiny_config(config_class, tmp_path, family: str = "sd3", **overrides):
    """A short run on a tiny policy: 2 iterations of 2 prompts × 2 samples, 4 steps, 32 px, LoRA r4.

    Wan families get 5 frames; ``overrides`` replace or add fields.
    """
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        num_steps=4,
        group_size=2,
        prompts_per_step=2,
        height=32,
        width=32,
        num_frames=5 if family.startswith("wan") else None,
        lora_rank=4,
        trackers=["jsonl"],
    )
    return config_class(**{**base, **overrides})
