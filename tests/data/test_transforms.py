"""Tests for ummae.data.transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ummae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_transform


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_imagenet_constants_are_rgb_tuples():
    assert isinstance(IMAGENET_MEAN, tuple) and len(IMAGENET_MEAN) == 3
    assert isinstance(IMAGENET_STD, tuple) and len(IMAGENET_STD) == 3


@pytest.mark.parametrize("make", [pretrain_transform, eval_transform])
def test_output_shape_and_dtype(make):
    out = make(32)(noise_image(70, 45))
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("make", [pretrain_transform, eval_transform])
def test_constant_colour_is_normalised_with_imagenet_stats(make):
    rgb = (255, 0, 128)
    out = make(24)(Image.new("RGB", (50, 40), rgb))
    expected = [(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)]
    for channel, value in enumerate(expected):
        assert torch.allclose(out[channel], torch.full((24, 24), value), atol=1e-5)


def test_pretrain_transform_is_deterministic_under_seed():
    transform, img = pretrain_transform(32), noise_image(64, 64)
    torch.manual_seed(123)
    first = transform(img)
    torch.manual_seed(123)
    second = transform(img)
    torch.manual_seed(456)
    other = transform(img)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_eval_transform_is_deterministic_centre_crop():
    img = noise_image(80, 40)
    transform = eval_transform(40)
    assert torch.equal(transform(img), transform(img))
    # Shorter side already 40: the result is the unresized centre 40x40 block.
    centre = img.crop((20, 0, 60, 40))
    expected = (torch.from_numpy(np.array(centre)).permute(2, 0, 1).float() / 255
                - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(transform(img), expected, atol=1e-5)
