"""Few labels: evaluate frozen features with only N labeled training images per class.

Pre-training is meant to pay off most where labels are scarce, so the frozen-feature protocols
(`knn.py`, `linprobe.py`) are also run on small labeled subsets: each *draw* keeps N training
images of every class (a stratified random subset), trains / votes with those only, and is
scored on the full validation set. One subset is a noisy estimate, so several draws are made and
reported with their mean, min and max.

The features are computed once (`features.py`); a draw only indexes the cached training
tensors. Draw `d` is seeded by `(seed, d)` alone (`seed_for`), so any draw is reproducible on
its own and does not depend on how many draws were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..data.sampling import seed_for
from ..errors import ConfigError

__all__ = ["per_class_subset", "draw_generator", "FewLabelDraw", "few_label", "summarize"]


def per_class_subset(labels: torch.Tensor, n: int, generator: torch.Generator,
                     classes: Sequence[str] | None = None) -> torch.Tensor:
    """Indices of a stratified random subset: exactly `n` samples of every class.

    Args:
        labels: `[N]` class indices.
        n: samples kept per class.
        generator: the draw's random source (`draw_generator`).
        classes: class names, index = label (every class must be present); default: the labels
            0 .. max(labels). Only used to check that every class has `n` samples and to name
            the one that has not.

    Returns:
        `[num_classes * n]` int64 indices into `labels`, sorted.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if n < 1:
        raise ConfigError(f"labels per class must be >= 1, got {n}")
    if len(labels) == 0:
        raise ConfigError("no training labels to draw a subset from")
    num_classes = len(classes) if classes is not None else int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=num_classes)  # [num_classes]
    smallest = int(counts.argmin())
    if counts[smallest] < n:
        name = classes[smallest] if classes is not None else smallest
        raise ConfigError(f"{n} labels per class asked, but class '{name}' has only "
                          f"{int(counts[smallest])} training image(s)")
    picked = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()  # [count_c]
        picked.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(picked).sort().values


def draw_generator(seed: int, draw: int) -> torch.Generator:
    """The random source of few-label draw `draw` under run seed `seed`."""
    return torch.Generator().manual_seed(seed_for(seed, "few-label", draw))


@dataclass
class FewLabelDraw:
    """One draw: its number (0-based), the training indices it kept and what `evaluate` returned."""

    draw: int
    indices: torch.Tensor  # [num_classes * n] into the full training set
    result: Any


def few_label(train_features: torch.Tensor, train_labels: torch.Tensor, n: int, draws: int, seed: int,
              evaluate: Callable[[torch.Tensor, torch.Tensor], Any],
              classes: Sequence[str] | None = None) -> list[FewLabelDraw]:
    """Run `evaluate(train_features[idx], train_labels[idx])` on `draws` stratified subsets.

    Args:
        train_features, train_labels: `[N, C]`, `[N]` the cached features of the full training set.
        n: labeled images kept per class in every draw.
        draws: how many subsets.
        seed: draw `d` uses `draw_generator(seed, d)`.
        evaluate: scores one subset on the (full, fixed) validation set, e.g. a k-NN or a linear
            probe closed over the validation features.
        classes: class names (see `per_class_subset`).

    Returns:
        one `FewLabelDraw` per draw, in order.
    """
    if draws < 1:
        raise ConfigError(f"the number of draws must be >= 1, got {draws}")
    out = []
    for d in range(draws):
        idx = per_class_subset(train_labels, n, draw_generator(seed, d), classes)
        out.append(FewLabelDraw(d, idx, evaluate(train_features[idx.to(train_features.device)],
                                                 train_labels[idx.to(train_labels.device)])))
    return out


def summarize(values: Sequence[float | None]) -> dict[str, float] | None:
    """`{"mean", "min", "max"}` of the draws' values; None when the values are None (e.g. top-5
    with fewer than 5 classes)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
