"""Decode "gpu" without a GPU: the workers' bytes and boxes, decoded in the training process by the
CPU decoder, give the crops the CPU paths give under the same seed; EXIF orientation, non-JPEG,
grey and CMYK files and damaged data are handled; a tiny run trains and counts the fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import TINY_SETS, run_cli_captured
from ummae.data import (CropDecoder, EncodedBatch, EncodedCrop, ImageFolderUnlabeled, TarShards, collate_encoded,
                        decode_batch, to_device_batch, write_shards)
from ummae.data.crop import draw_crop_box
from ummae.data.sampling import SeededSamples, seeded_draws
from ummae.errors import UmmaeError

SIZE = 32


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour picture (blurred noise), as a photo is: crops of it differ from each other."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def jpeg_file(path: Path, image: Image.Image, orientation: int = 1, **save) -> Path:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, exif=exif, **save)
    return path


def decode_one(sample: dict, size: int = SIZE) -> torch.Tensor:
    images, failed = decode_batch(collate_encoded([{"image": sample, "index": 0, "skipped": ""}])["image"],
                                  size, "cpu")
    assert failed == []
    return images[0]


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


def test_the_worker_draws_the_box_and_flip_of_the_fast_path(tmp_path):
    path = jpeg_file(tmp_path / "a.jpg", photo(160, 120))
    encoded, flips = [], set()
    for seed in range(12):
        with seeded_draws(seed):
            sample = EncodedCrop(SIZE)(path)
        with seeded_draws(seed):  # what CropDecoder draws: the box, then the flip
            box, flip = draw_crop_box((160, 120), (0.2, 1.0)), bool(torch.rand(1) < 0.5)
        assert sample["box"] == box and sample["flip"] == flip and sample["orientation"] == 1
        assert bytes(sample["jpeg"].numpy()) == path.read_bytes()
        encoded.append(box)
        flips.add(flip)
    assert len(set(encoded)) == 12 and flips == {True, False}  # the draws do vary


@pytest.mark.parametrize("width,height,size", [(160, 120, 32), (640, 480, 32), (600, 400, 128)])
def test_crops_equal_the_cpu_paths_crops_under_the_same_seed(tmp_path, width, height, size):
    # plain decodes in full and resizes with Pillow: the GPU path differs only by the resize
    # (torch's float antialiased bicubic); fast also decodes at 1/2-1/8 scale when the crop allows.
    path = jpeg_file(tmp_path / "a.jpg", photo(width, height))
    for seed in range(6):
        crops = {}
        for mode in ("plain", "fast"):
            with seeded_draws(seed):
                crops[mode] = CropDecoder(size, decode=mode)(path)
        with seeded_draws(seed):
            gpu = decode_one(EncodedCrop(size)(path), size)
        assert gpu.shape == crops["plain"].shape == (3, size, size) and gpu.dtype == torch.uint8
        assert mean_difference(gpu, crops["plain"]) < 0.5, seed
        assert (gpu.int() - crops["plain"].int()).abs().max() <= 12, seed
        # against fast, the GPU path differs as plain does (fast's reduced-scale decode is its own)
        assert abs(mean_difference(gpu, crops["fast"]) - mean_difference(crops["plain"], crops["fast"])) < 0.5
    with seeded_draws(0):
        other = decode_one(EncodedCrop(size)(path), size)
    with seeded_draws(1):
        assert mean_difference(other, decode_one(EncodedCrop(size)(path), size)) > 5  # not one crop for all


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, orientation):
    path = jpeg_file(tmp_path / "turned.jpg", photo(150, 90), orientation)
    with seeded_draws(4):
        reference = CropDecoder(SIZE, decode="plain")(path)  # load_rgb: Pillow's exif_transpose
    with seeded_draws(4):
        sample = EncodedCrop(SIZE)(path)
    assert sample["orientation"] == orientation
    upright = (90, 150) if orientation >= 5 else (150, 90)
    top, left, h, w = sample["box"]
    assert top + h <= upright[1] and left + w <= upright[0]
    assert mean_difference(decode_one(sample), reference) < 0.5


@pytest.mark.parametrize("kind", ["png", "grey", "cmyk"])
def test_png_grey_and_cmyk_are_decoded_by_the_worker_as_the_fast_path_does(tmp_path, kind):
    image = photo(96, 72)
    path = tmp_path / f"a.{'png' if kind == 'png' else 'jpg'}"
    {"png": lambda: image.save(path), "grey": lambda: image.convert("L").save(path, quality=90),
     "cmyk": lambda: image.convert("CMYK").save(path, quality=90)}[kind]()
    with seeded_draws(2):
        sample = EncodedCrop(SIZE)(path)
    with seeded_draws(2):
        fast = CropDecoder(SIZE)(path)
    assert set(sample) == {"pixels"} and torch.equal(sample["pixels"], fast)


def test_a_mixed_batch_keeps_every_sample_in_its_place_and_counts_the_fallbacks(tmp_path):
    jpeg_file(tmp_path / "0.jpg", photo(120, 90, seed=0))
    photo(120, 90, seed=1).save(tmp_path / "1.png")
    jpeg_file(tmp_path / "2.jpg", photo(90, 120, seed=2), orientation=6)
    photo(120, 90, seed=3).convert("L").save(tmp_path / "3.jpg")
    encoded = SeededSamples(ImageFolderUnlabeled(tmp_path, loader=EncodedCrop(SIZE)), seed=5)
    plain = SeededSamples(ImageFolderUnlabeled(tmp_path, loader=CropDecoder(SIZE, decode="plain")), seed=5)
    fast = SeededSamples(ImageFolderUnlabeled(tmp_path, loader=CropDecoder(SIZE)), seed=5)
    batch = collate_encoded([encoded[(1, i)] for i in range(4)])
    assert isinstance(batch["image"], EncodedBatch) and batch["image"].cpu_decoded == 2
    assert batch["index"].tolist() == [0, 1, 2, 3]
    images, failed = to_device_batch(batch["image"], SIZE, "cpu")
    assert failed == [] and images.shape == (4, 3, SIZE, SIZE)
    for i in (0, 2):  # decoded in the training process
        assert mean_difference(images[i], plain[(1, i)]["image"]) < 0.5, i
    for i in (1, 3):  # the PNG and the grey JPEG: decoded by the worker, as the fast path does
        assert torch.equal(images[i], fast[(1, i)]["image"]), i
    pinned_like = batch["image"].pin_memory() if torch.cuda.is_available() else batch["image"]
    assert torch.equal(to_device_batch(pinned_like, SIZE, "cpu")[0], images)


def test_damaged_data_falls_back_to_pillow_then_is_reported(tmp_path):
    good = jpeg_file(tmp_path / "good.jpg", photo(120, 90))
    data = good.read_bytes()
    # junk after the header: torchvision's decoder rejects it, Pillow decodes what it can
    (tmp_path / "junk.jpg").write_bytes(data[:700] + bytes(range(256)) * ((len(data) - 700) // 256))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # neither decoder reads it
    samples = []
    for name in ("good", "junk", "cut"):
        with seeded_draws(0):
            samples.append({"image": EncodedCrop(SIZE)(tmp_path / f"{name}.jpg"), "index": 0, "skipped": ""})
    assert all("jpeg" in s["image"] for s in samples)  # their headers read fine
    images, failed = decode_batch(collate_encoded(samples)["image"], SIZE, "cpu")
    assert failed == [2]
    assert torch.equal(images[2], images[0])  # filled with another image: the batch keeps its shape
    assert mean_difference(images[1], images[0]) > 1  # the junk was decoded (to other pixels), not skipped
    with pytest.raises(UmmaeError, match="none of the 1 images"):
        decode_batch(collate_encoded(samples[2:])["image"], SIZE, "cpu")


def test_an_unreadable_header_is_skipped_by_the_dataset(tmp_path):
    jpeg_file(tmp_path / "a.jpg", photo(100, 80))
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg at all")
    dataset = ImageFolderUnlabeled(tmp_path, loader=EncodedCrop(SIZE))
    with pytest.warns(UserWarning, match="skipping unreadable image.*b.jpg"):
        sample, passed_over = dataset.load(1)
    assert passed_over == [tmp_path / "b.jpg"] and "jpeg" in sample


def test_shard_members_give_the_folders_samples(tmp_path):
    pytest.importorskip("webdataset")
    folder = tmp_path / "folder"
    folder.mkdir()
    for k in range(5):
        jpeg_file(folder / f"{k}.jpg", photo(100 + 10 * k, 80, seed=k))
    write_shards(folder, tmp_path / "shards", shard_size=2, progress=False)
    a = SeededSamples(ImageFolderUnlabeled(folder, loader=EncodedCrop(SIZE)), seed=1)
    b = SeededSamples(TarShards(tmp_path / "shards", loader=EncodedCrop(SIZE)), seed=1)
    for i in range(5):
        x, y = a[(0, i)]["image"], b[(0, i)]["image"]
        assert x["box"] == y["box"] and x["flip"] == y["flip"] and torch.equal(x["jpeg"], y["jpeg"])


def test_a_tiny_run_with_decode_gpu_trains_close_to_plain_and_counts_the_fallbacks(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for k in range(6):
        jpeg_file(data / f"{k}.jpg", photo(128, 96, seed=k))
    photo(128, 96, seed=9).save(data / "6.png")
    photo(128, 96, seed=10).convert("L").save(data / "7.jpg")
    losses = {}
    for mode in ("plain", "gpu"):
        out = tmp_path / mode
        args = ["pretrain", "--no-progress", "--out", str(out), "--data", str(data), "--batch-size", "4",
                "--max-steps", "4", "--device", "cpu", *[a for s in TINY_SETS for a in ("--set", s)],
                "--set", f"data.decode={mode}"]
        result = run_cli_captured(args, out)
        assert result.code == 0, result.err
        losses[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        if mode == "gpu":
            # 4 steps x batch 4 = 2 epochs of the 8 images: the PNG and the grey JPEG twice each
            assert "decode=gpu       4 image(s) decoded by the workers" in result.out
            assert (out / "reconstructions.png").is_file()
    assert len(losses["gpu"]) == 4
    assert np.allclose(losses["gpu"], losses["plain"], rtol=0.02), losses  # the same samples, a few grey levels apart


def test_bad_decode_mode_is_a_one_line_config_error(tmp_path):
    result = run_cli_captured(["pretrain", "--out", str(tmp_path / "x"), "--set", "data.decode=nvjpeg"], tmp_path)
    assert result.code != 0 and "data.decode must be 'fast', 'plain' or 'gpu'" in result.err
    assert "Traceback" not in result.err


def test_a_batch_with_nothing_left_to_decode_on_the_device(tmp_path):
    for k in range(2):
        photo(80, 60, seed=k).save(tmp_path / f"{k}.png")
    samples = SeededSamples(ImageFolderUnlabeled(tmp_path, loader=EncodedCrop(SIZE)), seed=0)
    batch = collate_encoded([samples[(0, i)] for i in range(2)])["image"]
    assert batch.cpu_decoded == 2 and batch.data.numel() == 0
    images, failed = decode_batch(batch, SIZE, "cpu")
    assert failed == [] and torch.equal(images, batch.pixels)


def test_a_multi_picture_jpeg_from_a_camera_goes_to_the_device_decoder(tmp_path):
    path = tmp_path / "camera.jpg"
    photo(160, 120).save(path, "MPO", save_all=True, append_images=[photo(160, 120, seed=1)], quality=90)
    with Image.open(path) as opened:
        assert opened.format == "MPO"
    with seeded_draws(3):
        reference = CropDecoder(SIZE, decode="plain")(path)
    with seeded_draws(3):
        sample = EncodedCrop(SIZE)(path)
    assert "jpeg" in sample and mean_difference(decode_one(sample), reference) < 0.5
