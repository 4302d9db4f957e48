"""Image -> tensor transforms for pre-training and for viewing a user's own images.

`pretrain_transform` and `eval_transform` take a PIL RGB image and return a normalised float
tensor of shape [3, img_size, img_size]. Normalisation uses the ImageNet mean/std, as MAE and
UM-MAE do, so the pixel-reconstruction targets and any later fine-tuning see the same input
statistics.

The training loop's data path stops one step earlier: `pretrain_crop` returns the crop as uint8
[3, img_size, img_size], a quarter of the bytes to pass between processes, pin and copy, and
`to_model_input` normalises the batch once it is on the device, where that costs nothing.
"""

from __future__ import annotations

import functools

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range


def pretrain_crop(
    img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True
) -> T.Compose:
    """`pretrain_transform` without the normalisation: PIL RGB image -> uint8 [3, img_size, img_size].

    Draws from torch's global generator exactly as `pretrain_transform` does (same crop and flip
    under the same seed); `to_model_input(batch)` then equals the stacked `pretrain_transform`
    outputs up to float rounding.
    """
    steps = [T.RandomResizedCrop(img_size, scale=scale, ratio=CROP_RATIO,
                                 interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.PILToTensor())
    return T.Compose(steps)


def to_model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch as the model takes it: on `device`, float32, ImageNet-normalised.

    Args:
        images: uint8 `[B, 3, H, W]` (from `pretrain_crop` / `CropDecoder`, ideally in pinned
            memory): copied as uint8, then normalised on the device. A floating-point batch is
            taken to be normalised already and is only moved.

    Returns:
        float32 `[B, 3, H, W]` on `device`.
    """
    images = images.to(device, non_blocking=True)
    if images.is_floating_point():
        return images
    mean, std = _mean_std_255(images.device)
    return (images.float() - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in 0..255 units, `[1, 3, 1, 1]` on `device`, made once per device
    (not copied to the device at every step)."""
    mean = (torch.tensor(IMAGENET_MEAN) * 255).view(1, 3, 1, 1).to(device)
    std = (torch.tensor(IMAGENET_STD) * 255).view(1, 3, 1, 1).to(device)
    return mean, std


def pretrain_transform(
    img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True
) -> T.Compose:
    """The MAE / UM-MAE pre-training augmentation.

    A random crop covering `scale` (fraction of the image area, aspect ratio 3/4..4/3) is resized
    to img_size x img_size with bicubic interpolation, optionally flipped left-right, and
    normalised. Masked-image modelling needs no stronger augmentation: the masking itself is the
    hard part of the task.

    Returns a callable: PIL RGB image -> float32 tensor [3, img_size, img_size].
    """
    steps = [T.RandomResizedCrop(img_size, scale=scale, ratio=CROP_RATIO,
                                 interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(img_size: int) -> T.Compose:
    """Deterministic view of a whole image: shorter side resized to img_size, centre crop.

    Returns a callable: PIL RGB image -> float32 tensor [3, img_size, img_size].
    """
    return T.Compose(
        [
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
