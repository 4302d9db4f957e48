"""A user's own images: find them in a folder tree, decode them robustly, serve them as a Dataset.

Pre-training needs no labels, so any folder of images works: an ImageNet-style tree of class
folders, a flat folder of photos, or anything in between. Class folders are simply ignored.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ummae.errors import UmmaeError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
)


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under `root`, searched recursively, in sorted (deterministic) order.

    Extensions are matched case-insensitively against IMAGE_EXTENSIONS. Hidden files and folders
    (names starting with '.') are skipped, e.g. `.DS_Store`, `.ipynb_checkpoints`, `.git`.
    Symlinked folders are followed, each real folder is visited only once.
    Raises UmmaeError if `root` is missing, is not a directory, or holds no images.
    """
    root = Path(root)
    if not root.exists():
        raise UmmaeError(f"data directory '{root}' does not exist")
    if not root.is_dir():
        raise UmmaeError(f"data path '{root}' is a file, not a directory")

    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Following symlinks lets a data folder be assembled from links; remembering the real
        # path of each folder stops a link loop (or a folder linked twice) from repeating work.
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        # Sorting here makes the walk order (and so which of two links wins) deterministic.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / name
            for name in filenames
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        ]

    if not found:
        raise UmmaeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'")
    return sorted(found)


def load_rgb(
    path: str | os.PathLike | BinaryIO,
    at_least: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode an image file (a path, or an open binary file such as a tar shard's member, whose
    `name` attribute, if any, names it in errors) into an 8-bit RGB PIL image, whatever its mode.

    `at_least`, if given, is called with the image's upright (width, height), read from the file
    header before anything is decoded, and returns the smallest (width, height) the caller needs.
    A JPEG is then decoded at the coarsest DCT scale 1/s (s = 2, 4 or 8, Pillow's draft mode)
    that keeps it at least that big, and comes out ceil(width / s) x ceil(height / s): most of the
    decoding work of a large photo of which only a small version is needed is skipped. Other
    formats are decoded at full size (s = 1).

    - EXIF orientation is applied, so photos from phones come out upright.
    - Transparency (RGBA, LA, palette or grey with a transparent colour) is composited onto a
      white background rather than just dropped: pixels under a fully transparent area often
      hold arbitrary colours that were never meant to be seen.
    - 16/32-bit integer images ('I;16*', 'I') are mapped from the 16-bit range: 0 -> 0,
      65535 -> 255 (values outside [0, 65535] are clipped).
    - Float images ('F') are taken to lie in [0, 1] when all their values do (the usual
      convention for float images); otherwise they are clipped to [0, 255], as PIL itself does.
    - Everything else ('L', '1', 'P', 'CMYK', 'YCbCr', ...) goes through PIL's own conversion.

    Images up to PIL's hard pixel limit (2 x Image.MAX_IMAGE_PIXELS, about 179 megapixels with
    the default, e.g. 13,000 x 13,000) load without a DecompressionBombWarning; larger ones are
    treated as unreadable. PIL's global limit is left untouched.

    Raises UmmaeError naming the file if it is empty, truncated, not an image, or too large.
    """
    if hasattr(path, "read"):
        name = getattr(path, "name", "<file object>")
    else:
        path = name = Path(path)
    try:
        with warnings.catch_warnings():
            # Big photographs (scans, satellite tiles) trigger this warning although they are
            # legitimate; PIL still raises DecompressionBombError beyond twice the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if at_least is not None:
                    _draft(opened, at_least)
                opened.load()  # decode now: a truncated file fails here, not later in a transform
                ImageOps.exif_transpose(opened, in_place=True)  # in place: no copy of a big photo
        return _to_rgb(opened)
    except Image.DecompressionBombError as err:
        raise UmmaeError(f"image '{name}' is too large to load: {err}") from err
    except UnidentifiedImageError as err:  # PIL's message repeats the path; say what it means
        raise UmmaeError(f"cannot read image '{name}': empty file or not an image format") from err
    except Exception as err:  # PIL signals other bad files with many exception types
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UmmaeError(f"cannot read image '{name}': {reason}") from err


def _draft(opened: Image.Image, at_least: Callable[[tuple[int, int]], tuple[int, int]]) -> None:
    """Ask Pillow to decode `opened` (not loaded yet) at reduced scale, within `at_least`'s bound."""
    width, height = opened.size
    # EXIF orientations 5-8 turn the picture by 90 degrees: the caller thinks in upright sizes.
    turned = opened.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    need_w, need_h = at_least((height, width) if turned else (width, height))
    if turned:
        need_w, need_h = need_h, need_w
    if need_w < width and need_h < height:
        # JPEG only (a no-op for other formats): picks the largest scale 1/s, s in (8, 4, 2),
        # with width // s >= need_w and height // s >= need_h.
        opened.draft(None, (max(need_w, 1), max(need_h, 1)))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (rules in `load_rgb`)."""
    if img.mode == "RGB":
        return img
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    if img.mode == "I" or img.mode.startswith("I;16"):
        # PIL's own I -> L conversion clips at 255 instead of scaling, which turns most
        # 16-bit images white; scale the 16-bit range down instead.
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.round(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


class ImageFolderUnlabeled(Dataset):
    """Every image under a folder tree, without labels.

    `dataset[i]` is `transform(load_rgb(file_i))`: with the pre-training transform, a float
    tensor [3, img_size, img_size]; with transform=None, the PIL RGB image itself. A `loader`
    (file path -> sample, e.g. a `ummae.data.crop.CropDecoder`, raising UmmaeError for a file it
    cannot read) replaces both: `dataset[i]` is then `loader(file_i)`.

    An unreadable file does not stop training: it is reported once with `warnings.warn`, its
    path is added to `self.skipped`, and the next readable file (i+1, i+2, ..., wrapping
    around) is returned instead. `self.skipped` lives in one process: each DataLoader worker
    keeps its own copy, so with several workers a bad file may be warned about once per worker
    and the main process's set stays empty.
    """

    def __init__(
        self, root: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor] | None = None,
        loader: Callable[[Path], torch.Tensor] | None = None,
    ) -> None:
        self.root = Path(root)
        self.paths = find_images(self.root)
        self.transform = transform
        self.loader = loader
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | Image.Image:
        return self.load(index)[0]

    def load(self, index: int) -> tuple[torch.Tensor | Image.Image, list[Path]]:
        """`(dataset[index], files skipped to get it)`: the training loop counts the skipped
        files across DataLoader workers and ranks, which `self.skipped` (per process) cannot."""
        n = len(self.paths)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        passed_over: list[Path] = []
        for offset in range(n):
            position = (index + offset) % n
            path = self.paths[position]
            if path in self.skipped:
                passed_over.append(path)
                continue
            try:
                source = self._source(position)
                sample = self.loader(source) if self.loader is not None else load_rgb(source)
            except UmmaeError as err:
                self.skipped.add(path)
                passed_over.append(path)
                warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
                continue
            if self.loader is None and self.transform is not None:
                sample = self.transform(sample)
            return sample, passed_over
        raise UmmaeError(f"none of the {n} images under '{self.root}' could be read")

    def _source(self, index: int) -> Path | BinaryIO:
        """What image `index` is read from: its file here; a subclass whose `paths` are not
        files (tar shards) returns an open binary file instead."""
        return self.paths[index]
