"""YesTokenReward: token ids, normalised probabilities by hand, pairwise mode, gradients, loading."""

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.errors import ConfigError, InvalidInputError, NotDifferentiableError
from visalign.rewards import YesTokenReward, answer_token_ids
from visalign.testing.rewards import tiny_vlm, tiny_vlm_tokenizer

PROMPTS = ["a red cat", "a blue square on the left of a green circle"]  # different lengths


@pytest.fixture(scope="module")
def sharp_vlm():
    """A tiny LLaVA whose output distribution is less flat (lm_head x 10), so P(yes) varies with
    the image and prompt (about 0.78 +- 0.01 normalised) and comparisons mean something."""
    model, processor = tiny_vlm(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model, processor


def to_uint8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def hand_probs(model, processor, reward, images, prompts, refs=None):
    """P(yes), P(no) one sample at a time (no padding), from the full logits."""
    yes, no = [], []
    for i, p in enumerate(prompts):
        imgs = [to_uint8(refs[i]), to_uint8(images[i])] if refs is not None else [to_uint8(images[i])]
        enc = processor(images=[imgs] if refs is not None else imgs, text=[reward.render(p)], return_tensors="pt")
        with torch.no_grad():
            probs = model(**enc).logits[0, -1].softmax(-1)
        yes.append(probs[reward.yes_token_ids].sum())
        no.append(probs[reward.no_token_ids].sum())
    return torch.stack(yes), torch.stack(no)


def test_answer_token_ids_cover_case_and_leading_space_variants():
    tok = tiny_vlm_tokenizer()
    ids = answer_token_ids(tok, ["yes"])
    assert sorted(tok.convert_ids_to_tokens(ids)) == sorted(["yes", "Yes", "YES", "Ġyes", "ĠYes", "ĠYES"])
    for text in ("yes", " yes", "Yes", " Yes"):
        assert tok.encode(text, add_special_tokens=False)[0] in ids
    no = answer_token_ids(tok, ["no"])
    assert not set(ids) & set(no) and len(no) == 6
    with pytest.raises(ConfigError, match="single token"):
        answer_token_ids(tok, ["supercalifragilistic"])


@pytest.mark.parametrize("normalize", [True, False])
def test_pointwise_probabilities_match_the_hand_computation(sharp_vlm, normalize):
    model, processor = sharp_vlm
    reward = YesTokenReward(model, processor, normalize=normalize, batch_size=2)
    x = rand_images(2, size=(36, 44))
    yes, no = hand_probs(model, processor, reward, x, PROMPTS)
    expected = yes / (yes + no) if normalize else yes
    torch.testing.assert_close(reward(x, PROMPTS), expected, atol=1e-5, rtol=1e-4)
    p_yes, p_no = reward.probabilities(x, PROMPTS)
    assert bool(((p_yes + p_no) <= 1).all()) and bool((p_yes > 0).all())
    assert "<image>" in reward.render("a red cat") and reward.render("a red cat").endswith("ASSISTANT:")


def test_pairwise_mode_uses_reference_then_candidate(sharp_vlm):
    model, processor = sharp_vlm
    reward = YesTokenReward(
        model, processor, mode="pairwise", criteria="Prefer red.", batch_size=1
    )  # chunks slice reference_images too
    x, ref = rand_images(2, seed=1), rand_images(2, seed=2)
    text = reward.render("a red cat")
    assert text.count("<image>") == 2 and "Prefer red." in text and '"a red cat"' in text
    yes, no = hand_probs(model, processor, reward, x, PROMPTS, refs=ref)
    torch.testing.assert_close(reward(x, PROMPTS, reference_images=ref), yes / (yes + no), atol=1e-5, rtol=1e-4)
    with pytest.raises(InvalidInputError, match="needs reference_images"):
        reward(x, PROMPTS)
    with pytest.raises(InvalidInputError, match="only used with mode='pairwise'"):
        YesTokenReward(model, processor)(x, PROMPTS, reference_images=ref)


def test_differentiable_path_matches_and_reaches_pixels(sharp_vlm):
    model, processor = sharp_vlm
    x = rand_images(2, size=(36, 44))
    plain = YesTokenReward(model, processor)
    diff = YesTokenReward(model, processor, differentiable=True)
    xg = x.clone().requires_grad_()
    out = diff(xg, PROMPTS)
    torch.testing.assert_close(out.detach(), plain(x, PROMPTS), atol=5e-4, rtol=0)
    out.sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(NotDifferentiableError, match="yes_token"):
        plain(x.clone().requires_grad_(), PROMPTS).sum().backward()


def test_loads_from_a_local_folder(vlm_pair, tmp_path):
    model, processor = vlm_pair
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    x = rand_images(2)
    loaded = YesTokenReward(str(tmp_path))
    assert loaded.yes_token_ids == YesTokenReward(model, processor).yes_token_ids
    torch.testing.assert_close(loaded(x, PROMPTS), YesTokenReward(model, processor)(x, PROMPTS))
