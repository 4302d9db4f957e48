"""Optimiser and schedule: lengths, warm-up + cosine shape, weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from ummae.engine.optim import build_optimizer, build_scheduler, schedule_lengths
from ummae.models import build_pretrain_model

# ---------------------------------------------------------------- schedule_lengths


@pytest.mark.parametrize("steps_per_epoch, epochs, warmup_epochs, max_steps, expected", [
    (10, 5, 1.0, None, (50, 10)),       # epochs decide the length
    (10, 5, 0.5, None, (50, 5)),        # fractional warm-up epochs
    (10, 5, 0.0, None, (50, 0)),        # no warm-up
    (10, 5, 1.0, 30, (30, 10)),         # max_steps caps epochs * steps_per_epoch
    (10, 5, 1.0, 200, (50, 10)),        # ... and never makes the run longer (#13: a cap, not a replacement)
    (10, 5, 1.0, 7, (7, 6)),            # warm-up clipped: one update follows it
    (10, 5, 10.0, None, (50, 49)),      # warm-up longer than the run, clipped
    (10, 5, 1.0, 1, (1, 0)),            # a single update has no warm-up
    (2, 12, 1.0, 3, (3, 2)),            # the tiny test run
])
def test_schedule_lengths(steps_per_epoch, epochs, warmup_epochs, max_steps, expected):
    assert schedule_lengths(steps_per_epoch, epochs, warmup_epochs, max_steps) == expected


def test_schedule_lengths_always_leave_an_update_after_warmup():
    for spe in (1, 3, 10):
        for epochs in (1, 2, 5):
            for warmup in (0.0, 0.3, 1.0, 4.0, 100.0):
                for max_steps in (None, 1, 2, 5, 40):
                    total, warm = schedule_lengths(spe, epochs, warmup, max_steps)
                    assert total >= 1 and 0 <= warm < total


# ---------------------------------------------------------------- scheduler


def lr_curve(total: int, warmup: int, peak: float, min_lr: float) -> list[float]:
    """lr after `u` optimizer updates, for u = 0..total (index u), on a dummy 2-group optimizer."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.0}, {"params": [b]}], lr=peak)
    sched = build_scheduler(opt, total, warmup, min_lr)
    lrs = [opt.param_groups[0]["lr"]]
    for update in range(1, total + 1):
        opt.step()
        sched.step_update(update)
        assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"]
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("total, warmup, min_lr", [(40, 10, 0.0), (40, 10, 1e-5), (25, 1, 0.0), (7, 6, 1e-6)])
def test_warmup_then_cosine_to_min_lr(total, warmup, min_lr):
    peak = 1e-3
    lrs = lr_curve(total, warmup, peak, min_lr)
    assert lrs[0] == 0.0
    for u in range(warmup + 1):  # linear rise
        assert lrs[u] == pytest.approx(peak * u / warmup, rel=1e-9, abs=1e-15)
    if min_lr == 0.0:
        assert lrs[warmup] == peak  # exactly the peak at the end of warm-up
    else:
        assert lrs[warmup] == pytest.approx(peak, rel=1e-12)
    assert max(lrs) == pytest.approx(peak, rel=1e-12)
    after = lrs[warmup:]
    assert all(later < earlier for earlier, later in zip(after, after[1:]))  # strictly decreasing
    assert lrs[total] == pytest.approx(min_lr, abs=1e-15)
    # half-cosine in between
    mid = warmup + (total - warmup) / 2
    if float(mid).is_integer():
        assert lrs[int(mid)] == pytest.approx(min_lr + 0.5 * (peak - min_lr), rel=1e-9)


def test_cosine_follows_the_formula():
    total, warmup, peak, min_lr = 30, 5, 2e-3, 1e-4
    lrs = lr_curve(total, warmup, peak, min_lr)
    for u in range(warmup, total + 1):
        t = (u - warmup) / (total - warmup)
        assert lrs[u] == pytest.approx(min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t)), rel=1e-9)


def test_no_warmup_starts_at_the_peak():
    lrs = lr_curve(10, 0, 1e-3, 0.0)
    assert lrs[0] == 1e-3
    assert lrs[10] == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------- build_optimizer


def test_weight_decay_groups_of_the_ummae_model(tiny_config):
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_config)
    wd = 0.07
    opt = build_optimizer(model, lr=1e-3, weight_decay=wd, betas=(0.8, 0.9))

    group_of = {}
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.9)
        assert group["lr"] == 1e-3
        for p in group["params"]:
            assert id(p) not in group_of, "parameter in two groups"
            group_of[id(p)] = group["weight_decay"]
    named = dict(model.named_parameters())
    assert len(group_of) == len(named)  # every trainable parameter exactly once
    assert set(group_of) == {id(p) for p in named.values()}

    for name in ("encoder.mask_token", "decoder.mask_token"):
        assert named[name].ndim >= 2  # so they are undecayed by name, not by shape
        assert group_of[id(named[name])] == 0.0, name

    n_bias = n_norm = n_linear = 0
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert group_of[id(module.weight)] == 0.0, mod_name
            n_norm += 1
        if isinstance(module, torch.nn.Linear):
            assert group_of[id(module.weight)] == wd, mod_name
            n_linear += 1
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
            assert group_of[id(module.bias)] == 0.0, mod_name
            n_bias += 1
    assert n_norm >= 5 and n_linear >= 10 and n_bias >= 10
    conv = model.encoder.patch_embed.proj
    assert isinstance(conv, torch.nn.Conv2d) and group_of[id(conv.weight)] == wd


def test_frozen_parameters_are_not_optimised(tiny_config):
    model = build_pretrain_model(tiny_config)
    model.encoder.patch_embed.proj.weight.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.encoder.patch_embed.proj.weight) not in in_groups
    assert len(in_groups) == sum(1 for p in model.parameters() if p.requires_grad)
