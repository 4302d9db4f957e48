"""Weighted k-nearest-neighbour classification of frozen features (DINO's k-NN protocol).

Caron et al., Emerging Properties in Self-Supervised Vision Transformers (DINO), ICCV 2021.

Every feature is L2-normalised, so a dot product is a cosine similarity. A query's k most
similar training features vote for their classes, each with weight `exp(sim / T)`: with the
usual T = 0.07 a neighbour at similarity 0.9 outweighs about 17 neighbours at 0.7
(exp(0.2 / 0.07) = 17.4), so a few close neighbours beat a distant majority. The class with the
highest summed weight is the prediction; the five highest give top-5.

No training, one hyper-parameter that matters (k), cheap: the standard quick check of what a
pre-training run has learned. Accuracies are percentages.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["knn_scores", "knn_evaluate", "knn_accuracy"]


def _check(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
           ks: Sequence[int], temperature: float) -> None:
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ConfigError(f"k-NN needs [N, C] training and [Q, C] query features, got "
                          f"{list(train_features.shape)} and {list(query_features.shape)}")
    if len(train_features) == 0 or len(train_labels) != len(train_features):
        raise ConfigError(f"k-NN needs one label per training feature and at least one of each, got "
                          f"{len(train_features)} features and {len(train_labels)} labels")
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"k must be a positive integer, got {list(ks)}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")


def _vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """`[Q, k]` neighbour similarities and labels -> `[Q, num_classes]` summed vote weights."""
    # exp(s / T) overflows float32 for s / T > 88 (T = 0.01); scaling a query's weights by a
    # common factor changes none of its rankings, so subtract its largest similarity first.
    weights = ((sims - sims[:, :1]) / temperature).exp()  # sims sorted: column 0 is the largest
    scores = sims.new_zeros(sims.shape[0], num_classes)
    return scores.scatter_add_(1, labels, weights)


def _neighbours(train: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int):
    """Yield `(start, sims [q, k], index [q, k])`, most similar first, `chunk_size` queries at a time.

    The full similarity matrix of ImageNet (1.28M x 50k) would not fit in memory; a chunk of
    queries against every training feature does.
    """
    for start in range(0, len(queries), chunk_size):
        sims = queries[start:start + chunk_size] @ train.T  # [q, N]
        values, index = sims.topk(k, dim=1)  # sorted, largest first
        yield start, values, index


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
               chunk_size: int = 1024) -> torch.Tensor:
    """Class scores of the weighted k-NN vote.

    Args:
        train_features: `[N, C]` (normalised here, any scale accepted).
        train_labels: `[N]` class indices.
        query_features: `[Q, C]`.
        k: neighbours per query; more than N means all N.
        temperature: T of the vote weights `exp(sim / T)`.
        num_classes: number of classes (default: largest training label + 1).
        chunk_size: queries compared with the training set at a time.

    Returns:
        `[Q, num_classes]` summed vote weights, scaled per query (only their order within a
        row means anything); the argmax is the prediction.
    """
    _check(train_features, train_labels, query_features, [k], temperature)
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(query_features.float().to(train.device), dim=1)
    labels = train_labels.to(train.device).long()
    k = min(int(k), len(train))
    scores = []
    for _, sims, index in _neighbours(train, queries, k, chunk_size):
        scores.append(_vote(sims, labels[index], num_classes, temperature))
    return torch.cat(scores) if scores else queries.new_zeros(0, num_classes)


def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> dict[int, dict[str, float | None]]:
    """Top-1 / top-5 accuracy of the weighted k-NN vote for several k in one pass.

    The neighbours are searched once for the largest k; each smaller k votes with the first k
    of them (they come sorted), so a sweep costs about one evaluation.

    Args:
        train_features, train_labels: `[N, C]`, `[N]` the labeled reference set.
        val_features, val_labels: `[Q, C]`, `[Q]` the set to classify.
        ks: the k values (each more than N means all N).
        temperature, num_classes, chunk_size: as in `knn_scores`.

    Returns:
        `{k: {"top1": %, "top5": % or None}}`; top-5 is None with fewer than 5 classes.
    """
    _check(train_features, train_labels, val_features, ks, temperature)
    if len(val_labels) != len(val_features) or len(val_features) == 0:
        raise ConfigError(f"k-NN needs at least one validation feature and one label per feature, got "
                          f"{len(val_features)} features and {len(val_labels)} labels")
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    train = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(val_features.float().to(train.device), dim=1)
    labels = train_labels.to(train.device).long()
    targets = val_labels.to(train.device).long()
    ranks = min(5, num_classes)
    k_max = min(max(int(k) for k in ks), len(train))
    correct = {int(k): torch.zeros(2, dtype=torch.long) for k in ks}  # [top-1, top-5] hits
    for start, sims, index in _neighbours(train, queries, k_max, chunk_size):
        truth = targets[start:start + len(sims), None]  # [q, 1]
        for k in correct:
            n = min(k, k_max)
            scores = _vote(sims[:, :n], labels[index[:, :n]], num_classes, temperature)
            hits = scores.topk(ranks, dim=1).indices == truth  # [q, ranks]
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).cpu()
    total = len(queries)
    return {k: {"top1": 100.0 * int(c[0]) / total,
                "top5": 100.0 * int(c[1]) / total if num_classes >= 5 else None}
            for k, c in correct.items()}


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[str, float | None]:
    """`{"top1": %, "top5": % or None}` of the weighted k-NN vote (see `knn_evaluate`)."""
    return knn_evaluate(train_features, train_labels, val_features, val_labels, (k,), temperature,
                        num_classes)[int(k)]
