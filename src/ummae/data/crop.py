"""Pre-training crops straight from image files, decoding only as much of a JPEG as the crop needs.

The reference pipeline decodes the whole file and then lets torchvision's RandomResizedCrop keep
a random part of it (20-100% of the area) and shrink that part to img_size. For a camera photo of
12 megapixels and a 256 px crop most of the decoding is thrown away. `CropDecoder` (decode
"fast") draws the crop box first, from the size in the file header, with torchvision's own
`RandomResizedCrop.get_params` (so the boxes have the same distribution; under the same seed they
are the very same boxes), then has libjpeg decode the image at the coarsest DCT scale (1/2, 1/4,
1/8, Pillow's draft mode) at which the box still covers at least img_size x img_size pixels, and
resizes the box's part of that smaller image with torch's uint8 antialiased bicubic resize, which
is several times faster than Pillow's. At ImageNet sizes (~500x375) a 256 px crop never allows a
reduced scale; there only the faster resize helps.

Decode "plain" is the reference path (full decode, then `pretrain_crop`), kept for comparison and
as the fallback of non-JPEG files, which both paths decode at full size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from ummae.data.folder import load_rgb
from ummae.data.transforms import CROP_RATIO, pretrain_crop

__all__ = ["DECODE_MODES", "CropDecoder", "draw_crop_box"]

# "gpu" (`ummae.data.gpu_decode`): the workers draw the boxes, the training process decodes.
DECODE_MODES: tuple[str, ...] = ("fast", "plain", "gpu")


def draw_crop_box(size: tuple[int, int], scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box `(top, left, height, width)` for an image of upright `size`
    (width, height), drawn from torch's global generator by torchvision's own `get_params`."""
    width, height = size
    # get_params only reads the size: a zero-stride tensor stands in for the image.
    stand_in = torch.empty(1, 1, 1).expand(1, height, width)
    return tuple(T.RandomResizedCrop.get_params(stand_in, list(scale), list(CROP_RATIO)))


class CropDecoder:
    """Image file -> random-resized crop, optionally flipped: uint8 tensor [3, img_size, img_size].

    Random draws come from torch's global generator in the same order as `pretrain_crop` (box,
    then flip), so seeding it (as `SeededSamples` does per sample) makes the crop a pure function
    of the seed in both modes, and the two modes pick the same box and flip under the same seed.
    Unreadable files raise UmmaeError (from `load_rgb`), so `ImageFolderUnlabeled` skips them.
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 decode: str = "fast") -> None:
        if decode not in ("fast", "plain"):
            raise ValueError(f"decode must be 'fast' or 'plain', got {decode!r}")
        self.img_size = img_size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.decode = decode
        self.reference = pretrain_crop(img_size, scale, hflip)  # the "plain" path

    def __call__(self, path: str | Path) -> torch.Tensor:
        if self.decode == "plain":
            return self.reference(load_rgb(path))

        drawn: dict = {}

        def draw_box(size: tuple[int, int]) -> tuple[int, int]:
            """Draw the crop from the header's upright (width, height); return the smallest
            image size that keeps the crop at >= img_size pixels on both sides."""
            width, height = size
            top, left, h, w = draw_crop_box(size, self.scale)
            drawn.update(width=width, box=(top, left, h, w))
            return math.ceil(width * self.img_size / w), math.ceil(height * self.img_size / h)

        img = load_rgb(path, at_least=draw_box)
        top, left, h, w = drawn["box"]
        # Decoded at scale 1/s with s a power of two (1 when not reduced): pixel x of the full
        # image lies at x / s in the reduced one. The box is rounded to whole reduced pixels,
        # which moves its edges by at most s / 2 full-size pixels (s > 1 needs a box of at least
        # s * img_size pixels a side, so that is at most 1 / (2 img_size) of it: 0.2% at 256).
        s = 2 ** round(math.log2(drawn["width"] / img.width))
        if s > 1:
            bottom, right = round((top + h) / s), round((left + w) / s)
            top, left = round(top / s), round(left / s)
            h, w = bottom - top, right - left
        # Only the box is copied out of Pillow, as [3, h, w] uint8 whose memory is h, w, 3
        # (channels last): the layout torch's vectorised uint8 antialiased resize takes, ~3x
        # faster than Pillow's resize and within 1 grey level of it (this is why the crop is
        # resized by torch here, by Pillow in "plain").
        pixels = F.pil_to_tensor(img.crop((left, top, left + w, top + h)))
        out = F.resize(pixels, [self.img_size, self.img_size], T.InterpolationMode.BICUBIC, antialias=True)
        if self.hflip and torch.rand(1) < 0.5:  # as torchvision's RandomHorizontalFlip draws it
            out = F.horizontal_flip(out)
        return out
