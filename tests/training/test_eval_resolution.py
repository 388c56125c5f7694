"""``eval_height``, ``eval_width``, ``eval_num_frames``: evaluations and saved samples at their own size,
rollouts at the training size."""

import json

import numpy as np
import pytest
from PIL import Image

import visalign as va
from visalign.errors import ConfigError
from visalign.pipelines.datatypes import Geometry
from visalign.testing import brightness, tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green square"]


class ShapeLog:
    """A reward (or true metric) that scores brightness and records the shape of every batch it sees."""

    def __init__(self):
        self.shapes = []

    def __call__(self, images, prompts, **conditioning):
        self.shapes.append(tuple(images.shape))
        return brightness(images, prompts)


def _train(tmp_path, family="sd3", prompts=PROMPTS, **overrides):
    video = family.startswith("wan")
    cfg = va.GRPOConfig(
        **{
            "output_dir": str(tmp_path / "run"),
            "max_steps": 1,
            "num_steps": 2,
            "group_size": 2,
            "prompts_per_step": 2,
            "height": 32,
            "width": 32,
            "num_frames": 5 if video else None,
            "lora_rank": 4,
            "guidance_scale": 1.0,
            "true_metric_every": 1,
            "true_metric_num_prompts": 2,
            "sample_every": 1,
            **overrides,
        }
    )
    reward, metric = ShapeLog(), ShapeLog()
    trainer = va.GRPOTrainer(tiny_pipeline(family), reward, prompts, cfg, true_metric=metric)
    trainer.train()
    return trainer, reward.shapes, metric.shapes


def test_evaluations_have_the_eval_size_and_rollouts_the_training_size(tmp_path):
    _, rewards, metric = _train(tmp_path, eval_height=48, eval_width=40, rollout_batch_size=1)
    assert rewards[0] == (4, 3, 32, 32)  # the rollout: prompts_per_step × group_size at the training size
    # the true metric's prompts, sampled rollout_batch_size at a time, and the reward of the same images
    assert metric == [(1, 3, 48, 40)] * 2
    assert rewards[1:3] == [(1, 3, 48, 40)] * 2
    assert rewards[3] == (3, 3, 48, 40)  # the saved samples (the first prompts of the source)
    saved = json.loads((tmp_path / "run" / "samples" / "step-000001.json").read_text())
    assert len(saved["samples"]) == 3


def test_none_falls_back_to_the_training_size(tmp_path):
    *_, metric = _train(tmp_path / "none")
    assert metric == [(2, 3, 32, 32)]
    *_, metric = _train(tmp_path / "height", eval_height=48, sample_every=0)
    assert metric == [(2, 3, 48, 32)]  # eval_width None: the training width


def test_a_bad_eval_size_raises_a_clear_config_error(tmp_path):
    def build(**overrides):
        cfg = va.GRPOConfig(output_dir=str(tmp_path), height=32, width=32, **overrides)
        return va.GRPOTrainer(tiny_pipeline("sd3"), brightness, PROMPTS, cfg)

    # at construction, not at the first evaluation; the tiny SD3 needs multiples of 4 (VAE × patch)
    with pytest.raises(ConfigError, match=r"eval_height=30 is not a positive multiple of 4.*Use eval_height=32"):
        build(eval_height=30)
    with pytest.raises(ConfigError, match=r"eval_width=33 .* multiple of 4"):
        build(eval_width=33)
    with pytest.raises(ConfigError, match=r"evaluation size .*eval_num_frames=5.*image family"):
        build(eval_num_frames=5)
    with pytest.raises(ConfigError, match="eval_height"):
        va.GRPOConfig(eval_height=0).validate()
    assert build(eval_height=48).eval_geometry() == Geometry(48, 32, None)


def test_video_evaluations_have_the_eval_frames_and_image_to_video_frames_at_the_eval_size(tmp_path):
    rng = np.random.RandomState(0)
    rows = []
    for i in range(2):
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / f"frame{i}.png")
        rows.append({"prompt": PROMPTS[i], "image": f"frame{i}.png"})
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    trainer, rewards, metric = _train(
        tmp_path,
        "wan-i2v",
        str(tmp_path / "prompts.jsonl"),
        eval_height=48,
        eval_num_frames=9,
        sample_every=0,
    )
    assert rewards[0] == (4, 5, 3, 32, 32)
    assert metric == [(2, 9, 3, 48, 32)]
    # the first frames are loaded at the size they condition
    assert trainer.load_condition_images(rows[:1], trainer.eval_geometry()).shape == (1, 3, 48, 32)
    assert trainer.load_condition_images(rows[:1]).shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"num_frames=6 is not of the form 4·n\+1"):
        _train(tmp_path / "bad", "wan-i2v", str(tmp_path / "prompts.jsonl"), eval_num_frames=6)


def test_eval_sizes_are_config_fields_with_help():
    for key in ("eval_height", "eval_width", "eval_num_frames", "rollout_batch_size"):
        assert va.GRPOConfig.field_help(key)
        assert getattr(va.DRaFTConfig(), key) is None
    cfg = va.GRPOConfig().with_overrides(["eval_height=64", "eval_num_frames=none"])
    assert cfg.eval_height == 64 and cfg.eval_num_frames is None
