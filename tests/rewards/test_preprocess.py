"""Torch preprocessing matches the PIL/image-processor path and lets gradients through."""

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.errors import ConfigError
from visalign.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    center_crop,
    resize_longest_and_pad,
    resize_shortest_side,
)
from visalign.testing.rewards import _image_processor


def smooth_uint8(h, w, seed=0):
    """A smooth random RGB image (uint8, H x W x 3), like a generated picture rather than noise."""
    rng = np.random.RandomState(seed)
    small = (rng.rand(6, 8, 3) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def to_tensor(arr):
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("h, w", [(70, 50), (50, 90), (20, 24)])  # shrink tall/wide, and enlarge
def test_clip_transform_matches_the_image_processor(h, w):
    arr = smooth_uint8(h, w)
    processor = _image_processor(32)
    ref = processor(images=[arr], return_tensors="pt")["pixel_values"]
    ours = ImageTransform.from_processor(processor)(to_tensor(arr))
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    diff = (ours - ref).abs()
    # PIL rounds to uint8 after resizing: ~0.5/255 per pixel, i.e. ~0.01 after normalising
    assert diff.mean() < 0.01 and diff.max() < 0.05


def test_resize_shortest_side_and_crop_geometry():
    x = torch.rand(2, 3, 60, 100)
    y = resize_shortest_side(x, 30)
    assert y.shape[-2:] == (30, 50)  # long side int(30 * 100 / 60)
    z = center_crop(torch.arange(7 * 9.0).view(1, 1, 7, 9), (3, 4))
    assert z[0, 0, 0, 0] == 2 * 9 + 2  # top-left at ((7-3)//2, (9-4)//2)


def test_hps_resize_longest_and_pad_matches_a_pil_reference():
    arr = smooth_uint8(30, 45)
    ours = resize_longest_and_pad(to_tensor(arr), 24)
    # PIL reference: longest side to 24 (rounded), pasted centred on black, extra pixel bottom/right
    nh, nw = round(30 * 24 / 45), round(45 * 24 / 45)
    canvas = np.zeros((24, 24, 3), np.uint8)
    top = (24 - nh) // 2
    canvas[top : top + nh, :nw] = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BICUBIC))
    ref = to_tensor(canvas)
    assert ours.shape == (1, 3, 24, 24)
    assert (ours - ref).abs().max() < 4 / 255
    assert ours[..., :top, :].abs().max() == 0 and ours[..., top + nh :, :].abs().max() == 0


def test_normalisation_constants_and_gradient_flow():
    x = torch.rand(2, 3, 40, 40, requires_grad=True)  # square: the crop keeps every pixel
    t = ImageTransform.clip(32)
    y = t(x)
    assert y.shape == (2, 3, 32, 32)
    y.pow(2).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and float((x.grad != 0).float().mean()) > 0.99
    flat = torch.ones(1, 3, 32, 32) * torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert t(flat).abs().max() < 1e-6  # the mean maps to 0
    assert torch.allclose(t(flat + torch.tensor(CLIP_STD).view(1, 3, 1, 1)), torch.ones(1, 3, 32, 32), atol=1e-5)


def test_hps_transform_passes_gradients_and_unsupported_processors_are_refused():
    x = torch.rand(1, 3, 30, 45, requires_grad=True)
    ImageTransform.hps(24)(x).sum().backward()
    assert (x.grad != 0).all()
    with pytest.raises(ConfigError, match="does not map to a plain resize"):
        ImageTransform.from_processor({"size": {"shortest_edge": 56, "longest_edge": 1000}})
