"""Data for pre-training: the user's own folder of images or tar shards, or the demo photographs.

`build_pretrain_dataset` is the one entry point training needs; the rest is exported for
visualisation and for tests.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from ummae.data.demo import DEMO_IMAGE_FILES, DemoImages, load_demo_images
from ummae.data.folder import IMAGE_EXTENSIONS, ImageFolderUnlabeled, find_images, load_rgb
from ummae.data.shards import TarShards, find_shards, is_shard_spec, write_shards
from ummae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_transform

__all__ = [
    "DEMO_IMAGE_FILES",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DemoImages",
    "ImageFolderUnlabeled",
    "TarShards",
    "build_pretrain_dataset",
    "eval_transform",
    "find_images",
    "find_shards",
    "is_shard_spec",
    "load_demo_images",
    "load_rgb",
    "pretrain_transform",
    "write_shards",
]


def build_pretrain_dataset(
    path: str | os.PathLike | None,
    img_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    demo_length: int = 512,
) -> Dataset:
    """The pre-training dataset: images under folder `path`, the images in the tar shards `path`
    names (`ummae.data.shards.is_shard_spec`: a brace pattern, a .tar file, a list file, or a
    directory of .tar files), or the demo photographs if `path` is None.

    Each sample is a random-resized crop, float tensor [3, img_size, img_size], ImageNet-normalised.
    `demo_length` (samples per epoch) only applies to the demo data; a folder has one sample per
    image file, shards one per image member. Either way the dataset is map-style with `load(i)`,
    so the seeded sampling (exact resume, world-size invariance) is the same for all of them.
    Raises UmmaeError if the folder or shards are missing or hold no images.
    """
    transform = pretrain_transform(img_size, scale=scale)
    if path is None:
        return DemoImages(transform, length=demo_length)
    if is_shard_spec(path):
        return TarShards(path, transform)
    return ImageFolderUnlabeled(path, transform)
