"""CLIPScore and PickScore: hand-computed formulas, constructed orderings, gradients, loading."""

import copy

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.errors import ConfigError
from visalign.rewards import CLIPScore, PickScore
from visalign.rewards.preprocess import ImageTransform
from visalign.testing.rewards import color_images

PROMPTS = ["a red cat", "a photo of a blue square", "a red cat"]


def hand_cosine(model, processor, images, texts):
    """cos(image, text) straight from CLIPModel.forward's normalised embeddings."""
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = ImageTransform.from_processor(processor.image_processor)(images)
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return (out.image_embeds * out.text_embeds).sum(-1)


@pytest.mark.parametrize(
    "variant, prefix, fn",
    [
        ("hessel", "A photo depicts ", lambda c: 2.5 * c.clamp(min=0)),
        ("cosine", "", lambda c: c),
        ("torchmetrics", "", lambda c: 100 * c.clamp(min=0)),
    ],
)
def test_clipscore_equals_the_formula(clip_pair, variant, prefix, fn):
    model, processor = clip_pair
    x = rand_images(3, size=(36, 44))
    expected = fn(hand_cosine(model, processor, x, [prefix + p for p in PROMPTS]))
    got = CLIPScore(model, processor, variant=variant, batch_size=2)(x, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pickscore_equals_logit_scale_times_cosine(clip_pair):
    model, processor = clip_pair
    x = rand_images(3, size=(36, 44))
    expected = model.logit_scale.exp() * hand_cosine(model, processor, x, PROMPTS)
    torch.testing.assert_close(PickScore(model, processor)(x, PROMPTS), expected.detach(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cls", [CLIPScore, PickScore])
def test_constructed_cases_are_ordered(trained_clip, cls):
    model, processor = trained_clip
    kw = {"variant": "cosine"} if cls is CLIPScore else {}
    reward = cls(model, processor, **kw)
    colors = ["red", "green", "blue", "yellow"]
    images = color_images(colors, size=(40, 48), noise=0.03, seed=123)
    # each image scores highest with its own colour, and each prompt prefers its own image
    table = torch.stack([reward(images, [f"a photo of {c}"] * 4) for c in colors])  # [prompt, image]
    assert torch.equal(table.argmax(0), torch.arange(4))
    assert torch.equal(table.argmax(1), torch.arange(4))


def test_gradients_reach_pixels_and_weights_stay_frozen(clip_pair):
    model, processor = clip_pair
    reward = CLIPScore(model, processor, variant="cosine")
    assert not any(p.requires_grad for p in reward.parameters())
    x = rand_images(2, requires_grad=True)
    reward(x, ["a red cat", "a dog"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    reward.train()
    assert not reward.clip.model.training  # dropout stays off


def test_half_precision_model_gives_float32_scores_on_the_images_device(clip_pair):
    model, processor = clip_pair
    half = copy.deepcopy(model).to(torch.bfloat16)
    x = rand_images(2)
    reward = CLIPScore(half, processor, variant="cosine")
    out = reward(x, PROMPTS[:2])
    assert out.dtype == torch.float32 and out.device == x.device
    assert reward.clip.dtype == torch.bfloat16  # placement moves devices, keeps the dtype
    torch.testing.assert_close(out, CLIPScore(model, processor, variant="cosine")(x, PROMPTS[:2]), atol=0.05, rtol=0)


def test_save_and_load_from_a_local_folder(clip_pair, tmp_path):
    model, processor = clip_pair
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    x = rand_images(2)
    loaded = CLIPScore(str(tmp_path))(x, PROMPTS[:2])
    torch.testing.assert_close(loaded, CLIPScore(model, processor)(x, PROMPTS[:2]))
    assert CLIPScore(str(tmp_path), torch_dtype=torch.bfloat16).clip.dtype == torch.bfloat16


def test_built_model_without_processor_cannot_encode_prompts(clip_pair):
    with pytest.raises(ConfigError, match="no tokenizer: pass processor="):
        CLIPScore(clip_pair[0])(rand_images(1), ["a cat"])
    with pytest.raises(ConfigError, match="variant"):
        CLIPScore(*clip_pair, variant="nope")
