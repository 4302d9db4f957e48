"""Data for pre-training: the user's own folder of images or tar shards, or the demo photographs.

`build_pretrain_dataset` is the one entry point training needs; the rest is exported for
visualisation and for tests.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from ummae.data.crop import DECODE_MODES, CropDecoder
from ummae.data.demo import DEMO_IMAGE_FILES, DemoImages, load_demo_images
from ummae.data.folder import IMAGE_EXTENSIONS, ImageFolderUnlabeled, find_images, load_rgb
from ummae.data.gpu_decode import EncodedBatch, EncodedCrop, collate_encoded, decode_batch, to_device_batch
from ummae.data.shards import TarShards, find_shards, is_shard_spec, write_shards
from ummae.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_crop,
                                   pretrain_transform, to_model_input)

__all__ = [
    "DECODE_MODES",
    "DEMO_IMAGE_FILES",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropDecoder",
    "DemoImages",
    "EncodedBatch",
    "EncodedCrop",
    "ImageFolderUnlabeled",
    "TarShards",
    "build_pretrain_dataset",
    "collate_encoded",
    "decode_batch",
    "eval_transform",
    "find_images",
    "find_shards",
    "is_shard_spec",
    "load_demo_images",
    "load_rgb",
    "pretrain_crop",
    "pretrain_transform",
    "to_device_batch",
    "to_model_input",
    "write_shards",
]


def build_pretrain_dataset(
    path: str | os.PathLike | None,
    img_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    demo_length: int = 512,
    decode: str = "fast",
) -> Dataset:
    """The pre-training dataset: images under folder `path`, the images in the tar shards `path`
    names (`ummae.data.shards.is_shard_spec`: a brace pattern, a .tar file, a list file, or a
    directory of .tar files), or the demo photographs if `path` is None.

    Each sample is a random-resized crop (flipped left-right half of the time), uint8 tensor
    [3, img_size, img_size], not yet normalised: `to_model_input` normalises the batch on the
    device. `decode` ("fast" or "plain", see `ummae.data.crop`) says how JPEGs (files or shard
    members) are decoded: "fast" decodes a big photo at reduced scale when the crop allows it.
    With "gpu" (`ummae.data.gpu_decode`) a sample is the file's bytes and its crop box instead,
    batched by `collate_encoded` and decoded on the device by `to_device_batch`; the demo
    photographs, already in memory, are cropped as in the other modes.
    `demo_length` (samples per epoch) only applies to the demo data; a folder has one sample per
    image file, shards one per image member. Either way the dataset is map-style with `load(i)`,
    so the seeded sampling (exact resume, world-size invariance) is the same for all of them.
    Raises UmmaeError if the folder or shards are missing or hold no images.
    """
    if path is None:
        return DemoImages(pretrain_crop(img_size, scale=scale), length=demo_length)
    loader = EncodedCrop(img_size, scale=scale) if decode == "gpu" else CropDecoder(img_size, scale=scale,
                                                                                    decode=decode)
    if is_shard_spec(path):
        return TarShards(path, loader=loader)
    return ImageFolderUnlabeled(path, loader=loader)
