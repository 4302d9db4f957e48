"""Built-in demo data: the real photographs that scikit-image ships inside its package.

They let `ummae` pre-train out of the box, with no dataset and no network: a dozen photos,
cut into an endless stream of random crops by the pre-training transform. Only files that are
inside the installed `skimage/data` folder are used; the `skimage.data.*()` functions are never
called, because some of them download their image on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from ummae.data.folder import load_rgb
from ummae.errors import ConfigError, UmmaeError

# Real photographs only. Left out: synthetic or drawn images (logo, chessboard_*, phantom, text,
# page, color, horse silhouette), near-duplicates (motorcycle_right), tiny or low-detail ones
# (microaneurysms, cell, clock_motion, moon). Grey photos add variety and are converted to RGB.
DEMO_IMAGE_FILES: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "brick.png",
)


def demo_image_dir() -> Path:
    """The folder inside the installed scikit-image package that holds DEMO_IMAGE_FILES."""
    try:
        import skimage.data
    except ImportError as err:
        raise UmmaeError(
            "the built-in demo images come from scikit-image, which is not installed "
            "(pip install scikit-image), or pass a data directory instead"
        ) from err
    return Path(skimage.data.__file__).parent


def load_demo_images() -> list[Image.Image]:
    """Load every demo photograph as an 8-bit RGB PIL image (sizes vary, ~300 to ~1400 px)."""
    folder = demo_image_dir()
    missing = [name for name in DEMO_IMAGE_FILES if not (folder / name).is_file()]
    if missing:
        raise UmmaeError(
            f"demo images missing from scikit-image's data folder '{folder}': "
            f"{', '.join(missing)}; reinstall scikit-image or pass a data directory"
        )
    return [load_rgb(folder / name) for name in DEMO_IMAGE_FILES]


class DemoImages(Dataset):
    """The demo photographs as a dataset of `length` samples per epoch.

    `dataset[i]` is `transform(images[i % n])`. With a random transform (the pre-training
    random-resized-crop) every draw is a different crop, so a handful of photos yields as many
    distinct samples as needed. With the pre-training transform each sample is a float tensor
    [3, img_size, img_size]; with transform=None it is the PIL RGB image itself.
    """

    def __init__(
        self, transform: Callable[[Image.Image], torch.Tensor] | None = None, length: int = 512
    ) -> None:
        if length < 1:
            raise ConfigError(f"demo dataset length must be at least 1, got {length}")
        self.images = load_demo_images()  # loaded once; a few MB in memory
        self.transform = transform
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor | Image.Image:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        img = self.images[index % len(self.images)]
        return self.transform(img) if self.transform is not None else img
