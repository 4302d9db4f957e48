"""Frozen features of labeled images: the one pass over images that k-NN and linear probing share.

The encoder of a pre-training checkpoint is rebuilt for full images (`models.loading`), frozen,
and run once over every image under the deterministic evaluation transform (resize + centre
crop, no augmentation). Each image becomes one vector, the global average of the backbone's
final features:

    Swin / PVT  `forward_features` -> `[B, h, w, C]` (final norm applied) -> mean over h, w
    ViT         `forward_features` -> `[B, 1+N, C]` (class token first)  -> mean over the N patch
                tokens (the class token is never trained by MAE's loss, so it is left out)

The vectors are returned as they come (not L2-normalised): k-NN normalises them itself, the
linear probe's BatchNorm whitens them.

`raw_pixel_features` is the baseline every table needs beside them: the same images, split and
transform, with the flattened input pixels standing in for the encoder's output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.labeled import SkipUnreadable, collate_skipping, require_two_classes, train_val_datasets
from ..data.transforms import eval_transform
from ..engine.distributed import resolve_device
from ..engine.cpus import resolve_workers
from ..engine.loop import training_autocast
from ..engine.progress import progress_mode, track
from ..errors import UmmaeError
from ..models.loading import build_backbone, load_backbone, load_pretrain_checkpoint

__all__ = ["pool_features", "load_frozen_backbone", "eval_datasets", "extract_features", "flatten_pixels",
           "LabeledFeatures", "labeled_features", "raw_pixel_features"]


def pool_features(features: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """One vector per image from a backbone's final features.

    Args:
        features: `[B, h, w, C]` feature map (Swin, PVT) or `[B, T, C]` tokens (ViT) whose first
            `num_prefix_tokens` are not patches (ViT's class token).
        num_prefix_tokens: leading tokens left out of the token average.

    Returns:
        `[B, C]` global average.
    """
    if features.ndim == 4:
        return features.mean(dim=(1, 2))  # [B, h, w, C] -> [B, C]
    if features.ndim == 3:
        return features[:, num_prefix_tokens:].mean(dim=1)  # [B, T, C] -> [B, C]
    raise ValueError(f"expected [B, h, w, C] or [B, T, C] features, got shape {list(features.shape)}")


def load_frozen_backbone(checkpoint: str | os.PathLike, img_size: int | None = None,
                         init_random: bool = False, seed: int = 0):
    """The full-image encoder of a pre-training checkpoint, frozen and in eval mode.

    Args:
        checkpoint: an `ummae pretrain` checkpoint (it names the architecture).
        img_size: input size (default: the pre-training size). ViT's position table is fixed at
            the pre-training size, so a ViT checkpoint only loads at that size.
        init_random: build the same architecture with a fresh initialisation seeded by `seed`
            instead of loading the weights: the baseline a pre-training has to beat.

    Returns:
        `(backbone, cfg)`, `cfg` the checkpoint's `PretrainConfig`.
    """
    if init_random:
        cfg, _ = load_pretrain_checkpoint(checkpoint)
        # Seed the initialisation without disturbing the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(cfg, img_size=img_size)
    else:
        try:
            backbone, cfg = load_backbone(checkpoint, img_size=img_size)
        except RuntimeError as e:  # load_state_dict's shape mismatch, e.g. ViT at another size
            detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line),
                          str(e).splitlines()[0])
            raise UmmaeError(f"'{checkpoint}': the weights do not fit a {img_size} px backbone "
                             f"({detail})") from None
    backbone.requires_grad_(False)
    backbone.eval()
    return backbone, cfg


def eval_datasets(data: str | os.PathLike, val_data: str | os.PathLike | None = None,
                  val_fraction: float = 0.2, img_size: int = 224, seed: int = 0):
    """`(train, val, class_names)` of labeled folders, both under the evaluation transform.

    `val_data` is a second `DIR/<class>/...` folder with the same classes; without it a seeded,
    stratified `val_fraction` of `data` is held out. Both are `SkipUnreadable` (dropping): an
    unreadable image is left out of the features, not replaced. A single class is refused.
    """
    transform = eval_transform(img_size)
    train, val, classes = train_val_datasets(data, val_data, transform, transform, val_fraction, seed)
    require_two_classes(data, classes)
    train, val = SkipUnreadable(train, replace=False), SkipUnreadable(val, replace=False)
    if len(train) == 0:
        raise UmmaeError(f"no training images left in '{data}' after holding out the validation split")
    if len(val) == 0:
        raise UmmaeError(f"the validation split of '{data}' is empty: give every class at least two "
                         "images, or a separate --val-data folder")
    return train, val, classes


@torch.no_grad()  # not inference_mode: the linear probe trains on these tensors with autograd
def _encode_dataset(encode: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
                    device: torch.device, num_workers: int | None, progress: bool, desc: str,
                    skipped: set[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one pass over a labeled dataset: `encode([B, 3, H, W] on device) -> [B, D]` per batch.

    Returns `(features [N, D] float32, labels [N] int64)` on the CPU, in dataset order; the files
    a `SkipUnreadable` dataset passed over are added to `skipped`.
    """
    skipping = isinstance(dataset, SkipUnreadable)
    num_workers = resolve_workers(num_workers, device.type)  # None: fitted to the CPUs (engine.cpus)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_skipping if skipping else None)
    features, labels, passed_over = [], [], set()
    for batch in track(loader, desc, progress_mode(progress), unit="batch"):  # engine.progress: no bar in logs
        images, targets = batch[:2]
        if skipping:
            passed_over.update(batch[2])
            if images is None:  # every image of this batch was unreadable
                continue
        features.append(encode(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(targets, dtype=torch.long))
    if skipped is not None:
        skipped.update(passed_over)
    if not features:
        if passed_over:
            raise UmmaeError(f"none of the {len(dataset)} images of the {desc.replace(' features', '')} set "
                             f"could be read (e.g. '{min(passed_over)}')")
        raise UmmaeError("no images to extract features from")
    return torch.cat(features), torch.cat(labels)


def extract_features(backbone: torch.nn.Module, dataset: Dataset, batch_size: int = 64,
                     device: str | torch.device = "cpu", num_workers: int | None = 0,
                     precision: str = "auto", progress: bool = False,
                     desc: str = "features", skipped: set[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen backbone over a labeled dataset once.

    Args:
        backbone: a full-image backbone with `forward_features` (Swin, PVT, ViT); put in eval mode.
        dataset: yields `(image [3, H, W], class_index)`.
        batch_size, num_workers: of the DataLoader.
        device: where the backbone runs (it is moved there).
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16".
        progress: show a progress bar on stderr, labelled `desc`.
        skipped: with a `SkipUnreadable` dataset, the unreadable files left out are added here.

    Returns:
        `(features [N, C] float32, labels [N] int64)` on the CPU, in dataset order (readable
        images only). No readable image at all is a UmmaeError.
    """
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    prefix = getattr(backbone, "num_prefix_tokens", 0)  # ViT: 1 (the class token)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with training_autocast(device, precision):
            out = backbone.forward_features(images)
        return pool_features(out.float(), prefix)

    return _encode_dataset(encode, dataset, batch_size, device, num_workers, progress, desc, skipped)


def flatten_pixels(images: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` normalised images -> `[B, 3*H*W]`: the raw-pixel "features"."""
    return images.flatten(1)


@dataclass
class LabeledFeatures:
    """Cached features of a training and a validation set (what `ummae knn` / `linprobe` use)."""

    train_features: torch.Tensor  # [N_train, C]
    train_labels: torch.Tensor  # [N_train]
    val_features: torch.Tensor  # [N_val, C]
    val_labels: torch.Tensor  # [N_val]
    classes: list[str]
    cfg: object  # the checkpoint's PretrainConfig; None for raw pixels
    img_size: int
    skipped: list[str]  # unreadable images left out (sorted), train and validation
    source: str = "pretrained"  # what made the features: "pretrained", "random_init" or "raw_pixels"

    @property
    def feature_dim(self) -> int:
        return self.train_features.shape[1]


def labeled_features(checkpoint: str | Path, data: str | Path, val_data: str | Path | None = None,
                     val_fraction: float = 0.2, img_size: int | None = None, batch_size: int = 64,
                     device: str = "auto", num_workers: int | None = 0, init_random: bool = False,
                     seed: int = 0, progress: bool = False) -> LabeledFeatures:
    """Checkpoint + labeled folder(s) -> cached frozen features of the train and validation sets.

    `seed` seeds both the validation split and, with `init_random`, the initialisation.
    """
    backbone, cfg = load_frozen_backbone(checkpoint, img_size, init_random, seed)
    size = img_size or cfg.data.img_size
    train, val, classes = eval_datasets(data, val_data, val_fraction, size, seed)
    dev = resolve_device(device)
    kwargs = dict(batch_size=batch_size, device=dev, num_workers=num_workers, progress=progress)
    skipped: set[str] = set()
    train_f, train_y = extract_features(backbone, train, desc="train features", skipped=skipped, **kwargs)
    val_f, val_y = extract_features(backbone, val, desc="val features", skipped=skipped, **kwargs)
    return LabeledFeatures(train_f, train_y, val_f, val_y, list(classes), cfg, size, sorted(skipped),
                           source="random_init" if init_random else "pretrained")


def raw_pixel_features(data: str | Path, val_data: str | Path | None = None, val_fraction: float = 0.2,
                       img_size: int = 224, batch_size: int = 64, num_workers: int | None = 0, seed: int = 0,
                       progress: bool = False) -> LabeledFeatures:
    """Labeled folder(s) -> the raw-pixel baseline: each image's flattened input tensor as its "features".

    Exactly the images `labeled_features` sees: the same evaluation transform (resize + centre crop
    to `img_size`, ImageNet normalisation), the same train / validation split for the same `seed`,
    the same unreadable images left out. Each vector is `[3 * img_size * img_size]`, channel-major
    (`image.flatten()`). Whatever k-NN or a linear probe reaches on these, an encoder's features
    have to beat to show that pre-training learned something the pixels do not already hold.
    """
    train, val, classes = eval_datasets(data, val_data, val_fraction, img_size, seed)
    cpu = torch.device("cpu")  # nothing to compute: the loader's tensors are the features
    skipped: set[str] = set()
    train_f, train_y = _encode_dataset(flatten_pixels, train, batch_size, cpu, num_workers, progress,
                                       "train features", skipped)
    val_f, val_y = _encode_dataset(flatten_pixels, val, batch_size, cpu, num_workers, progress,
                                   "val features", skipped)
    return LabeledFeatures(train_f, train_y, val_f, val_y, list(classes), None, img_size, sorted(skipped),
                           source="raw_pixels")
