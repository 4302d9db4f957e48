"""Weighted k-NN on hand-made features whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from ummae.errors import ConfigError
from ummae.evaluate.knn import knn_accuracy, knn_evaluate, knn_scores


def clusters(n_per_class: int, centres: torch.Tensor, noise: float, seed: int):
    """`n_per_class` noisy points around each row of `centres`: `([n*K, C], [n*K])`."""
    g = torch.Generator().manual_seed(seed)
    k, c = centres.shape
    labels = torch.arange(k).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), c, generator=g), labels


def test_two_clusters_are_classified_perfectly_whatever_the_feature_scale():
    centres = torch.eye(2, 8) * 3
    train_x, train_y = clusters(10, centres, 0.3, seed=0)
    val_x, val_y = clusters(5, centres, 0.3, seed=1)
    assert knn_accuracy(train_x, train_y, val_x, val_y, k=5) == {"top1": 100.0, "top5": None}
    # Cosine similarity: the length of a feature vector does not matter.
    assert knn_accuracy(train_x * 1000, train_y, val_x / 1000, val_y, k=5)["top1"] == 100.0


def test_temperature_weighting_lets_close_neighbours_outvote_a_distant_majority():
    query = torch.tensor([[1.0, 0.0]])
    # Two class-0 neighbours at cosine similarity 0.5, one class-1 neighbour at 0.99.
    train = torch.tensor([[0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)], [0.99, math.sqrt(1 - 0.99**2)]])
    labels = torch.tensor([0, 0, 1])
    # T = 0.07: exp(0.99/0.07) > 2 exp(0.5/0.07) (ratio about 550), so class 1 wins.
    weighted = knn_scores(train, labels, query, k=3, temperature=0.07)
    assert weighted.argmax(dim=1).item() == 1
    # A huge T makes every weight about 1: a plain majority vote, class 0 wins.
    majority = knn_scores(train, labels, query, k=3, temperature=1e4)
    assert majority.argmax(dim=1).item() == 0
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.07)["top1"] == 100.0
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=1e4)["top1"] == 0.0
    # With k = 1 only the nearest votes, whatever T.
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=1, temperature=1e4)["top1"] == 100.0


def test_vote_weights_are_exp_sim_over_t_up_to_a_common_factor():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.2]])
    scores = knn_scores(train, labels, query, k=3, temperature=0.5)
    sims = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(query, dim=1).T
    w = (sims.squeeze(1) / 0.5).exp()
    expected = torch.stack([w[0], w[1] + w[2]])
    assert torch.allclose(scores[0] / scores[0].sum(), expected / expected.sum(), atol=1e-6)


def test_a_tiny_temperature_does_not_overflow():
    centres = torch.eye(3, 4)
    train_x, train_y = clusters(4, centres, 0.1, seed=0)
    scores = knn_scores(train_x, train_y, train_x, k=5, temperature=1e-3)
    assert torch.isfinite(scores).all()
    assert knn_accuracy(train_x, train_y, train_x, train_y, k=5, temperature=1e-3)["top1"] == 100.0


def test_several_k_in_one_pass_match_one_k_at_a_time_and_k_beyond_n_means_all():
    centres = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    train_x, train_y = clusters(6, centres, 1.2, seed=1)  # overlapping: accuracies differ with k
    val_x, val_y = clusters(4, centres, 1.2, seed=2)
    sweep = knn_evaluate(train_x, train_y, val_x, val_y, ks=(1, 5, 20, 1000), chunk_size=7)
    for k in (1, 5, 20):
        assert sweep[k] == knn_accuracy(train_x, train_y, val_x, val_y, k=k)
    assert sweep[1000] == knn_accuracy(train_x, train_y, val_x, val_y, k=len(train_x))
    for result in sweep.values():  # 6 classes: top-5 is reported and never below top-1
        assert result["top5"] is not None and result["top5"] >= result["top1"]


def test_top5_counts_the_true_class_among_the_five_best():
    # The query sits on class 0's point; class 5 (its label) is the 2nd nearest: top-1 miss, top-5 hit.
    train = torch.eye(6)
    labels = torch.arange(6)
    query = torch.tensor([[1.0, 0, 0, 0, 0, 0.5]])
    result = knn_accuracy(train, labels, query, torch.tensor([5]), k=6)
    assert result == {"top1": 0.0, "top5": 100.0}


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(temperature=0.0)])
def test_bad_k_or_temperature_is_a_config_error(kwargs):
    x, y = torch.eye(2), torch.arange(2)
    with pytest.raises(ConfigError):
        knn_accuracy(x, y, x, y, **kwargs)
