"""Tests for ummae.data.demo: the photographs bundled with scikit-image."""

from __future__ import annotations

import pytest
import torch

from ummae.data import build_pretrain_dataset
from ummae.data.demo import DEMO_IMAGE_FILES, DemoImages, demo_image_dir, load_demo_images
from ummae.data.transforms import pretrain_transform
from ummae.errors import UmmaeError


@pytest.fixture(scope="module")
def demo_dataset() -> DemoImages:
    return DemoImages(pretrain_transform(32), length=20)


def test_every_demo_file_is_inside_the_installed_package():
    folder = demo_image_dir()
    for name in DEMO_IMAGE_FILES:
        assert (folder / name).is_file(), name


def test_demo_images_load_as_reasonably_sized_rgb():
    images = load_demo_images()
    assert len(images) == len(DEMO_IMAGE_FILES)
    for name, img in zip(DEMO_IMAGE_FILES, images):
        assert img.mode == "RGB", name
        assert min(img.size) > 200, name


def test_dataset_length_and_sample_shape(demo_dataset):
    assert len(demo_dataset) == 20
    sample = demo_dataset[len(DEMO_IMAGE_FILES) + 3]  # indices wrap around the photos
    assert sample.shape == (3, 32, 32) and sample.dtype == torch.float32
    with pytest.raises(IndexError):
        demo_dataset[20]


def test_two_draws_of_the_same_index_are_different_crops(demo_dataset):
    torch.manual_seed(0)
    assert not torch.equal(demo_dataset[0], demo_dataset[0])


def test_invalid_length_is_rejected():
    with pytest.raises(UmmaeError, match="length"):
        DemoImages(length=0)


def test_build_pretrain_dataset_without_path_gives_demo_data():
    dataset = build_pretrain_dataset(None, img_size=16, demo_length=7)
    assert isinstance(dataset, DemoImages)
    assert len(dataset) == 7 and dataset[0].shape == (3, 16, 16)


def test_missing_demo_files_raise_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("ummae.data.demo.demo_image_dir", lambda: tmp_path)
    with pytest.raises(UmmaeError, match="astronaut.png"):
        load_demo_images()
