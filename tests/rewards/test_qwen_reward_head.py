"""Qwen2-VL reward-token heads: HPSv3 and VideoAlign on a tiny random Qwen2-VL.

What is checked: the score is read at the reward token(s) only; the prompt format; the patch layout
equals transformers' PIL image processor; frame sampling counts; the checkpoint key remap round
trip (strict, with named keys on mismatch); the LoRA merge equals peft's; gradients reach pixels;
VideoAlign's heads as RewardResult parts and inside SegmentalVideoReward.
"""

import copy
import json

import numpy as np
import pytest
import torch

from visalign.errors import CheckpointError, InvalidInputError
from visalign.rewards import HPSv3, SegmentalVideoReward, VideoAlignReward, call_reward
from visalign.rewards.hpsv3 import HPSV3_INSTRUCTION, HPSV3_SUFFIX
from visalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize
from visalign.rewards.qwen_checkpoint import remap_qwen2vl_keys, to_legacy_qwen2vl_keys
from visalign.rewards.qwen_inputs import patchify, sample_frame_indices, smart_resize
from visalign.rewards.qwen_reward_head import QwenRewardHeadModel, tiny_qwen2vl
from visalign.rewards.video_align import VIDEOALIGN_PROMPT, VIDEOALIGN_TOKENS

PIX = 56 * 56  # tiny: every image becomes 56 x 56 = a 4 x 4 patch grid, 4 merged tokens
PROMPTS = ["a red cat", "a blue dog on a green cube"]


def frames(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g).requires_grad_(requires_grad)


@pytest.fixture(scope="module")
def qwen():
    """(a tiny Qwen2VLForConditionalGeneration, its tokenizer); copy before mutating."""
    return tiny_qwen2vl(seed=0)


@pytest.fixture(scope="module")
def hps(qwen):
    model, tok = qwen
    torch.manual_seed(0)
    return HPSv3(model=copy.deepcopy(model), tokenizer=copy.deepcopy(tok), pixels=PIX, batch_size=None)


# ----------------------------------------------------------------------------- preprocessing
def test_patch_layout_equals_the_pil_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = frames(3, 56, 84)
    ref = Qwen2VLImageProcessorPil()(
        images=[img.permute(1, 2, 0).numpy().astype(np.float32)], do_rescale=False, do_resize=False, return_tensors="pt"
    )
    mine, grid = patchify(normalize(img[None], CLIP_MEAN, CLIP_STD))
    assert list(grid) == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    assert torch.equal(mine, ref["pixel_values"])  # exactly: same order, same arithmetic


def test_video_patches_are_the_notes_view_permute():
    x = frames(4, 3, 56, 28)
    mine, (t, h, w) = patchify(x)
    ref = x.reshape(2, 2, 3, 2, 2, 14, 1, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, -1)
    assert (t, h, w) == (2, 4, 2) and torch.equal(mine, ref)
    # an odd frame count repeats the last frame
    odd, grid = patchify(x[:3])
    assert grid == (2, 4, 2) and torch.equal(odd, patchify(torch.cat([x[:3], x[2:3]]))[0])


def test_smart_resize_and_frame_sampling_counts():
    assert smart_resize(512, 512, 28, 200704, 200704) == (448, 448)  # HPSv3: 256 merged tokens
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        smart_resize(10, 4000)
    # 2 fps, n clamped to [4, 768] and to the clip, even; linspace(0, T-1, n).round()
    assert sample_frame_indices(16, video_fps=16).tolist() == [0, 5, 10, 15]  # 2 -> 4
    assert len(sample_frame_indices(81, video_fps=16)) == 10  # 10.1 -> 10
    assert len(sample_frame_indices(49, video_fps=8)) == 12  # 12.25 -> 12
    assert len(sample_frame_indices(100_000, video_fps=1)) == 768
    assert sample_frame_indices(3, video_fps=16).tolist() == [0, 2]  # even, <= T
    assert sample_frame_indices(1, video_fps=16).tolist() == [0]
    assert sample_frame_indices(20, video_fps=8).tolist() == [0, 6, 13, 19]  # 5 -> 4
    assert len(sample_frame_indices(20, num_frames=7)) == 8
    for t in range(1, 60):
        n = len(sample_frame_indices(t, video_fps=5))
        assert n == 1 if t == 1 else (n % 2 == 0 and 2 <= n <= t)


# ----------------------------------------------------------------------------- HPSv3
def test_hpsv3_prompt_format_and_right_padding(hps):
    text = hps.inputs.render(hps.prompt_text("a red cat"))
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    assert HPSV3_INSTRUCTION.replace("{text_prompt}", "a red cat") + HPSV3_SUFFIX in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")  # the generation prompt
    inputs = hps.inputs.build(
        [frames(1, 3, 64, 64), frames(1, 3, 40, 90)], [hps.prompt_text(p) for p in PROMPTS], "image"
    )
    mask = inputs["attention_mask"]
    assert bool(mask[:, 0].all()) and not bool(mask[0].all())  # right padding
    pad = hps.tokenizer.pad_token_id
    assert bool((inputs["input_ids"][0][mask[0] == 0] == pad).all())
    # min = max pixels, as HPSv3; like qwen-vl-utils, 40 x 90 lands on 56 x 84 (a 4 x 6 grid)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    n_img = (inputs["input_ids"] == hps.model.config.image_token_id).sum(1)
    assert n_img.tolist() == [4, 6]  # patches / 2x2 merge
    assert ((inputs["input_ids"] == hps.model.reward_token_ids[0]).sum(1) == 1).all()


def test_hpsv3_score_is_read_at_the_reward_token_only(hps):
    x = frames(2, 3, 64, 64)
    inputs = hps.inputs.build([im[None] for im in x], [hps.prompt_text(p) for p in PROMPTS], "image")
    ids = inputs["input_ids"]
    with torch.no_grad():
        hidden = hps.model.hidden_states(**inputs)
        base = hps.model.read(hidden, ids)
        torch.testing.assert_close(hps(x, PROMPTS), base[:, 0, 0])  # the score is mu
        pos = hps.model.token_positions(ids)[:, 0]
        other = hidden.clone()
        for row in range(2):  # change every position except the reward token
            keep = other[row, pos[row]].clone()
            other[row] += 10 * torch.randn_like(other[row])
            other[row, pos[row]] = keep
        assert torch.equal(hps.model.read(other, ids), base)
        at = hidden.clone()
        at[torch.arange(2), pos] += 1.0
        assert not torch.allclose(hps.model.read(at, ids), base)
    mu, sigma = hps.predict(x, PROMPTS)
    assert mu.shape == sigma.shape == (2,)
    with pytest.raises(InvalidInputError, match="exactly once"):
        hps.model.read(hidden, torch.zeros_like(ids))


def test_hpsv3_gradient_reaches_the_pixels(hps):
    x = frames(1, 3, 50, 60, requires_grad=True)
    hps(x, PROMPTS[:1]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_key_remap_round_trip_and_strict_hpsv3_checkpoint(hps, qwen, tmp_path):
    sd = hps.model.checkpoint_state_dict(legacy=True, lm_head=torch.randn(64, 32))
    keys = set(sd)
    assert any(k.startswith("visual.blocks.0.") for k in keys)
    assert "model.embed_tokens.weight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    assert {"rm_head.0.weight", "rm_head.3.weight", "rm_head.5.bias", "lm_head.weight"} <= keys
    new = remap_qwen2vl_keys(sd)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in new
    assert "model.visual.blocks.0.attn.qkv.weight" in new and "lm_head.weight" in new
    assert to_legacy_qwen2vl_keys(new).keys() == keys
    assert remap_qwen2vl_keys(new).keys() == new.keys()  # idempotent
    peft = {"base_model.model." + k: v for k, v in sd.items()}
    assert "base_model.model.model.language_model.norm.weight" in remap_qwen2vl_keys(peft)
    # load the legacy checkpoint into a differently initialised model: same scores
    model, tok = qwen
    other_backbone, _ = tiny_qwen2vl(seed=5)
    torch.manual_seed(5)
    loaded = HPSv3(sd, model=other_backbone, tokenizer=copy.deepcopy(tok), pixels=PIX)
    x = frames(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x, PROMPTS), hps(x, PROMPTS), rtol=0, atol=0)
    # no model given: the architecture of `base`'s config is built empty (meta) and filled
    folder = tmp_path / "base"
    model.config.save_pretrained(folder)
    from_config = HPSv3(sd, base=str(folder), tokenizer=copy.deepcopy(tok), pixels=PIX)
    assert not any(p.is_meta for p in from_config.parameters())
    torch.testing.assert_close(from_config(x, PROMPTS), hps(x, PROMPTS), rtol=0, atol=0)
    # mismatched keys: refused, with the keys named
    bad = dict(sd)
    del bad["rm_head.3.bias"]
    bad["visual.blocks.0.attn.q_norm.weight"] = torch.zeros(4)
    bad["score.weight"] = torch.zeros(2, 32)
    with pytest.raises(CheckpointError) as err:
        HPSv3(bad, model=tiny_qwen2vl(seed=6)[0], tokenizer=copy.deepcopy(tok), pixels=PIX)
    msg = str(err.value)
    assert "rm_head.3.bias" in msg and "score.weight" in msg and "q_norm" in msg


# ----------------------------------------------------------------------------- VideoAlign
@pytest.fixture(scope="module")
def lora_release(qwen, tmp_path_factory):
    """A synthetic VideoReward release: a peft LoRA (r 64, alpha 128) on the tiny model, saved in
    the old key layout, the head in non_lora_state_dict.pth; and peft's own merged model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model, tok = qwen
    tok = copy.deepcopy(tok)
    base = copy.deepcopy(model)
    cfg = LoraConfig(
        r=64,
        lora_alpha=128,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
    )
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # both start at zero in peft
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=True).items()}
    adapter = to_legacy_qwen2vl_keys(adapter)  # as the release: model.layers.*
    head = 0.1 * torch.randn(3, 32, generator=g)
    non_lora = {"base_model.model.rm_head.weight": head}
    merged = peft_model.merge_and_unload()
    folder = tmp_path_factory.mktemp("VideoReward")
    (folder / "checkpoint-7").mkdir()
    from safetensors.torch import save_file

    save_file(adapter, str(folder / "checkpoint-7" / "adapter_model.safetensors"))
    torch.save(non_lora, folder / "checkpoint-7" / "non_lora_state_dict.pth")
    config = {
        "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": PIX, "sample_type": "uniform"},
        "peft_lora_config": {"lora_r": 64, "lora_alpha": 128, "use_rslora": False},
        "inference_config": {
            "VQ_mean": 0.5,
            "VQ_std": 2.0,
            "MQ_mean": -1.0,
            "MQ_std": 0.5,
            "TA_mean": 0.25,
            "TA_std": 4.0,
        },
    }
    (folder / "model_config.json").write_text(json.dumps(config))
    return dict(
        base=base, tok=tok, adapter=adapter, non_lora=non_lora, head=head, merged=merged, folder=folder, config=config
    )


@pytest.fixture(scope="module")
def va(lora_release):
    r = lora_release
    return VideoAlignReward(
        str(r["folder"]),
        model=copy.deepcopy(r["base"]),
        tokenizer=copy.deepcopy(r["tok"]),
        min_pixels=PIX,
        video_fps=8.0,
        batch_size=None,
    )


def test_lora_merge_equals_peft(va, lora_release):
    r = lora_release
    ours = va.qwen.backbone.state_dict()
    theirs = r["merged"].model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(
        ours["language_model.layers.0.self_attn.q_proj.weight"],
        r["base"].model.state_dict()["language_model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(va.qwen.head.weight, r["head"])
    assert va.normalization == {"VQ": (0.5, 2.0), "MQ": (-1.0, 0.5), "TA": (0.25, 4.0)}
    # the same from state dicts passed directly
    direct = VideoAlignReward(
        model=copy.deepcopy(r["base"]),
        adapter=r["adapter"],
        non_lora=r["non_lora"],
        lora_alpha=128,
        tokenizer=copy.deepcopy(r["tok"]),
        min_pixels=PIX,
        max_pixels=PIX,
    )
    for k, v in direct.qwen.backbone.state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-6)


def test_bad_lora_checkpoints_are_refused(lora_release):
    r = lora_release
    kw = dict(lora_alpha=128, tokenizer=copy.deepcopy(r["tok"]), min_pixels=PIX, max_pixels=PIX)
    wrong = dict(r["adapter"])
    wrong["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(64, 32)
    wrong["base_model.model.model.layers.0.self_attn.nope.lora_B.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match="nope"):
        VideoAlignReward(model=copy.deepcopy(r["base"]), adapter=wrong, non_lora=r["non_lora"], **kw)
    half = {k: v for k, v in r["adapter"].items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(CheckpointError, match="incomplete pair"):
        VideoAlignReward(model=copy.deepcopy(r["base"]), adapter=half, non_lora=r["non_lora"], **kw)
    with pytest.raises(CheckpointError, match="no reward head"):
        VideoAlignReward(model=copy.deepcopy(r["base"]), adapter=r["adapter"], non_lora={}, **kw)


def test_videoalign_heads_are_read_at_their_tokens_and_summed(va):
    v = frames(2, 20, 3, 40, 60)
    result = va.evaluate(v, PROMPTS)
    assert va.model.last_frame_indices.tolist() == [0, 6, 13, 19]  # 20 frames at 8 fps -> 4
    assert set(result.components) == {"VQ", "MQ", "TA"}
    torch.testing.assert_close(result.total, sum(result.components.values()))
    for h, (mean, std) in va.normalization.items():
        torch.testing.assert_close(result.components[h], (result.raw[h] - mean) / std)
    # token k reads head output k, at that token only
    clips = [va.model.frames(c) for c in v]
    texts = [VIDEOALIGN_PROMPT.replace("{text_prompt}", p) for p in PROMPTS]
    inputs = va.model.inputs.build(clips, texts, "video")
    qwen = va.qwen
    with torch.no_grad():
        hidden = qwen.hidden_states(**inputs)
        pos = qwen.token_positions(inputs["input_ids"])
        assert pos.shape == (2, 3) and bool((pos[:, 0] < pos[:, 1]).all() & (pos[:, 1] < pos[:, 2]).all())
        rows = torch.arange(2)
        for k, h in enumerate(("VQ", "MQ", "TA")):
            manual = hidden[rows, pos[:, k]].float() @ qwen.head.weight[k]
            torch.testing.assert_close(result.raw[h], manual, rtol=1e-5, atol=1e-5)
        moved = hidden.clone()
        moved[rows, pos[:, 0] - 1] += 5.0  # the token before <|VQ_reward|>
        torch.testing.assert_close(
            qwen.read(moved, inputs["input_ids"]), qwen.read(hidden, inputs["input_ids"]), rtol=0, atol=0
        )
    assert set(VIDEOALIGN_TOKENS) <= set(va.tokenizer.get_vocab())
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6], [2, 4, 6]]  # 4 frames -> t = 2


def test_videoalign_gradient_and_segmental_use(va):
    v = frames(1, 6, 3, 40, 40, requires_grad=True)
    va(v, PROMPTS[:1], video_fps=24.0).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    # as the per-frame reward of the segmental video reward (each frame a one-frame clip)
    seg = SegmentalVideoReward(va, segments=2, sampling="fixed", attenuation=0.0)
    with torch.no_grad():
        got = seg(v.detach(), PROMPTS[:1])
        single = call_reward(va, v.detach()[:, [0, 3]].flatten(0, 1), PROMPTS[:1] * 2).total
    torch.testing.assert_close(got, single.mean()[None])


def test_recipe_names(hps):
    from visalign.recipes import BUILTIN_REWARDS, check_reward_spec

    assert {"hpsv3", "videoalign", "image_reward"} <= set(BUILTIN_REWARDS)
    check_reward_spec({"a": {"type": "hpsv3"}, "b": {"type": "videoalign"}})
    assert isinstance(QwenRewardHeadModel, type) and isinstance(hps.model, QwenRewardHeadModel)
