"""Image -> tensor transforms for pre-training and for viewing a user's own images.

Both pipelines take a PIL RGB image and return a normalised float tensor of shape
[3, img_size, img_size]. Normalisation uses the ImageNet mean/std, as MAE and UM-MAE do, so the
pixel-reconstruction targets and any later fine-tuning see the same input statistics.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


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
    steps = [T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
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
