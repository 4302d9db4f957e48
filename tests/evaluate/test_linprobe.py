"""The linear probe: MAE's head, its schedule, and learning a linearly separable toy problem."""

from __future__ import annotations

import pytest
import torch

from ummae.errors import ConfigError
from ummae.evaluate.linprobe import LinearProbeHead, linear_probe


def separable(n_per_class: int, seed: int):
    """3 classes in 16-d, separable by a linear map, with channels of very different scales."""
    g = torch.Generator().manual_seed(seed)
    centres = 8.0 * torch.eye(3)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    x = torch.randn(len(labels), 16, generator=g)
    x[:, :3] += centres[labels]
    # MAE features differ in scale per channel by orders of magnitude; the BatchNorm copes.
    scale = torch.logspace(-2, 2, 16)
    return x * scale + 5.0, labels


def test_head_is_batchnorm_without_affine_then_linear_initialised_as_mae():
    head = LinearProbeHead(256, 100)
    assert isinstance(head.norm, torch.nn.BatchNorm1d)
    assert head.norm.affine is False and head.norm.weight is None and head.norm.bias is None
    assert head.norm.eps == 1e-6
    assert {name for name, _ in head.named_parameters()} == {"fc.weight", "fc.bias"}
    assert head.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(head.fc.bias, torch.zeros(100))
    assert head(torch.randn(4, 256)).shape == (4, 100)


def test_linear_probe_learns_a_linearly_separable_problem():
    train_x, train_y = separable(40, seed=0)
    val_x, val_y = separable(20, seed=1)
    seen = []
    result = linear_probe(train_x, train_y, val_x, val_y, epochs=20, blr=0.1, batch_size=32,
                          warmup_epochs=2, on_epoch=seen.append)
    assert [r["epoch"] for r in result.history] == list(range(1, 21))
    assert seen == result.history
    assert set(result.final) == {"epoch", "lr", "loss", "top1", "top5"}
    assert result.final["top5"] is None  # 3 classes
    assert result.final["top1"] == 100.0 and result.best_top1 == 100.0
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert not result.head.training and result.head.fc.weight.device.type == "cpu"


def test_lr_scales_with_the_batch_warms_up_and_decays_to_zero():
    train_x, train_y = separable(40, seed=0)  # 120 features
    result = linear_probe(train_x, train_y, train_x, train_y, epochs=10, blr=0.1, batch_size=64,
                          warmup_epochs=3)
    assert result.batch_size == 64 and result.lr == pytest.approx(0.1 * 64 / 256)
    lrs = [r["lr"] for r in result.history]  # one step per epoch: 120 // 64 (incomplete batch dropped)
    assert lrs[0] == 0.0 and lrs[:4] == sorted(lrs[:4]) and max(lrs) == pytest.approx(result.lr)
    assert lrs[3:] == sorted(lrs[3:], reverse=True) and lrs[-1] < 0.1 * result.lr
    # A batch larger than the training set is the whole set, and the lr follows the real batch.
    small = linear_probe(train_x[:10], train_y[:10], train_x, train_y, epochs=1, batch_size=256)
    assert small.batch_size == 10 and small.lr == pytest.approx(0.1 * 10 / 256)


def test_seeded_runs_repeat_and_leave_the_global_rng_alone():
    train_x, train_y = separable(10, seed=0)
    state = torch.get_rng_state()
    a = linear_probe(train_x, train_y, train_x, train_y, epochs=3, batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = linear_probe(train_x, train_y, train_x, train_y, epochs=3, batch_size=8, seed=3)
    assert a.history == b.history
    assert torch.equal(a.head.fc.weight, b.head.fc.weight)


def test_too_few_features_is_a_config_error():
    with pytest.raises(ConfigError):
        linear_probe(torch.randn(1, 4), torch.zeros(1, dtype=torch.long), torch.randn(1, 4),
                     torch.zeros(1, dtype=torch.long))
