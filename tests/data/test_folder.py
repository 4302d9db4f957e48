"""Tests for ummae.data.folder: discovery, decoding of every PIL mode, and skipping bad files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ummae.data import build_pretrain_dataset
from ummae.data.folder import ImageFolderUnlabeled, find_images, load_rgb
from ummae.data.transforms import pretrain_transform
from ummae.errors import UmmaeError


def save_noise(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """Write a random RGB image (noise, so JPEG/PNG files are not trivially small)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- find_images


def test_find_images_recursive_sorted_and_filtered(tmp_path):
    expected = [
        save_noise(tmp_path / "a" / "b" / "deep.JPG"),
        save_noise(tmp_path / "a" / "mid.png"),
        save_noise(tmp_path / "c" / "pic.WebP"),
        save_noise(tmp_path / "top.Jpeg"),
    ]
    save_noise(tmp_path / ".hidden.png")
    save_noise(tmp_path / ".cache" / "inside_hidden_dir.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_dir").mkdir()

    assert find_images(tmp_path) == sorted(expected)
    assert find_images(str(tmp_path)) == find_images(tmp_path)  # str or Path


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_find_images_survives_a_symlink_loop(tmp_path):
    image = save_noise(tmp_path / "sub" / "x.png")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)
    assert find_images(tmp_path) == [image]


def test_find_images_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UmmaeError, match="does not exist") as info:
        find_images(missing)
    assert str(missing) in str(info.value)


def test_find_images_path_is_a_file(tmp_path):
    file = save_noise(tmp_path / "x.png")
    with pytest.raises(UmmaeError, match="not a directory") as info:
        find_images(file)
    assert str(file) in str(info.value)


def test_find_images_no_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UmmaeError, match="no images") as info:
        find_images(tmp_path)
    assert str(tmp_path) in str(info.value)


# ---------------------------------------------------------------- load_rgb: modes


def check_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB" and img.size == size
    return np.asarray(img)


def test_load_rgb_grayscale_and_bilevel(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "l.png")
    bilevel = Image.new("1", (5, 4), 0)
    bilevel.putpixel((0, 0), 1)
    bilevel.save(tmp_path / "one.png")

    assert (check_rgb(load_rgb(tmp_path / "l.png"), (5, 4)) == 77).all()
    one = check_rgb(load_rgb(tmp_path / "one.png"), (5, 4))
    assert (one[0, 0] == 255).all() and (one[1, 1] == 0).all()


def test_load_rgb_palette_with_and_without_transparency(tmp_path):
    palette_img = Image.new("P", (4, 4), 1)
    palette_img.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)  # index 0 black, 1 red-ish
    palette_img.putpixel((0, 0), 0)
    palette_img.save(tmp_path / "p.png")
    palette_img.save(tmp_path / "p_transparent.png", transparency=0)
    palette_img.save(tmp_path / "p_transparent.gif", transparency=0)

    plain = check_rgb(load_rgb(tmp_path / "p.png"), (4, 4))
    assert tuple(plain[0, 0]) == (0, 0, 0) and tuple(plain[2, 2]) == (200, 10, 30)
    for name in ("p_transparent.png", "p_transparent.gif"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "palette with transparency" warning either
            out = check_rgb(load_rgb(tmp_path / name), (4, 4))
        assert tuple(out[0, 0]) == (255, 255, 255)  # transparent -> white background
        assert tuple(out[2, 2]) == (200, 10, 30)


def test_load_rgb_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (3, 2), (40, 255))
    la.putpixel((0, 0), (40, 0))
    la.save(tmp_path / "la.png")

    out = check_rgb(load_rgb(tmp_path / "rgba.png"), (3, 2))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (10, 20, 30)
    assert 120 <= out[0, 1, 0] <= 135  # half-transparent black over white -> mid grey
    out = check_rgb(load_rgb(tmp_path / "la.png"), (3, 2))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (40, 40, 40)


def test_load_rgb_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (3, 3), (0, 0, 0, 0))  # no ink = white
    cmyk.putpixel((1, 1), (0, 255, 255, 0))  # magenta + yellow = red
    cmyk.save(tmp_path / "cmyk.tif")
    out = check_rgb(load_rgb(tmp_path / "cmyk.tif"), (3, 3))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (255, 0, 0)


def test_load_rgb_16_bit_maps_full_range_to_8_bit(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as reopened:
        assert reopened.mode == "I;16"
    out = check_rgb(load_rgb(tmp_path / "g16.png"), (4, 1))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_load_rgb_32_bit_int_and_float(tmp_path):
    Image.fromarray(np.array([[-5, 0, 65535, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    out = check_rgb(load_rgb(tmp_path / "i.tif"), (4, 1))
    assert out[0, :, 0].tolist() == [0, 0, 255, 255]  # clipped to the 16-bit range

    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "unit.tif")
    assert check_rgb(load_rgb(tmp_path / "unit.tif"), (3, 1))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32)).save(tmp_path / "big.tif")
    assert check_rgb(load_rgb(tmp_path / "big.tif"), (3, 1))[0, :, 0].tolist() == [0, 100, 255]


def test_load_rgb_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20), "red").save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


# ---------------------------------------------------------------- load_rgb: bad files


def write_bad_files(folder: Path) -> list[Path]:
    """Zero-byte, truncated PNG and JPEG, and a text file posing as a JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    bad = [empty]
    for suffix in (".png", ".jpg"):
        whole = save_noise(folder / f"whole{suffix}", size=(64, 64)).read_bytes()
        (folder / f"whole{suffix}").unlink()
        half = folder / f"truncated{suffix}"
        half.write_bytes(whole[: len(whole) // 2])
        bad.append(half)
    text = folder / "text.jpg"
    text.write_text("this is not an image\n")
    return bad + [text]


def test_load_rgb_rejects_bad_files_naming_them(tmp_path):
    for path in write_bad_files(tmp_path):
        with pytest.raises(UmmaeError) as info:
            load_rgb(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message


def test_load_rgb_large_images_do_not_warn_but_huge_ones_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (15, 10)).save(tmp_path / "large.png")  # 150 px: over the warning limit
    Image.new("RGB", (30, 10)).save(tmp_path / "huge.png")  # 300 px: over twice the limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_rgb(tmp_path / "large.png").size == (15, 10)
    with pytest.raises(UmmaeError, match="too large"):
        load_rgb(tmp_path / "huge.png")


# ---------------------------------------------------------------- ImageFolderUnlabeled


def test_dataset_returns_transformed_tensors(tmp_path):
    for i in range(3):
        save_noise(tmp_path / f"class{i}" / f"{i}.png", seed=i)
    dataset = ImageFolderUnlabeled(tmp_path, pretrain_transform(16))
    assert len(dataset) == 3
    sample = dataset[2]
    assert sample.shape == (3, 16, 16) and sample.dtype == torch.float32
    assert isinstance(ImageFolderUnlabeled(tmp_path)[0], Image.Image)  # no transform: PIL image
    with pytest.raises(IndexError):
        dataset[3]


def test_dataset_skips_bad_file_once_with_warning(tmp_path):
    save_noise(tmp_path / "a.png", seed=1)
    (tmp_path / "b.png").write_bytes(b"")
    save_noise(tmp_path / "c.png", seed=2)
    dataset = ImageFolderUnlabeled(tmp_path, pretrain_transform(16))

    with pytest.warns(UserWarning, match="b.png"):
        sample = dataset[1]
    assert sample.shape == (3, 16, 16)
    assert dataset.skipped == {tmp_path / "b.png"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no new warning
        assert dataset[1].shape == (3, 16, 16)


def test_dataset_wraps_around_to_find_a_readable_image(tmp_path):
    save_noise(tmp_path / "a.png")
    (tmp_path / "z.png").write_bytes(b"")
    dataset = ImageFolderUnlabeled(tmp_path)
    with pytest.warns(UserWarning):
        assert dataset[1].size == (48, 40)  # z.png is bad -> wraps to a.png


def test_dataset_all_bad_raises(tmp_path):
    write_bad_files(tmp_path)
    dataset = ImageFolderUnlabeled(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(UmmaeError, match="could be read"):
        dataset[0]


def test_build_pretrain_dataset_with_path(tmp_path):
    save_noise(tmp_path / "x.jpg")
    dataset = build_pretrain_dataset(str(tmp_path), img_size=16)
    assert isinstance(dataset, ImageFolderUnlabeled)
    assert dataset[0].shape == (3, 16, 16)
    with pytest.raises(UmmaeError, match="does not exist"):
        build_pretrain_dataset(str(tmp_path / "missing"), img_size=16)
