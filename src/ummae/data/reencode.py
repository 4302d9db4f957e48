"""Images stored at the size training needs: what `ummae shards --max-side` writes into each sample.

Decoding dominates the data path, and a JPEG's decoding cost grows with its pixels: even with
the reduced-scale decode of `CropDecoder` a 12 MP camera photo's training sample costs ~8x that
of the same photo at 764x573 (docs/benchmarks.md, "Re-encoded shards"). Pre-training never looks
at more detail than its crops resolve, so the shards can hold each photo shrunk once, at writing
time, instead of decoding the detail away in every epoch. Two rules say how small:

- `LongerSideAtMost(n)` (`--max-side N`): the longer side at most N pixels, FFCV's `max_resolution`.
- `CropSafe(img_size, min_crop_scale)` (`--max-side auto`): the smallest size at which no crop of
  the pre-training augmentation is ever upsampled; see `crop_safe_side`.

A larger image is decoded upright (EXIF orientation applied, as `load_rgb` does for training,
so the stored JPEG carries no orientation tag), shrunk (`shrink_image`) and saved as a JPEG at
`JPEG_QUALITY` (`encode_jpeg`). An image that is small enough keeps its bytes if it is a JPEG
(or a format that decodes faster than one), and is saved as a JPEG at its own size if its format
decodes slower (PNG, WebP, ...: `reencoded_at_own_size`). Grey images stay grey JPEGs; every
other mode (CMYK, palette, transparency, 16-bit) becomes the RGB image `load_rgb` would have
given training.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from PIL import Image

from ummae.data.folder import load_rgb
from ummae.data.transforms import CROP_RATIO

__all__ = ["JPEG_QUALITY", "CropSafe", "LongerSideAtMost", "crop_safe_side", "encode_jpeg",
           "reencoded_at_own_size", "shrink_image", "stored_image"]

# Measured (scripts/bench_reencode.py; docs/benchmarks.md, "Re-encoded shards"), 12 MP photos
# stored at 764x573, q85 / q90 / q95: 75 / 96 / 142 KiB per image; 445 / 413 / 364 training
# samples/s per core; the same 256 px crop differs from the original's by 2.1 / 1.9 / 1.5 grey
# levels at scale 0.2 (1.3 / 1.1 / 0.9 for the whole image), against 0.5-1.9 (by scale) between
# the two decode paths of the original, a difference training accepts by default. 90's loss is
# of that size; it is 1.06-1.13x faster than 95 (3 and 12 MP) at 0.68x the bytes, for 0.3 grey
# levels more, while 85 is only 1.06-1.08x faster than 90 (within the noise of other runs).
JPEG_QUALITY = 90


def crop_safe_side(img_size: int, min_crop_scale: float) -> float:
    """The geometric mean side sqrt(width * height) below which RandomResizedCrop upsamples.

    torchvision's RandomResizedCrop draws an area fraction s in [min_crop_scale, 1] and an aspect
    ratio a in [3/4, 4/3] and crops w = sqrt(s * W * H * a) by h = sqrt(s * W * H / a) pixels of
    a W x H image. The crop's shorter side is therefore sqrt(s * W * H) * sqrt(3/4) at the least,
    at s = min_crop_scale and the most elongated aspect: it depends on the image's AREA, not on
    either of its sides. No crop is upsampled to img_size when that least side is >= img_size:

        sqrt(W * H) >= img_size / sqrt(min_crop_scale * 3/4)      (661 px for 256 px, scale 0.2)

    For a 4:3 photo that is a shorter side of img_size / sqrt(min_crop_scale) (573 px: the issue's
    estimate, 764x573), for a square one 661x661, for 16:9 882x496. (A crop that does not fit in
    the image is redrawn, up to 10 times, then replaced by the largest centred crop of an allowed
    aspect, whose shorter side is the image's: `CropSafe` keeps that >= img_size as well, which
    only binds for panoramas wider than 1 / (min_crop_scale * 3/4) = 6.7:1.)
    """
    return img_size / math.sqrt(min_crop_scale * min(CROP_RATIO))


class LongerSideAtMost:
    """`--max-side N`: (width, height) -> the size with the longer side N, or None if it is <= N."""

    def __init__(self, max_side: int) -> None:
        self.max_side = max_side

    def __call__(self, width: int, height: int) -> tuple[int, int] | None:
        longer = max(width, height)
        if longer <= self.max_side:
            return None
        # The longer side exactly N, the shorter one in proportion (rounded, at least 1 pixel).
        if width >= height:
            return self.max_side, max(1, round(height * self.max_side / width))
        return max(1, round(width * self.max_side / height)), self.max_side

    def describe(self) -> str:
        return f"longer side at most {self.max_side} px"


class CropSafe:
    """`--max-side auto`: (width, height) -> the smallest size of the same aspect at which no
    pre-training crop (img_size, scale [min_crop_scale, 1]) upsamples, or None if the image is
    that small already (see `crop_safe_side`)."""

    def __init__(self, img_size: int, min_crop_scale: float) -> None:
        self.img_size, self.min_crop_scale = img_size, min_crop_scale
        self.side = crop_safe_side(img_size, min_crop_scale)

    def __call__(self, width: int, height: int) -> tuple[int, int] | None:
        # The factor that brings sqrt(W * H) to `side`, unless that leaves the shorter side (the
        # fallback crop's) under img_size. Rounded up: a pixel more is safe, one less is not.
        factor = max(self.side / math.sqrt(width * height), self.img_size / min(width, height))
        size = math.ceil(width * factor), math.ceil(height * factor)
        return None if size[0] >= width else size  # not smaller (within rounding): stored as it is

    def describe(self) -> str:
        example = self(40_000, 30_000)  # a 4:3 photo large enough to be shrunk for any img_size
        return (f"the smallest size at which no {self.img_size} px crop of scale >= {self.min_crop_scale:g} "
                f"upsamples: sqrt(width x height) >= {math.ceil(self.side)} px, e.g. "
                f"{example[0]}x{example[1]} for a 4:3 photo")


def shrink_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`img` resized to `size` with Pillow's LANCZOS (antialiased: every source pixel counts).

    `img` may already be a reduced-scale JPEG decode of at least twice `size` (see
    `stored_image`): the same two steps as Pillow's own `Image.thumbnail` (draft, then resize
    with reducing_gap 2), measured 0.2 grey levels from a full decode + LANCZOS and 2.9x faster
    at 4000x3000 -> 764x573 (docs/benchmarks.md, "Re-encoded shards").
    """
    return img.resize(size, Image.Resampling.LANCZOS)


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """`img` (RGB or L) as JPEG bytes, with no metadata: no EXIF (the pixels are upright already)."""
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def stored_image(path: str | os.PathLike, shrink=None, quality: int = JPEG_QUALITY) -> tuple[str, bytes]:
    """`(WebDataset field, bytes)` to store for image `path` (see the module docstring).

    Without `shrink`: its own extension and bytes. With `shrink` (a `LongerSideAtMost` /
    `CropSafe`): `"jpg"` and a JPEG of the image shrunk to the size `shrink` gives its upright
    size, or, when `shrink` leaves it alone (None), its own bytes if it is a JPEG, BMP or
    uncompressed TIFF, else a JPEG at its own size (`reencoded_at_own_size`). The file is decoded
    either way, so that an unreadable one raises UmmaeError here (from `load_rgb`) and is left
    out of the shards, not found by a training run.
    """
    path = Path(path)
    target: dict = {}

    def draft_size(size: tuple[int, int]) -> tuple[int, int]:
        """Called by `load_rgb` with the upright size before decoding: decide the stored size, and
        let a JPEG be decoded at the coarsest DCT scale that keeps twice it (Pillow's thumbnail
        rule: the LANCZOS resize then still has 2 source pixels per output pixel)."""
        target["size"] = shrink(*size) if shrink is not None else None
        if target["size"] is None:
            return size  # no reduced decode: the check reads the whole file
        return target["size"][0] * 2, target["size"][1] * 2

    img = load_rgb(path, at_least=draft_size)
    with Image.open(path) as opened:  # the header only (load_rgb has checked the file)
        kept = shrink is None or (target["size"] is None and not reencoded_at_own_size(opened))
        # Was it grey before load_rgb made it RGB? Then it stays a (smaller) grey JPEG.
        grey = opened.mode in ("L", "1", "I;16", "I;16B", "I;16L", "I") and not opened.has_transparency_data
    if kept:
        return path.suffix.lower()[1:], path.read_bytes()
    if grey:
        img = img.convert("L")
    if target["size"] is not None:
        img = shrink_image(img, target["size"])
    return "jpg", encode_jpeg(img, quality)


def reencoded_at_own_size(opened: Image.Image) -> bool:
    """Whether `ummae shards --max-side` stores an image it need not shrink as a JPEG anyway: if
    it decodes slower than a JPEG would. Measured per 256 px training sample from the same 500x375
    photos (docs/benchmarks.md, "Re-encoded shards"): PNG 3.1x, lossy WebP 1.8x, LZW TIFF 1.6x
    slower than from the JPEG; BMP and uncompressed TIFF 1.9x faster (at 10x the bytes): kept, as
    are JPEGs (re-encoding one would only lose). GIF (palette, LZW) and other formats are
    re-encoded."""
    if opened.format in ("JPEG", "MPO", "BMP"):  # MPO: the multi-picture JPEG some cameras write
        return False
    return not (opened.format == "TIFF" and opened.info.get("compression") == "raw")
