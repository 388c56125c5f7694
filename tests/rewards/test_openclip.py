"""HPSv2 (open_clip). Runs where open_clip imports (``make test-openclip``); skipped elsewhere.

open_clip needs torchvision, and the registry's torchvision breaks next to the CPU torch of the
default environment, so these tests live in their own venv (see the Makefile).
"""

import json

import pytest
import torch

from tests.rewards._util import rand_images
from visalign.errors import CheckpointError, MissingDependencyError


def _open_clip_available() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:  # ImportError, or torchvision's operator errors from a mismatched build
        return False
    return True


HAVE_OPEN_CLIP = _open_clip_available()
needs_open_clip = pytest.mark.skipif(
    not HAVE_OPEN_CLIP,
    reason="open_clip is not importable here (the 'openclip' extra needs its own environment "
    "with a matching torchvision; run `make test-openclip`)",
)

PROMPTS = ["a red cat", "a photo of a blue square"]


@pytest.mark.skipif(HAVE_OPEN_CLIP, reason="open_clip is installed here")
def test_missing_open_clip_names_the_extra():
    from visalign.rewards import HPSv2
    from visalign.testing.rewards import tiny_open_clip

    with pytest.raises(MissingDependencyError, match=r'pip install "visalign\[openclip\]"'):
        HPSv2()
    with pytest.raises(MissingDependencyError, match="openclip"):
        tiny_open_clip()


@pytest.fixture(scope="module")
def tiny():
    from visalign.testing.rewards import tiny_open_clip

    return tiny_open_clip(seed=0)


@needs_open_clip
def test_hps_score_is_the_cosine_of_normalised_features(tiny):
    from visalign.rewards import HPSv2
    from visalign.rewards.preprocess import ImageTransform

    model, tokenizer = tiny
    x = rand_images(2, size=(30, 45))
    with torch.no_grad():
        img = model.encode_image(ImageTransform.hps(32)(x), normalize=True)
        txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
    reward = HPSv2(model=model, tokenizer=tokenizer)
    torch.testing.assert_close(reward(x, PROMPTS), (img * txt).sum(-1), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in reward.parameters())


@needs_open_clip
def test_gradients_reach_pixels(tiny):
    from visalign.rewards import HPSv2

    x = rand_images(2, requires_grad=True)
    HPSv2(model=tiny[0], tokenizer=tiny[1])(x, PROMPTS).sum().backward()
    assert x.grad.abs().sum() > 0


@needs_open_clip
def test_checkpoint_round_trip_by_module_and_by_architecture_name(tiny, tmp_path):
    import open_clip

    from visalign.rewards import HPSv2
    from visalign.testing.rewards import tiny_open_clip

    model, tokenizer = tiny
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the released file's layout
    x = rand_images(2)
    want = HPSv2(model=model, tokenizer=tokenizer)(x, PROMPTS)
    fresh, _ = tiny_open_clip(seed=1)  # different random weights, replaced by the checkpoint
    torch.testing.assert_close(HPSv2(str(path), model=fresh, tokenizer=tokenizer)(x, PROMPTS), want)
    # an architecture name: built by open_clip with random weights, then the checkpoint loaded;
    # a folder plus version picks the version's file name, as the hub repo does
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
    }
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "visalign-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    by_name = HPSv2(str(tmp_path), version="v2.1", model="visalign-tiny-clip")
    torch.testing.assert_close(by_name(x, PROMPTS), want)
    with pytest.raises(CheckpointError, match="has no file 'HPS_v2_compressed.pt'"):
        HPSv2(str(tmp_path), version="v2.0", model="visalign-tiny-clip")
