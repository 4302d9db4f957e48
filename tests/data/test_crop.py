"""Tests for ummae.data.crop: the fast (reduced-scale JPEG) crop path against the reference path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from ummae.data import build_pretrain_dataset, to_model_input
from ummae.data.crop import CropDecoder
from ummae.data.demo import load_demo_images
from ummae.data.folder import load_rgb
from ummae.data.sampling import SeededSamples
from ummae.data.transforms import CROP_RATIO, pretrain_crop, pretrain_transform
from ummae.errors import UmmaeError

OUT = 32  # crop size: small, so 8x DCT scaling is common on the test images


def coordinate_jpeg(path, width: int = 512, height: int = 384) -> None:
    """A JPEG whose pixels say where they are: red = x, green = y (each 0..255 over the image)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def measured_box(crop: torch.Tensor, width: int, height: int) -> tuple[float, float, float, float, bool]:
    """(centre x, centre y, box width, box height, flipped) of a crop of a `coordinate_jpeg`, read
    from its pixels. The mean red of the first two columns is the x of output column 1.0's
    centre, i.e. left + w / n; that of the last two, left + (n - 1) w / n (rows alike)."""
    n = crop.shape[-1]
    red = crop[0].double() * (width - 1) / 255 + 0.5  # pixel value -> continuous x
    green = crop[1].double() * (height - 1) / 255 + 0.5
    first_x, last_x = red[:, :2].mean().item(), red[:, -2:].mean().item()
    first_y, last_y = green[:2].mean().item(), green[-2:].mean().item()
    flipped = last_x < first_x
    if flipped:
        first_x, last_x = last_x, first_x
    w, h = (last_x - first_x) * n / (n - 2), (last_y - first_y) * n / (n - 2)
    return (first_x + last_x) / 2, (first_y + last_y) / 2, w, h, flipped


def reference_boxes(n: int, width: int, height: int, scale=(0.2, 1.0), ratio=CROP_RATIO, seed=1):
    """(centre x, centre y, width, height) of n boxes from torchvision's own sampler."""
    torch.manual_seed(seed)
    img = torch.empty(1, 1, 1).expand(1, height, width)
    boxes = [T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    return np.array([(j + w / 2, i + h / 2, w, h) for i, j, h, w in boxes], dtype=float)


@pytest.fixture(scope="module")
def coords(tmp_path_factory):
    path = tmp_path_factory.mktemp("crop") / "coords.jpg"
    coordinate_jpeg(path)
    return path


@pytest.fixture(scope="module")
def fast_boxes(coords):
    """Boxes measured from 200 crops the fast path made (seeds 1000.., independent of the reference)."""
    decoder = CropDecoder(OUT, decode="fast")
    rows = []
    for k in range(200):
        torch.manual_seed(1000 + k)
        rows.append(measured_box(decoder(coords), 512, 384))
    return np.array(rows, dtype=float)


def _ks_pvalues(measured: np.ndarray, reference: np.ndarray) -> list[float]:
    """Two-sample KS p-value per statistic: centre x, centre y, width, height, aspect ratio."""
    pairs = [(measured[:, c], reference[:, c]) for c in range(4)]
    pairs.append((measured[:, 2] / measured[:, 3], reference[:, 2] / reference[:, 3]))
    return [stats.ks_2samp(a, b).pvalue for a, b in pairs]


def test_fast_crops_have_the_reference_box_distribution(fast_boxes):
    reference = reference_boxes(2000, 512, 384)
    pvalues = _ks_pvalues(fast_boxes, reference)
    assert min(pvalues) > 1e-3, pvalues  # fixed seeds: deterministic, not flaky
    flips = fast_boxes[:, 4].mean()
    assert 0.4 < flips < 0.6  # about half flipped, as RandomHorizontalFlip(0.5)


@pytest.mark.parametrize("wrong", [dict(scale=(0.5, 1.0)), dict(ratio=(1.0, 1.0)), dict(scale=(0.2, 0.6))])
def test_negative_control_the_box_test_sees_a_different_distribution(fast_boxes, wrong):
    """The same test rejects a sampler with another scale or ratio range: it has the power to fail."""
    reference = reference_boxes(2000, 512, 384, **wrong)
    assert min(_ks_pvalues(fast_boxes, reference)) < 1e-6


def test_the_box_reading_is_accurate(coords):
    """`measured_box` finds a known box to within a few pixels (else the tests above mean little)."""
    img = Image.open(coords).convert("RGB")
    crop = torch.from_numpy(np.array(img.crop((100, 50, 500, 350)).resize((OUT, OUT), Image.BICUBIC)))
    cx, cy, w, h, flipped = measured_box(crop.permute(2, 0, 1), 512, 384)
    assert not flipped
    assert abs(cx - 300) < 4 and abs(cy - 200) < 4 and abs(w - 400) < 8 and abs(h - 300) < 8


def photo_jpeg(path, width: int, height: int, quality: int = 92) -> None:
    photo = load_demo_images()[0]  # astronaut, 512x512
    photo.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=quality)


@pytest.mark.parametrize("exif_orientation", [None, 6])
def test_same_seed_gives_the_same_box_and_a_close_image(tmp_path, exif_orientation):
    """Same seed: both paths draw the same box and flip; the fast image (decoded at 1/2..1/8
    scale) differs from the full-size decode only by resampling detail."""
    path = tmp_path / "photo.jpg"
    photo_jpeg(path, 1024, 768)
    if exif_orientation:  # stored sideways, shown upright: boxes are in the upright image
        img = Image.open(path)
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.rotate(90, expand=True).save(path, quality=92, exif=exif)
    fast, plain = CropDecoder(64, decode="fast"), CropDecoder(64, decode="plain")
    diffs = []
    for seed in range(6):
        torch.manual_seed(seed)
        a = fast(path)
        torch.manual_seed(seed)
        b = plain(path)
        assert a.shape == b.shape == (3, 64, 64) and a.dtype == b.dtype == torch.uint8
        diffs.append((a.float() - b.float()).abs().mean().item())
    # Of 255. At 64 px, crops of >= 512 px are decoded at 1/8 scale, whose 8x8 block means are
    # a coarser filter than the reference's antialiased resize (at 256 px: ~1.5 on average).
    assert max(diffs) < 10.0, diffs
    # negative control: another seed (another box and flip) is far from the reference
    others = []
    for seed in range(6):
        torch.manual_seed(seed)
        a = fast(path)
        torch.manual_seed(seed + 100)
        others.append((a.float() - plain(path).float()).abs().mean().item())
    assert min(others) > 2 * max(diffs), (others, diffs)


@pytest.mark.parametrize("progressive", [False, True])
def test_fast_path_decodes_at_reduced_scale(tmp_path, monkeypatch, progressive):
    """The point of it: a big JPEG with a small crop is decoded smaller than full size."""
    path = tmp_path / "big.jpg"
    load_demo_images()[0].resize((2048, 1536)).save(path, quality=90, progressive=progressive)
    sizes = []

    def recording_load_rgb(*args, **kwargs):
        img = load_rgb(*args, **kwargs)
        sizes.append(img.size)
        return img

    monkeypatch.setattr("ummae.data.crop.load_rgb", recording_load_rgb)
    for decode in ("fast", "plain"):
        torch.manual_seed(0)
        CropDecoder(32, decode=decode)(path)
    assert sizes == [(256, 192), (2048, 1536)]  # 32 px crops allow 1/8 scale; plain: full size


@pytest.mark.parametrize("decode", ["fast", "plain"])
def test_seeded_samples_are_deterministic_in_both_modes(tmp_path, decode):
    for k in range(3):
        photo_jpeg(tmp_path / f"{k}.jpg", 480 + 40 * k, 360)
    dataset = build_pretrain_dataset(str(tmp_path), img_size=32, decode=decode)
    samples = SeededSamples(dataset, seed=5)
    first = [samples[(e, i)]["image"] for e in range(2) for i in range(3)]
    again = [samples[(e, i)]["image"] for e in range(2) for i in range(3)]
    other = SeededSamples(dataset, seed=6)[(0, 0)]["image"]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[3])  # another epoch, another crop
    assert not torch.equal(first[0], other)  # another seed, another crop


def other_format_files(root) -> list:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)  # too small to decode reduced
    Image.fromarray(noise).save(root / "rgb.png")
    Image.fromarray(noise).save(root / "rgb.webp")
    Image.fromarray(rng.integers(0, 65536, (45, 60), dtype=np.uint16)).save(root / "g16.png")
    Image.fromarray(np.concatenate([noise, noise[..., :1]], -1), "CMYK").save(root / "cmyk.jpg")
    Image.fromarray(noise).quantize(16).save(root / "palette.png", transparency=0)
    Image.fromarray(noise[..., 0]).save(root / "grey.jpg")
    return sorted(root.iterdir())


@pytest.mark.parametrize("decode", ["fast", "plain"])
def test_other_formats_and_modes_load(tmp_path, decode):
    """PNG, WebP, 16-bit, CMYK and greyscale JPEG, palette: small images, never reduced, so both
    modes give the reference crop of the full decode (fast: resized by torch, not Pillow)."""
    for path in other_format_files(tmp_path):
        torch.manual_seed(0)
        out = CropDecoder(32, decode=decode)(path)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8, path.name
        torch.manual_seed(0)
        diff = (out.float() - pretrain_crop(32)(load_rgb(path)).float()).abs()
        assert diff.mean() < 0.5 and diff.max() <= 3, (path.name, diff.mean(), diff.max())
        if decode == "plain":
            assert diff.max() == 0


def test_unreadable_files_raise_ummae_error_in_both_modes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    whole = tmp_path / "whole.jpg"
    photo_jpeg(whole, 600, 400)
    (tmp_path / "truncated.jpg").write_bytes(whole.read_bytes()[:2000])
    for decode in ("fast", "plain"):
        for name in ("empty.jpg", "truncated.jpg"):
            with pytest.raises(UmmaeError, match=name):
                CropDecoder(32, decode=decode)(tmp_path / name)


def test_invalid_decode_mode_is_rejected():
    with pytest.raises(ValueError, match="decode"):
        CropDecoder(32, decode="gpu")


def test_uint8_crop_normalised_on_device_equals_the_float_transform():
    img = load_demo_images()[1]
    torch.manual_seed(7)
    reference = pretrain_transform(48)(img)
    torch.manual_seed(7)
    crop = pretrain_crop(48)(img)
    assert crop.dtype == torch.uint8
    out = to_model_input(crop[None], "cpu")
    assert out.dtype == torch.float32 and out.shape == (1, 3, 48, 48)
    assert torch.allclose(out[0], reference, atol=1e-5)
    already = torch.randn(2, 3, 8, 8)
    assert torch.equal(to_model_input(already, "cpu"), already)  # float: taken as normalised


def test_config_decode_option_is_validated():
    from ummae.resolve import resolve_config
    from ummae.errors import ConfigError

    assert resolve_config("demo").data.decode == "fast"  # the default
    assert resolve_config("demo", sets=["data.decode=plain"]).data.decode == "plain"
    assert resolve_config("demo", sets=["data.decode=gpu"]).data.decode == "gpu"
    with pytest.raises(ConfigError, match="data.decode"):
        resolve_config("demo", sets=["data.decode=nvjpeg"])


@pytest.mark.parametrize("decode", ["fast", "plain"])
def test_batches_reach_the_model_normalised(tmp_path, decode):
    """Folder -> SeededSamples -> DataLoader -> to_model_input: uint8 batches become the float,
    ImageNet-normalised images the model was always given (values of a 0..255 image)."""
    for k in range(4):
        photo_jpeg(tmp_path / f"{k}.jpg", 300 + 20 * k, 200)
    samples = SeededSamples(build_pretrain_dataset(str(tmp_path), img_size=32, decode=decode), seed=0)
    loader = torch.utils.data.DataLoader(samples, batch_size=4, sampler=[(0, i) for i in range(4)])
    batch = next(iter(loader))["image"]
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 32, 32)
    imgs = to_model_input(batch, "cpu")
    assert imgs.dtype == torch.float32 and imgs.shape == (4, 3, 32, 32)
    assert -2.2 < imgs.min() and imgs.max() < 2.7  # (0 - 0.485) / 0.229 .. (1 - 0.406) / 0.225
    assert imgs.std() > 0.3  # a photo, not a constant
