"""Labeled image folders (`DIR/<class>/*.jpg`) for fine-tuning and evaluation.

torchvision's `ImageFolder` does the walking and labelling; images are decoded with
`load_rgb`, so every mode the pre-training data accepts works here too. A validation set is
either a second folder with the same classes or a seeded, stratified split of the training one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from ..errors import UmmaeError
from .folder import IMAGE_EXTENSIONS, load_rgb

__all__ = ["labeled_folder", "stratified_split", "train_val_datasets"]


def labeled_folder(root: str | os.PathLike, transform=None) -> ImageFolder:
    """`DIR/<class>/...` images as `(image, class_index)`; classes sorted by folder name."""
    root = Path(root)
    if not root.is_dir():
        raise UmmaeError(f"labeled data directory '{root}' does not exist")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb,
                           is_valid_file=lambda p: Path(p).suffix.lower() in IMAGE_EXTENSIONS
                           and not Path(p).name.startswith("."))
    except (FileNotFoundError, RuntimeError) as e:
        raise UmmaeError(f"'{root}' is not a folder of class folders with images "
                         f"(DIR/<class>/*.jpg): {str(e).splitlines()[0]}") from None


def stratified_split(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices `(train, val)`: `val_fraction` of every class (at least one per class) held out."""
    if not 0 < val_fraction < 1:
        raise UmmaeError(f"validation fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, val = [], []
    for cls in sorted(by_class):
        idx = by_class[cls]
        order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val += order[:n_val]
        train += order[n_val:]
    return sorted(train), sorted(val)


def train_val_datasets(train_dir: str | os.PathLike, val_dir: str | os.PathLike | None,
                       train_transform, val_transform, val_fraction: float = 0.1, seed: int = 0):
    """`(train, val, class_names)`: from two folders, or one folder split (stratified, seeded)."""
    train_full = labeled_folder(train_dir, train_transform)
    if val_dir is not None:
        val = labeled_folder(val_dir, val_transform)
        if val.classes != train_full.classes:
            raise UmmaeError(f"validation classes {val.classes[:5]}... differ from training classes "
                             f"{train_full.classes[:5]}...")
        return train_full, val, train_full.classes
    train_idx, val_idx = stratified_split(train_full.targets, val_fraction, seed)
    val_full = labeled_folder(train_dir, val_transform)  # same files, evaluation transform
    return Subset(train_full, train_idx), Subset(val_full, val_idx), train_full.classes
