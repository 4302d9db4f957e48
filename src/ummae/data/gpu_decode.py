"""Decode "gpu": DataLoader workers only read bytes and draw crop boxes; the training process decodes
the whole batch on the GPU (nvJPEG through `torchvision.io.decode_jpeg(..., device="cuda")`).

Why: a GPU trains UM-MAE Swin-T on ~16,000 images/s, and even the `fast` CPU path decodes only
60-220 camera or ImageNet-size JPEGs per core per second (docs/benchmarks.md, "Data loader"):
no CPU loader keeps such a GPU busy. With `data.decode=gpu` a worker's work per sample shrinks
to what cannot move: read the stored bytes (a file, or a tar shard member), read the JPEG header
(size, colour mode, EXIF orientation; nothing is decoded) and draw the crop box and the flip,
from torch's generator in the same order as `CropDecoder` does, so under the same seed the box
and the flip are the very ones of `data.decode=fast`. The batch travels as one flat uint8 buffer
of the compressed files (pinned as one tensor) plus the boxes; `decode_batch` then decodes
all of them in one batched call on the device, makes each upright, crops its box, resizes it to
img_size (bicubic, antialiased, in float) and flips it there, and returns the same uint8
`[B, 3, img_size, img_size]` batch the other modes give, on the device, fixed in shape whatever
the files' sizes: the step that follows is the same.

What falls back to the CPU, counted (`EncodedBatch.cpu_decoded`): files that are not JPEG (PNG,
WebP, ...) and JPEGs in grey or CMYK, whose device decoding differs between decoders (a grey JPEG
is taken to RGB by repeating its channel on the CPU path; nvJPEG does not read CMYK). A worker
decodes those with the `fast` path, and they join the batch already decoded. A file whose header
cannot be read is skipped and counted by the dataset as today; one whose header reads but whose
data is damaged fails on the device: it is then decoded on the CPU (`load_rgb`, with the same
box), and if that fails too its place in the batch is filled with another image of the batch and
it is reported (`decode_batch(...)[1]`), so the batch keeps its shape and the run its steps.

On a machine without a GPU the same code decodes with torchvision's CPU decoder in the training
process (tests use this); its crops match the `fast` path's within a few grey levels: a full
decode instead of a reduced-scale one, and a float resize instead of uint8 (see the tests).
torchvision marks its image decoding as deprecated in favour of TorchCodec since 0.29; the one
call sits in `_decode_jpegs`, so moving to another decoder is a change in one place.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as F

from ummae.data.crop import CropDecoder, draw_crop_box
from ummae.data.folder import load_rgb
from ummae.errors import UmmaeError

__all__ = ["EncodedCrop", "EncodedBatch", "collate_encoded", "decode_batch", "to_device_batch"]

# The colour modes Pillow reports for JPEGs that go to the device: 3-channel YCbCr/RGB files.
DEVICE_MODES = ("RGB",)
# Pillow's formats that are JPEG files: MPO is the multi-picture JPEG many cameras and phones
# write (a JPEG whose first picture any JPEG decoder reads).
JPEG_KINDS = ("JPEG", "MPO")


class EncodedCrop:
    """Worker side of decode "gpu": image file -> `{"jpeg", "box", "flip", "orientation"}`, or the
    decoded crop `{"pixels"}` for what falls back to the CPU (see the module docstring).

    `box` is `(top, left, height, width)` in the upright image, drawn from torch's global
    generator exactly as `CropDecoder` draws it (then the flip), so `SeededSamples`' per-sample
    seed makes it a pure function of `(seed, epoch, index)`, equal to the `fast` path's box.
    Raises UmmaeError (the dataset then skips the file) when the file or its header is unreadable.
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> None:
        self.img_size = img_size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.fallback = CropDecoder(img_size, scale, hflip, decode="fast")

    def __call__(self, source: str | Path | BinaryIO) -> dict:
        name = getattr(source, "name", source)
        try:
            data = _read(source)
            with Image.open(io.BytesIO(data)) as opened:  # reads the header only
                kind, mode, (width, height) = opened.format, opened.mode, opened.size
                orientation = opened.getexif().get(ExifTags.Base.Orientation, 1) if kind in JPEG_KINDS else 1
        except UnidentifiedImageError:
            raise UmmaeError(f"cannot read image '{name}': empty file or not an image format") from None
        except Exception as err:  # OSError from a missing file, Pillow's various header errors
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise UmmaeError(f"cannot read image '{name}': {reason}") from None
        if kind not in JPEG_KINDS or mode not in DEVICE_MODES or orientation not in range(1, 9):
            buffer = io.BytesIO(data)
            buffer.name = str(name)
            return {"pixels": self.fallback(buffer)}
        upright = (height, width) if orientation >= 5 else (width, height)  # 5-8 turn by 90 degrees
        box = draw_crop_box(upright, self.scale)
        flip = bool(self.hflip and torch.rand(1) < 0.5)  # drawn after the box, as CropDecoder does
        return {"jpeg": torch.frombuffer(data, dtype=torch.uint8), "box": box, "flip": flip,
                "orientation": orientation}


def _read(source: str | Path | BinaryIO) -> bytearray:
    """The file's bytes in a writable buffer, which a tensor can share without a copy."""
    if isinstance(source, io.BytesIO):  # a tar shard's member, already in memory
        return bytearray(source.getbuffer())
    with open(source, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(data) != len(data):
            raise OSError("the file changed size while being read")
    return data


@dataclass
class EncodedBatch:
    """A batch of decode "gpu" samples, as `collate_encoded` builds it in a worker.

    Attributes:
        data: uint8 `[total bytes]`, the JPEG files of the encoded samples one after another.
        lengths: int64 `[B]`, the bytes of sample b in `data`; 0 where b was decoded on the CPU.
        boxes: int64 `[B, 4]`, (top, left, height, width) of each crop in its upright image.
        flips: bool `[B]`; orientations: uint8 `[B]`, EXIF orientation (1: as stored).
        pixels: uint8 `[n, 3, S, S]`, the CPU-decoded samples, at positions `pixels_at` (int64 `[n]`).
    """
    data: torch.Tensor
    lengths: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    orientations: torch.Tensor
    pixels: torch.Tensor
    pixels_at: torch.Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def cpu_decoded(self) -> int:
        return len(self.pixels_at)

    def pin_memory(self) -> EncodedBatch:  # called by DataLoader(pin_memory=True) in its pinning thread
        return EncodedBatch(*(t.pin_memory() for t in (self.data, self.lengths, self.boxes, self.flips,
                                                       self.orientations, self.pixels, self.pixels_at)))


def _encoded_batch(images: list[dict], img_size: int) -> EncodedBatch:
    # A CPU-decoded sample has no file in `data` (length 0); its box, flip and orientation are unused.
    on_device = ["jpeg" in x for x in images]
    decoded = [(b, x["pixels"]) for b, x in enumerate(images) if "pixels" in x]
    data = (torch.cat([x["jpeg"] for x in images if "jpeg" in x]) if any(on_device)
            else torch.zeros(0, dtype=torch.uint8))
    pixels = (torch.stack([p for _, p in decoded]) if decoded
              else torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8))
    return EncodedBatch(
        data,
        lengths=torch.tensor([len(x["jpeg"]) if e else 0 for x, e in zip(images, on_device)], dtype=torch.int64),
        boxes=torch.tensor([x["box"] if e else (0, 0, 0, 0) for x, e in zip(images, on_device)], dtype=torch.int64),
        flips=torch.tensor([e and x["flip"] for x, e in zip(images, on_device)], dtype=torch.bool),
        orientations=torch.tensor([x["orientation"] if e else 1 for x, e in zip(images, on_device)],
                                  dtype=torch.uint8),
        pixels=pixels, pixels_at=torch.tensor([b for b, _ in decoded], dtype=torch.int64))


def collate_encoded(samples: list[dict]) -> dict:
    """DataLoader `collate_fn` of decode "gpu": `SeededSamples` dicts -> the batch dict, with
    `image` an `EncodedBatch` (everything else, masks included, collated as usual). A batch whose
    images are already tensors (the demo photographs) is collated as usual."""
    if not isinstance(samples[0]["image"], dict):
        return default_collate(samples)
    images = [s["image"] for s in samples]
    batch = default_collate([{k: v for k, v in s.items() if k != "image"} for s in samples])
    fallback = next((x["pixels"] for x in images if "pixels" in x), None)
    img_size = fallback.shape[-1] if fallback is not None else 0  # only sizes an empty `pixels`
    batch["image"] = _encoded_batch(images, img_size)
    return batch


def to_device_batch(images: torch.Tensor | EncodedBatch, img_size: int,
                    device: torch.device | str) -> tuple[torch.Tensor, list[int]]:
    """A batch's images as uint8 `[B, 3, S, S]` on `device`, whatever the decode mode, and the
    positions whose file could not be decoded (filled with another image of the batch)."""
    if isinstance(images, EncodedBatch):
        return decode_batch(images, img_size, device)
    return images.to(device, non_blocking=True), []


def decode_batch(batch: EncodedBatch, img_size: int, device: torch.device | str) -> tuple[torch.Tensor, list[int]]:
    """Decode, orient, crop, resize and flip a batch on `device`.

    Returns:
        `(images, failed)`: images uint8 `[B, 3, img_size, img_size]` on `device`; `failed` the
        positions whose bytes neither the device nor the CPU could decode (each holds a copy of
        another image of the batch, so the shape stays; the caller reports them as skipped).
    """
    device = torch.device(device)
    out = torch.empty(len(batch), 3, img_size, img_size, dtype=torch.uint8, device=device)
    # The boxes, flips and lengths are host tensors: reading them needs no device sync.
    lengths, boxes = batch.lengths.tolist(), batch.boxes.tolist()
    flips, orientations = batch.flips.tolist(), batch.orientations.tolist()
    positions = [b for b, n in enumerate(lengths) if n]
    files = torch.split(batch.data, [lengths[b] for b in positions])
    failed = []
    for b, file, image in zip(positions, files, _decode_jpegs(list(files), device)):
        if image is None:  # damaged data: Pillow (upright already), the same box; else give up on it
            image = _decode_on_cpu(file, device)
            if image is None:
                failed.append(b)
                continue
        else:
            image = upright(image, orientations[b])
        top, left, h, w = boxes[b]
        # in float: one code path on every device (torch's vectorised uint8 resize is a CPU kernel)
        crop = image[None, :, top:top + h, left:left + w].float()  # 1, 3, h, w
        crop = F.resize(crop, [img_size, img_size], F.InterpolationMode.BICUBIC, antialias=True)
        crop = crop[0].round_().clamp_(0, 255).to(torch.uint8)  # 3, S, S
        out[b] = crop.flip(-1) if flips[b] else crop
    if batch.cpu_decoded:
        out[batch.pixels_at.to(device)] = batch.pixels.to(device, non_blocking=True)
    if failed:
        good = next((b for b in range(len(batch)) if b not in failed), None)
        if good is None:
            raise UmmaeError(f"none of the {len(batch)} images of a batch could be decoded")
        out[failed] = out[good].clone()
    return out, failed


def _decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as uint8 `[3, H, W]` RGB on `device` (as stored: no EXIF orientation), None for a
    file the decoder rejects. One batched call; torchvision returns nothing when any file fails, so
    only then are the files decoded one by one to find the bad ones."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data):
        with warnings.catch_warnings():  # its deprecation notice at every call (see the module docstring)
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    if not files:
        return []
    try:
        return list(decode(files))
    except RuntimeError:
        pass
    decoded: list[torch.Tensor | None] = []
    for f in files:
        try:
            decoded.append(decode(f))
        except RuntimeError:
            decoded.append(None)
    return decoded


def _decode_on_cpu(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Pillow's decode of a file the device rejected (upright, RGB), or None if Pillow fails too."""
    try:
        image = load_rgb(io.BytesIO(data.numpy().tobytes()))
    except UmmaeError:
        return None
    return F.pil_to_tensor(image).to(device)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`image` `[C, H, W]` as stored, turned by its EXIF `orientation` (1-8) the way Pillow's
    `ImageOps.exif_transpose` turns it, so the upright crop box applies."""
    if orientation in (5, 6, 7, 8):  # these swap height and width: transpose first
        image = image.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image
