"""Few-label draws: stratified, reproducible from the seed, refused when a class is too small."""

from __future__ import annotations

import pytest
import torch

from ummae.errors import ConfigError
from ummae.evaluate.few_label import draw_generator, few_label, per_class_subset, summarize

# 3 classes of unequal size (7, 4 and 9 samples), interleaved as a real folder's labels are not.
LABELS = torch.tensor([0, 2, 1, 0, 2, 2, 0, 1, 2, 0, 0, 2, 1, 2, 0, 2, 1, 0, 2, 2])
CLASSES = ["ant", "bee", "cat"]


@pytest.mark.parametrize("n", [1, 3, 4])
def test_subset_holds_exactly_n_distinct_samples_of_every_class(n):
    idx = per_class_subset(LABELS, n, draw_generator(0, 0), CLASSES)
    assert idx.dtype == torch.long and torch.equal(idx, idx.sort().values)
    assert len(idx.unique()) == len(idx) == 3 * n
    assert torch.bincount(LABELS[idx], minlength=3).tolist() == [n, n, n]


def test_draws_are_reproducible_from_the_seed_and_differ_from_each_other():
    def draw(seed, d):
        return per_class_subset(LABELS, 2, draw_generator(seed, d), CLASSES)

    assert torch.equal(draw(0, 1), draw(0, 1))  # same (seed, draw): same subset
    subsets = [draw(0, d) for d in range(5)]
    assert len({tuple(s.tolist()) for s in subsets}) == 5  # five draws, five different subsets
    assert not torch.equal(draw(0, 0), draw(1, 0))  # another seed, another subset


def test_taking_every_sample_of_the_smallest_class_is_allowed_and_one_more_is_refused():
    idx = per_class_subset(LABELS, 4, draw_generator(0, 0), CLASSES)
    assert sorted(idx[LABELS[idx] == 1].tolist()) == (LABELS == 1).nonzero().flatten().tolist()
    with pytest.raises(ConfigError, match="class 'bee' has only 4 training image") as info:
        per_class_subset(LABELS, 5, draw_generator(0, 0), CLASSES)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=">= 1"):
        per_class_subset(LABELS, 0, draw_generator(0, 0), CLASSES)


def test_a_class_without_training_samples_is_named():
    with pytest.raises(ConfigError, match="class 'dog' has only 0"):
        per_class_subset(LABELS, 1, draw_generator(0, 0), [*CLASSES, "dog"])


def test_few_label_evaluates_every_draw_on_its_subset_only():
    features = torch.arange(len(LABELS), dtype=torch.float32)[:, None].expand(-1, 2)  # row i holds i
    seen = []

    def evaluate(x, y):
        seen.append((x, y))
        return float(x[:, 0].sum())

    draws = few_label(features, LABELS, 2, 3, seed=7, evaluate=evaluate, classes=CLASSES)
    assert [d.draw for d in draws] == [0, 1, 2] and len(seen) == 3
    for d, (x, y) in zip(draws, seen):
        assert torch.equal(x[:, 0].long(), d.indices) and torch.equal(y, LABELS[d.indices])
        assert d.result == float(d.indices.sum())
        assert torch.equal(d.indices, per_class_subset(LABELS, 2, draw_generator(7, d.draw), CLASSES))
    # Draw d does not depend on how many draws were asked for.
    more = few_label(features, LABELS, 2, 5, seed=7, evaluate=lambda x, y: None, classes=CLASSES)
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(draws, more))
    with pytest.raises(ConfigError, match="draws"):
        few_label(features, LABELS, 2, 0, seed=7, evaluate=evaluate)


def test_summarize_gives_mean_min_max_and_none_for_missing_values():
    assert summarize([90.0, 80.0, 100.0]) == {"mean": 90.0, "min": 80.0, "max": 100.0}
    assert summarize([None, None]) is None
