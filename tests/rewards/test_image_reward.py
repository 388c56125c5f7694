"""ImageReward: BLIP + MLP head, the released key map (strict), torch preprocessing, gradients."""

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.errors import CheckpointError
from visalign.rewards import ImageReward, call_reward
from visalign.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    ImageRewardModel,
    map_released_key,
)
from visalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize
from visalign.testing.image_reward import tiny_image_reward

PROMPTS = ["a red cat on the cube", "a photo of a blue dog"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_image_reward(seed=0)


@pytest.fixture(scope="module")
def reward(tiny):
    model, tok = tiny
    return ImageReward(model=model, tokenizer=tok, batch_size=None)


def test_score_is_the_standardised_mlp_output_at_the_first_token(reward):
    x = rand_images(2, (40, 48))
    scores = reward(x, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    tokens = reward.tokenize(PROMPTS, x.device)
    with torch.no_grad():
        h = reward.model.features(reward.preprocess(x), tokens["input_ids"], tokens["attention_mask"])
        expected = (reward.model.mlp(h) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
    torch.testing.assert_close(scores, expected)
    # the head is linear in eval (no activations), as released
    mlp = reward.model.mlp
    a, b = torch.randn(3, mlp.input_dim), torch.randn(3, mlp.input_dim)
    torch.testing.assert_close(mlp(a + b) - mlp(b), mlp(a) - mlp(torch.zeros_like(a)), atol=1e-5, rtol=1e-5)
    # the prompt goes through cross-attention with the image: it changes the score
    assert not torch.allclose(reward(x, ["a red cat", "a red cat"]), reward(x, ["a dog", "a dog"]))
    # chunking does not change anything
    reward.batch_size = 1
    try:
        torch.testing.assert_close(reward(x, PROMPTS), scores)
    finally:
        reward.batch_size = None


def test_text_is_bert_with_dec_enc_tokens_padded_to_35(reward, tiny):
    tok = reward.tokenizer
    vocab = tok.get_vocab()
    assert "[DEC]" in vocab and "[ENC]" in vocab and tok.bos_token == "[DEC]"
    assert len(tok) <= reward.model.text.config.vocab_size
    enc = reward.tokenize(["a red cat", "a red cat " + "dog " * 50], torch.device("cpu"))
    assert enc["input_ids"].shape == (2, 35)
    assert enc["input_ids"][:, 0].tolist() == [tok.cls_token_id] * 2  # first token stays [CLS]
    assert enc["attention_mask"][0].sum() == 5 and enc["attention_mask"][1].all()


def test_preprocessing_resizes_the_short_side_crops_and_normalises(reward):
    x = rand_images(1, (40, 48))
    size = reward.model.image_size  # 32 in the tiny model (224 released)
    out = reward.preprocess(x)
    assert out.shape == (1, 3, size, size)
    short = resize(x, (size, int(size * 48 / 40)), mode="bicubic", antialias=True)  # 32 x 38
    left = round((short.shape[-1] - size) / 2)  # torchvision's
    torch.testing.assert_close(out, normalize(short[..., :, left : left + size], CLIP_MEAN, CLIP_STD))


def test_gradient_reaches_the_pixels(reward):
    x = rand_images(2, (40, 48), requires_grad=True)
    reward(x, PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert reward.differentiable
    assert all(not p.requires_grad for p in reward.parameters())


def test_released_checkpoint_round_trip(tiny):
    model, tok = tiny
    sd = model.released_state_dict()
    # the released naming
    for key in (
        "blip.visual_encoder.cls_token",
        "blip.visual_encoder.pos_embed",
        "blip.visual_encoder.patch_embed.proj.weight",
        "blip.visual_encoder.blocks.1.attn.qkv.bias",
        "blip.visual_encoder.blocks.0.attn.proj.weight",
        "blip.visual_encoder.blocks.0.norm2.weight",
        "blip.visual_encoder.blocks.0.mlp.fc1.weight",
        "blip.visual_encoder.norm.bias",
        "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
        "blip.text_encoder.embeddings.word_embeddings.weight",
        "mlp.layers.0.weight",
        "mlp.layers.2.weight",
        "mlp.layers.4.weight",
        "mlp.layers.6.weight",
        "mlp.layers.7.bias",
    ):
        assert key in sd, key
    assert all(map_released_key(k) is not None for k in sd)
    # what the release holds besides: dropped on purpose
    sd["blip.vision_proj.weight"] = torch.zeros(256, 32)
    sd["blip.text_proj.bias"] = torch.zeros(256)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    other, _ = tiny_image_reward(seed=1)
    x = rand_images(2, (40, 48))
    before = ImageReward(model=other, tokenizer=tok)(x, PROMPTS)
    loaded = ImageReward(sd, model=other, tokenizer=tok)
    reference = ImageReward(model=model, tokenizer=tok)
    assert not torch.allclose(before, reference(x, PROMPTS))
    torch.testing.assert_close(loaded(x, PROMPTS), reference(x, PROMPTS), rtol=0, atol=0)


def test_mismatched_checkpoint_keys_are_refused_with_the_keys_named(tiny, tmp_path):
    model, tok = tiny
    sd = model.released_state_dict()
    del sd["mlp.layers.7.bias"]
    sd["blip.visual_encoder.blocks.0.attn.q_norm.weight"] = torch.zeros(32)
    sd["blip.itm_head.weight"] = torch.zeros(2, 32)
    fresh, _ = tiny_image_reward(seed=2)
    with pytest.raises(CheckpointError) as err:
        ImageReward(sd, model=fresh, tokenizer=tok)
    msg = str(err.value)
    assert "blip.itm_head.weight" in msg and "attn.q_norm.weight" in msg and "mlp.layers.7.bias" in msg
    # a file of the wrong architecture, read with weights_only=True, into the released model
    path = tmp_path / "ImageReward.pt"
    torch.save(model.released_state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        ImageReward(str(path), tokenizer=tok)


def test_model_must_have_cross_attention_and_no_pooler(tiny):
    from transformers import BlipTextModel

    model, _ = tiny
    with pytest.raises(ValueError, match="add_pooling_layer=False"):
        ImageRewardModel(model.vision, BlipTextModel(model.text.config, add_pooling_layer=True))


def test_recipe_name_builds_it(tiny):
    from visalign.recipes import build_reward, check_reward_spec

    model, tok = tiny
    check_reward_spec({"type": "image_reward"})
    reward = build_reward({"type": "image_reward", "model": model, "tokenizer": tok})
    assert isinstance(reward, ImageReward)
    assert call_reward(reward, rand_images(1, (32, 32)), ["a cat"]).total.shape == (1,)
