"""Instruction editing (FLUX.1 Kontext, Qwen-Image-Edit): image + instruction → image.

The parametrised sampler, log-prob and LoRA tests cover the edit families through ``FAMILIES``
(tests/conftest.py); here: per-sample sources, Qwen-Image-Edit-Plus against its stock pipeline,
bad input, the edit reward, steering and GRPO on edit policies, and the toy world's edit task.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import visalign as va
from tests.conftest import EDIT_FAMILIES, first_frames, size_kwargs
from visalign.errors import ConfigError, InvalidInputError, UnsupportedPipelineError
from visalign.testing import tiny_clip, tiny_pipeline, tiny_vlm

INSTRUCTIONS = ["make the circle red", "make the square blue"]


def sources(family, batch=2, seed=0):
    return first_frames(family, batch, seed)


def sample(policy, family, images, instructions=None, **kwargs):
    kwargs = {
        "num_steps": 3,
        "sampler": "ode",
        "generator": torch.Generator().manual_seed(0),
        **size_kwargs(family),
        **kwargs,
    }
    return va.sample(policy, instructions or INSTRUCTIONS[: images.shape[0]], images=images, **kwargs)


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_each_sample_edits_its_own_source(tiny_policies, family):
    policy = tiny_policies(family)
    assert policy.needs_image
    a, b = sources(family, 1, seed=0), sources(family, 1, seed=1)
    out_a = sample(policy, family, a)
    out_b = sample(policy, family, b, INSTRUCTIONS[:1])
    assert (out_a.final_latents - out_b.final_latents).abs().max() > 1e-3  # the source conditions the output
    both = sample(
        policy,
        family,
        torch.cat([a, b]),
        INSTRUCTIONS[:1] * 2,
        generator=[torch.Generator().manual_seed(0) for _ in range(2)],
    )
    torch.testing.assert_close(both.images[1:], out_b.images, rtol=0, atol=1e-5)
    assert torch.equal(both.cond_images, torch.cat([a, b]))


def test_qwen_image_edit_plus_matches_stock():
    """Edit-Plus (2509): the VLM sees the source at ~384², the VAE at ~1 MP; stock takes one prompt."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(**tiny_pipeline("qwen-image-edit").components)
    policy = va.wrap(pipe, source_area=1024 * 1024)
    assert policy.family == "qwen-image-edit" and policy.plus
    image = sources("qwen-image-edit", 1)
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    latents = []
    stock = pipe(
        image=pil,
        prompt=INSTRUCTIONS[:1],
        negative_prompt=[" "],
        true_cfg_scale=4.0,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **size_kwargs("qwen-image-edit"),
        callback_on_step_end=lambda p, i, t, kw: latents.append(kw["latents"]) or kw,
    ).images
    ours = sample(policy, "qwen-image-edit", image, guidance_scale=4.0)
    torch.testing.assert_close(ours.images, stock, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.final_latents, latents[-1], rtol=0, atol=1e-5)


def test_kontext_source_sizes():
    policy = va.wrap(tiny_pipeline("flux-kontext"))
    assert policy.source_size(torch.zeros(1, 3, 32, 48)) == (32, 48)  # its own size by default
    snapping = va.wrap(policy.pipe, auto_resize=True)  # stock's default: a preferred Kontext resolution
    assert snapping.source_size(torch.zeros(1, 3, 32, 32)) == (1024, 1024)
    assert snapping.source_size(torch.zeros(1, 3, 30, 60)) == (720, 1456)  # the preferred 1456x720


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_edit_policy_without_sources(tiny_policies, family):
    with pytest.raises(InvalidInputError, match="images="):
        va.sample(tiny_policies(family), INSTRUCTIONS, num_steps=2, **size_kwargs(family))
    with pytest.raises(InvalidInputError, match="images="):  # the adapter says so when called directly too
        policy = tiny_policies(family)
        policy.encode_prompt(INSTRUCTIONS, geometry=policy.geometry(**size_kwargs(family)))


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_source_outside_the_unit_range(tiny_policies, family):
    with pytest.raises(InvalidInputError, match=r"\(images \+ 1\) / 2"):
        sample(tiny_policies(family), family, sources(family) * 2 - 1)


def test_source_of_the_wrong_size(tiny_policies):
    with pytest.raises(InvalidInputError, match="multiples of 4") as info:
        sample(tiny_policies("flux-kontext"), "flux-kontext", torch.rand(2, 3, 30, 32))
    assert "e.g. to 32x32" in str(info.value) and "auto_resize=True" in str(info.value)
    with pytest.raises(InvalidInputError, match="at least 32 px"):
        sample(tiny_policies("qwen-image-edit"), "qwen-image-edit", torch.rand(2, 3, 16, 16))


def test_unsupported_variants():
    from diffusers import FluxKontextInpaintPipeline

    with pytest.raises(UnsupportedPipelineError, match="FluxKontextPipeline"):
        va.wrap(FluxKontextInpaintPipeline(**tiny_pipeline("flux-kontext").components))
    distilled = tiny_pipeline("qwen-image", transformer={"guidance_embeds": True})
    with pytest.raises(UnsupportedPipelineError, match="guidance_embeds=True"):
        va.wrap(distilled)


# ---------------------------------------------------------------------------- the edit reward
@pytest.fixture(scope="module")
def edit_reward():
    model, processor = tiny_vlm(seed=1)
    clip, clip_processor = tiny_clip()
    return va.rewards.EditReward(
        model, processor, clip_model=clip, clip_processor=clip_processor, preservation_weight=0.5
    )


def test_edit_reward_parts(edit_reward):
    src, out = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    result = edit_reward.evaluate(out, INSTRUCTIONS, source_images=src)
    assert set(result.raw) == {"instruction", "preservation"}
    assert ((result.raw["instruction"] >= 0) & (result.raw["instruction"] <= 1)).all()
    torch.testing.assert_close(result.total, result.raw["instruction"] + 0.5 * result.raw["preservation"])
    # the judge sees the source first, then the edit: its pairwise P(yes) with the source as reference
    judged = edit_reward.judge(out, INSTRUCTIONS, reference_images=src)
    torch.testing.assert_close(result.raw["instruction"], judged)
    # an unchanged image preserves the source perfectly
    same = edit_reward.evaluate(src, INSTRUCTIONS, source_images=src).raw["preservation"]
    torch.testing.assert_close(same, torch.ones(2), rtol=0, atol=1e-5)


def test_edit_reward_reads_sources_from_an_image_column(edit_reward, tmp_path):
    src = torch.rand(2, 3, 32, 32)
    pils = [Image.fromarray((s.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for s in src]
    paths = []
    for i, pil in enumerate(pils):
        pil.save(tmp_path / f"s{i}.png")
        paths.append(str(tmp_path / f"s{i}.png"))
    out = torch.rand(2, 3, 32, 32)
    by_tensor = edit_reward(
        out,
        INSTRUCTIONS,
        source_images=torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pils]),
    )
    torch.testing.assert_close(edit_reward(out, INSTRUCTIONS, image=paths), by_tensor)
    torch.testing.assert_close(edit_reward(out, INSTRUCTIONS, image=pils), by_tensor)
    # a recipe's relative paths resolve against image_dir
    edit_reward.image_dir = str(tmp_path)
    try:
        torch.testing.assert_close(edit_reward(out, INSTRUCTIONS, image=["s0.png", "s1.png"]), by_tensor)
    finally:
        edit_reward.image_dir = None


def test_edit_reward_bad_input(edit_reward):
    with pytest.raises(InvalidInputError, match="source_images="):
        edit_reward(torch.rand(2, 3, 32, 32), INSTRUCTIONS)
    with pytest.raises(InvalidInputError, match="one source per edited image"):
        edit_reward(torch.rand(2, 3, 32, 32), INSTRUCTIONS, source_images=torch.rand(3, 3, 32, 32))
    model, processor = tiny_vlm()
    with pytest.raises(ConfigError, match="preservation"):
        va.rewards.EditReward(model, processor, preservation="lpips")


def test_pixel_preservation_needs_no_model():
    model, processor = tiny_vlm()
    reward = va.rewards.EditReward(model, processor, preservation="pixel", preservation_weight=1.0)
    src = torch.rand(2, 3, 32, 32)
    result = reward.evaluate(src.flip(0), INSTRUCTIONS, source_images=src)
    expected = 1 - (src.flip(0) - src).abs().flatten(1).mean(1)
    torch.testing.assert_close(result.raw["preservation"], expected)


def test_edit_reward_recipe_name():
    from visalign.recipes import build_reward, check_reward_spec

    check_reward_spec({"edit": {"type": "edit", "model": "Qwen/Qwen2.5-VL-7B-Instruct"}})
    check_reward_spec({"edit": {"type": "EditReward", "model": "Qwen/Qwen2.5-VL-7B-Instruct"}})
    assert isinstance(build_reward({"type": "toy_edit"}), va.rewards.Reward)


# ---------------------------------------------------------------------------- steering and training
@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_best_of_n_on_an_edit_policy(tiny_policies, family, edit_reward):
    src = sources(family)
    out = va.best_of_n(
        tiny_policies(family),
        INSTRUCTIONS,
        edit_reward,
        n=2,
        num_steps=2,
        images=src,
        reward_kwargs={"source_images": src},
        generator=torch.Generator().manual_seed(0),
        **size_kwargs(family),
    )
    assert out.images.shape == (2, 3, *src.shape[-2:]) and out.all_rewards.shape == (2, 2)
    assert torch.equal(out.rewards, out.all_rewards.max(1).values)


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_grpo_on_an_edit_policy_with_the_edit_reward(tmp_path, family, edit_reward):
    size = size_kwargs(family)
    rows = []
    for i, instruction in enumerate(INSTRUCTIONS):
        arr = (np.random.RandomState(i).rand(size["height"], size["width"], 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"src{i}.png")
        rows.append({"prompt": instruction, "image": str(tmp_path / f"src{i}.png")})
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = va.GRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        num_steps=3,
        group_size=2,
        prompts_per_step=2,
        lora_rank=4,
        guidance_scale=1.0,
        learning_rate=1e-2,
        trackers=["jsonl"],
        **size,
    )
    trainer = va.GRPOTrainer(tiny_pipeline(family), edit_reward, str(tmp_path / "edits.jsonl"), cfg)
    metrics = trainer.train()
    assert trainer.state.step == 2 and "reward/instruction_mean" in metrics


# ---------------------------------------------------------------------------- the toy world's edit task
def test_toy_edit_tasks_and_exact_check():
    from visalign.toy import render_batch
    from visalign.toy.edit import apply_instruction, edit_tasks, evaluate_edits

    tasks = edit_tasks()
    assert len(tasks) == 990  # 90 scenes × (5 colours + 2 shapes + 4 positions)
    task = tasks[0]
    assert (task.source_caption, task.instruction, task.target_caption) == (
        "a red circle on the left",
        "make the red circle green",
        "a green circle on the left",
    )
    picked = tasks[::50]
    src, tgt = render_batch([t.source for t in picked]), render_batch([t.target for t in picked])
    perfect = evaluate_edits(tgt, picked, src)
    assert perfect["all_correct"] == 1.0 and perfect["preservation"] == 1.0
    unchanged = evaluate_edits(src, picked, src)  # an editor that returns the source
    assert unchanged["edit_accuracy"] == 0.0 and unchanged["preservation"] == 1.0
    # changing the wrong attribute: the colour is right but the shape moved
    wrong = render_batch(["a green circle on the right"])
    result = evaluate_edits(wrong, [task], render_batch([task.source]))
    assert result["samples"][0]["edited"] and not result["samples"][0]["preserved"]
    assert (
        apply_instruction(
            "a red circle on the left and a blue square on the right", "turn the blue square into a triangle"
        )[0].caption()
        == "a red circle on the left and a blue triangle on the right"
    )
    with pytest.raises(InvalidInputError, match="not in"):
        apply_instruction("a red circle on the left", "make the blue square red")
    with pytest.raises(InvalidInputError, match="Cannot parse"):
        apply_instruction("a red circle on the left", "paint it red")


def test_toy_edit_reward():
    from visalign.toy import render_batch
    from visalign.toy.edit import ToyEditReward, edit_tasks

    tasks = edit_tasks(kinds=("color", "shape"), two_shapes=True)[::400]
    src, tgt = render_batch([t.source for t in tasks]), render_batch([t.target for t in tasks])
    reward = ToyEditReward(num_objects=2)
    instructions = [t.instruction for t in tasks]
    assert reward(tgt, instructions, source_images=src).min() == 1.0
    assert reward(src, instructions, source_images=src).max() < 1.0
