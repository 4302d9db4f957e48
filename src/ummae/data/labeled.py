"""Labeled image folders (`DIR/<class>/*.jpg`) for fine-tuning and evaluation.

torchvision's `ImageFolder` does the walking and labelling; images are decoded with
`load_rgb`, so every mode the pre-training data accepts works here too. A validation set is
either a second folder with the same classes or a seeded, stratified split of the training one.

Unreadable images follow the pre-training policy (skip, count, report; fail only when nothing
can be read): `SkipUnreadable` wraps a labeled dataset, and `collate_skipping` carries the files
passed over with each batch, so the main process can count them across DataLoader workers.
A training set replaces an unreadable image by the next readable one of the same set (the batch
stays full, as in pre-training); an evaluation set drops it (so no image is counted twice).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, default_collate
from torchvision.datasets import ImageFolder

from ..errors import UmmaeError
from .folder import IMAGE_EXTENSIONS, load_rgb

__all__ = ["labeled_folder", "stratified_split", "train_val_datasets", "SkipUnreadable", "collate_skipping",
           "require_two_classes", "write_skipped"]


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


def require_two_classes(root: str | os.PathLike, classes: list[str]) -> None:
    """Classification needs at least two classes: one class makes every accuracy a trivial 100%."""
    if len(classes) < 2:
        found = f"only the class folder '{classes[0]}'" if classes else "no class folder"
        raise UmmaeError(f"'{root}' has {found}; classification needs at least 2 class folders "
                         "(DIR/<class>/*.jpg)")


def _sample_path(dataset, index: int) -> str:
    """The file behind `dataset[index]` of an `ImageFolder` or a `Subset` of one."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return str(dataset.samples[index][0])


class SkipUnreadable(Dataset):
    """A labeled dataset whose unreadable images are skipped instead of stopping the run.

    `self[i]` is `(image, label, passed_over)`, `passed_over` a tuple of the files skipped for it.
    With `replace=True` (training) an unreadable image is replaced by the next readable one of
    this dataset (i+1, i+2, ..., wrapping around) with its own label; with `replace=False`
    (evaluation) the sample is `(None, -1, (file,))` and `collate_skipping` drops it. Each process
    warns once per bad file; `self.skipped` is per process (see `ImageFolderUnlabeled`).
    """

    def __init__(self, dataset, replace: bool) -> None:
        self.dataset, self.replace = dataset, replace
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        n = len(self.dataset)
        passed_over: list[str] = []
        for offset in range(n if self.replace else 1):
            position = (index + offset) % n
            path = _sample_path(self.dataset, position)
            if path in self.skipped:
                passed_over.append(path)
                continue
            try:
                image, label = self.dataset[position]
            except UmmaeError as err:
                self.skipped.add(path)
                passed_over.append(path)
                warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
                continue
            return image, label, tuple(passed_over)
        if self.replace:
            raise UmmaeError(f"none of the {n} images of the training set could be read")
        return None, -1, tuple(passed_over)


def collate_skipping(batch: list[tuple]):
    """DataLoader `collate_fn` for `SkipUnreadable`: `(images or None, labels or None, skipped files)`."""
    skipped = [path for _, _, passed in batch for path in passed]
    kept = [(image, label) for image, label, _ in batch if image is not None]
    if not kept:
        return None, None, skipped
    images, labels = default_collate(kept)
    return images, labels, skipped


def write_skipped(folder: str | os.PathLike, paths) -> Path:
    """Write the sorted unreadable files to `folder/skipped_images.txt`, one a line; its path."""
    listing = Path(folder) / "skipped_images.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{p}\n" for p in sorted(paths)), encoding="utf-8")
    return listing
