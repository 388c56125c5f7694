"""Aesthetic: MLP on the L2-normalised CLIP image embedding; loading .pth and .safetensors."""

import pytest
import torch
from safetensors.torch import save_file

from tests.rewards._util import rand_images
from visalign.errors import CheckpointError
from visalign.rewards import Aesthetic, AestheticMLP
from visalign.rewards.preprocess import ImageTransform
from visalign.testing.rewards import tiny_aesthetic


@pytest.fixture(scope="module")
def parts():
    return tiny_aesthetic(seed=0)


def test_released_layout_and_score_formula(parts):
    mlp, model, processor = parts
    assert [k for k in mlp.state_dict()] == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    x = rand_images(3)
    with torch.no_grad():
        e = model.get_image_features(
            pixel_values=ImageTransform.from_processor(processor.image_processor)(x)
        ).pooler_output
        e = e / e.norm(dim=-1, keepdim=True)
        w = [mlp.layers[i] for i in (0, 2, 4, 6, 7)]
        expected = e
        for layer in w:  # no activations in the released predictor
            expected = expected @ layer.weight.T + layer.bias
    reward = Aesthetic(mlp, model, processor)
    torch.testing.assert_close(reward(x, None), expected.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert reward(x, ["prompts", "are", "ignored"]).shape == (3,)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_predictor_loads_from_files_and_clip_from_a_folder(parts, tmp_path, suffix):
    mlp, model, processor = parts
    path = tmp_path / f"predictor{suffix}"
    if suffix == ".pth":
        torch.save(mlp.state_dict(), path)
    else:
        save_file(mlp.state_dict(), str(path))
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    x = rand_images(2)
    loaded = Aesthetic(str(path), str(tmp_path / "clip"))
    torch.testing.assert_close(loaded(x), Aesthetic(mlp, model, processor)(x))
    # a folder plus a file name also works (the hub form is repo id + predictor_filename)
    again = Aesthetic(str(tmp_path), str(tmp_path / "clip"), predictor_filename=path.name)
    torch.testing.assert_close(again(x), loaded(x))


def test_gradients_reach_pixels(parts):
    x = rand_images(2, requires_grad=True)
    Aesthetic(*parts)(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_bad_checkpoints_say_what_is_wrong(parts, tmp_path):
    _, model, processor = parts
    with pytest.raises(CheckpointError, match="not an aesthetic-predictor state dict"):
        Aesthetic({"foo": torch.zeros(1)}, model, processor)
    bad = AestheticMLP(16).state_dict()
    bad["layers.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="do not fit"):
        Aesthetic(bad, model, processor)
    with pytest.raises(CheckpointError, match="not a local file"):
        Aesthetic(str(tmp_path / "missing.pth"), model, processor)
