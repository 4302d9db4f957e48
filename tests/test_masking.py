"""Tests for `ummae.masking`: uniform sampling, secondary masking, random sampling, checks.

The statistical tests are deterministic (seeded generators) and each comes with a negative
control: the same statistic, applied to a deliberately flawed sampler with the same sample size,
must exceed the critical value, so a passing test means the check has power, not that it is blind.
"""

from __future__ import annotations

import math

import pytest
import torch

from ummae.errors import ConfigError, UmmaeError
from ummae.masking import (
    MaskSample,
    RandomMasking,
    UniformMasking,
    check_uniform,
    uniform_ids_keep,
)

# Upper 0.001 quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, dof)).
CHI2_CRIT_0001 = {3: 16.266, 9: 27.877, 63: 103.442}

GRIDS = [(2, 2), (4, 6), (6, 4), (14, 14), (16, 16)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- helpers (independent of the code)


def _blocks(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Visible flags per block, `[B, h/2, w/2, 4]`, last axis = position (dr, dc) row-major."""
    h, w = grid
    visible = (~mask).reshape(-1, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4)
    return visible.reshape(-1, h // 2, w // 2, 4)


def _kept_positions(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Within-block position (0..3) of the kept unit, `[B, h/2, w/2]`; requires a uniform mask."""
    blocks = _blocks(mask, grid)
    assert bool((blocks.sum(-1) == 1).all()), "mask is not uniform"
    return (blocks.long() * torch.arange(4)).sum(-1)


def _visible_set(mask: torch.Tensor, b: int) -> set[int]:
    return set((~mask[b]).nonzero().flatten().tolist())


def chi_square_gof(counts: torch.Tensor, probs: torch.Tensor | None = None) -> float:
    """Pearson's goodness-of-fit statistic of `counts` against `probs` (uniform if None)."""
    counts = counts.double().flatten()
    n = counts.sum()
    if probs is None:
        expected = torch.full_like(counts, float(n) / counts.numel())
    else:
        expected = probs.double().flatten() * n
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_independence(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Pearson's statistic of independence for paired categorical draws `a`, `b` in `0..k-1`."""
    table = torch.zeros(k, k, dtype=torch.float64)
    table.index_put_((a.flatten(), b.flatten()), torch.ones(a.numel(), dtype=torch.float64),
                     accumulate=True)
    n = table.sum()
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / n
    return float(((table - expected) ** 2 / expected).sum())


def kept_position_statistic(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Chi-square of the kept unit's within-block position against uniform (3 dof)."""
    pos = _kept_positions(mask, grid)
    return chi_square_gof(torch.bincount(pos.flatten(), minlength=4))


def secondary_position_statistic(sample: MaskSample) -> float:
    """Chi-square of how often each compact-grid position is secondary-masked (L/4 - 1 dof).

    Every visible unit sits at one compact position (its block), so under uniform secondary
    masking every block is chosen equally often.
    """
    h, w = sample.grid_size
    # `_blocks` reads "not masked"; passing ~secondary makes it read "secondary".
    per_block = _blocks(~sample.secondary, (h, w)).sum(-1)  # [B, hb, wb]
    return chi_square_gof(per_block.sum(0))


def cross_sample_statistic(masks: list[torch.Tensor], grid: tuple[int, int]) -> float:
    """Independence chi-square (9 dof) of sample 0's vs sample 1's kept positions, all blocks."""
    a = torch.cat([_kept_positions(m, grid)[0].flatten() for m in masks])
    b = torch.cat([_kept_positions(m, grid)[1].flatten() for m in masks])
    return chi_square_independence(a, b, 4)


def test_chi_square_helpers_on_known_values():
    assert chi_square_gof(torch.tensor([25, 25, 25, 25])) == 0.0
    # (30-25)^2/25 + 3 * ... : 1 + 1 + 0 + 0
    assert chi_square_gof(torch.tensor([30, 20, 25, 25])) == pytest.approx(2.0)
    assert chi_square_gof(torch.tensor([10, 30]), torch.tensor([0.25, 0.75])) == 0.0
    a = torch.tensor([0, 0, 1, 1])
    assert chi_square_independence(a, torch.tensor([0, 1, 0, 1]), 2) == 0.0
    assert chi_square_independence(a, a, 2) == pytest.approx(4.0)


# ---------------------------------------------------------------- uniform sampling: exact structure


@pytest.mark.parametrize("grid", GRIDS)
def test_uniform_keeps_exactly_one_unit_per_block(grid):
    m = UniformMasking(grid)(32, generator=_gen(0))
    h, w = grid
    assert m.mask.shape == (32, h * w) and m.mask.dtype == torch.bool
    assert bool((_blocks(m.mask, grid).sum(-1) == 1).all())


@pytest.mark.parametrize("grid", GRIDS)
def test_uniform_masks_exactly_three_quarters_per_row(grid):
    h, w = grid
    m = UniformMasking(grid)(32, generator=_gen(1))
    assert m.mask.sum(1).tolist() == [3 * h * w // 4] * 32
    assert UniformMasking.mask_ratio == 0.75


@pytest.mark.parametrize("grid", [(4, 6), (14, 14), (16, 16)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_secondary_count_is_exact_per_row(grid, ratio):
    h, w = grid
    m = UniformMasking(grid, secondary_ratio=ratio)(16, generator=_gen(2))
    assert m.secondary is not None and m.secondary.shape == (16, h * w)
    assert m.secondary.dtype == torch.bool
    expected = int(round(ratio * h * w / 4))
    assert m.secondary.sum(1).tolist() == [expected] * 16


# (grid, ratio) -> (round, official): ViT-B at 224 px (14x14 units, 49 visible) is where the
# official code hides 13 (it keeps int(36.75) = 36); the paper's 256 px pyramids agree (16).
@pytest.mark.parametrize("grid, counts", [((14, 14), (12, 13)), ((16, 16), (16, 16))])
def test_secondary_rounding_official_matches_the_official_count(grid, counts):
    for rounding, expected in zip(("round", "official"), counts):
        masking = UniformMasking(grid, secondary_ratio=0.25, secondary_rounding=rounding)
        assert masking.num_secondary == expected
        m = masking(4, generator=_gen(2))
        assert m.secondary.sum(1).tolist() == [expected] * 4
    with pytest.raises(ConfigError, match="secondary_rounding"):
        UniformMasking(grid, secondary_rounding="floor")


def test_secondary_rounding_is_a_config_option_the_model_follows(tiny_config):
    from ummae.config import validate
    from ummae.models.specs import build_pretrain_model

    cfg = tiny_config
    assert cfg.masking.secondary_rounding == "round"  # default unchanged
    cfg.data.img_size, cfg.masking.unit_size = 112, 8  # 14x14 units: 49 visible, 12.25 hidden
    assert build_pretrain_model(cfg).masking.num_secondary == 12
    cfg.masking.secondary_rounding = "official"
    assert build_pretrain_model(validate(cfg)).masking.num_secondary == 13
    cfg.masking.secondary_rounding = "nearest"
    with pytest.raises(ConfigError, match="masking.secondary_rounding must be round or official"):
        validate(cfg)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_secondary_is_a_subset_of_the_visible_units(ratio):
    m = UniformMasking((16, 16), secondary_ratio=ratio)(64, generator=_gen(3))
    assert not bool((m.secondary & m.mask).any())


@pytest.mark.parametrize("grid", GRIDS)
def test_ids_keep_is_in_block_row_major_order(grid):
    """`ids_keep[:, k]` must be the visible unit of block k: the compact image relies on it."""
    h, w = grid
    hb, wb = h // 2, w // 2
    m = UniformMasking(grid)(16, generator=_gen(4))
    assert m.ids_keep.shape == (16, hb * wb) and m.ids_keep.dtype == torch.long
    k = torch.arange(hb * wb)
    rows, cols = m.ids_keep // w, m.ids_keep % w
    assert torch.equal(rows // 2, (k // wb).expand(16, -1))
    assert torch.equal(cols // 2, (k % wb).expand(16, -1))


@pytest.mark.parametrize("grid", GRIDS)
def test_ids_keep_equals_the_visible_set(grid):
    m = UniformMasking(grid)(16, generator=_gen(5))
    for b in range(16):
        assert set(m.ids_keep[b].tolist()) == _visible_set(m.mask, b)
    assert m.grid_size == grid


@pytest.mark.parametrize("grid", GRIDS)
def test_uniform_ids_keep_reproduces_ids_keep(grid):
    m = UniformMasking(grid)(16, generator=_gen(6))
    assert torch.equal(uniform_ids_keep(m.mask, grid), m.ids_keep)


def test_uniform_accepts_an_int_grid():
    m = UniformMasking(8)(4, generator=_gen(7))
    assert m.grid_size == (8, 8) and m.mask.shape == (4, 64) and m.ids_keep.shape == (4, 16)


# ---------------------------------------------------------------- uniform sampling: statistics


def _biased_randint(probs: torch.Tensor):
    """A `torch.randint` stand-in whose draws in 0..3 follow `probs` instead of uniform."""
    original = torch.randint
    calls = []

    def randint(low, high, size, *, generator=None, device=None, **kwargs):
        if (low, high) != (0, 4):
            return original(low, high, size, generator=generator, device=device, **kwargs)
        calls.append(size)
        n = math.prod(size)
        draws = torch.multinomial(probs, n, replacement=True, generator=generator)
        return draws.reshape(size).to(device)

    return randint, calls


def test_kept_position_in_block_is_uniform():
    """32768 block draws: the position counts pass a chi-square test at the 0.001 level."""
    m = UniformMasking((16, 16))(512, generator=_gen(10))
    assert kept_position_statistic(m.mask, (16, 16)) < CHI2_CRIT_0001[3]


def test_kept_position_statistic_detects_a_biased_sampler(monkeypatch):
    """Negative control: a sampler keeping position 0 with probability 0.28 is rejected."""
    randint, calls = _biased_randint(torch.tensor([0.28, 0.24, 0.24, 0.24]))
    monkeypatch.setattr(torch, "randint", randint)
    m = UniformMasking((16, 16))(512, generator=_gen(10))
    assert calls, "the biased sampler was not used; the control tests nothing"
    check_uniform(m.mask, (16, 16))  # still a valid uniform mask, only biased
    assert kept_position_statistic(m.mask, (16, 16)) > CHI2_CRIT_0001[3]


def test_secondary_units_are_chosen_uniformly_among_visible_units():
    m = UniformMasking((16, 16), secondary_ratio=0.25)(2048, generator=_gen(11))
    assert secondary_position_statistic(m) < CHI2_CRIT_0001[63]


def test_secondary_statistic_detects_a_biased_choice(monkeypatch):
    """Negative control: noise shrunk by 15% for the first 8 blocks favours them (P ~ 0.29)."""
    original = torch.rand
    calls = []

    def biased_rand(*size, generator=None, device=None, **kwargs):
        noise = original(*size, generator=generator, device=device, **kwargs)
        calls.append(noise.shape)
        scale = torch.ones(noise.shape[-1], device=noise.device)
        scale[:8] = 0.85
        return noise * scale

    monkeypatch.setattr(torch, "rand", biased_rand)
    m = UniformMasking((16, 16), secondary_ratio=0.25)(2048, generator=_gen(11))
    assert calls, "the biased noise was not used; the control tests nothing"
    assert m.secondary.sum(1).tolist() == [16] * 2048
    assert secondary_position_statistic(m) > CHI2_CRIT_0001[63]


def test_secondary_is_independent_of_the_position_in_block():
    """P(secondary | kept at position q) is the same for the 4 in-block positions."""
    grid = (16, 16)
    m = UniformMasking(grid, secondary_ratio=0.25)(1024, generator=_gen(12))
    pos = _kept_positions(m.mask, grid).flatten()
    sec = _blocks(~m.secondary, grid).any(-1).flatten()  # block's visible unit is secondary
    visible_counts = torch.bincount(pos, minlength=4).double()
    secondary_counts = torch.bincount(pos[sec], minlength=4)
    probs = visible_counts / visible_counts.sum()
    assert chi_square_gof(secondary_counts, probs) < CHI2_CRIT_0001[3]


def _batches(sampler, n: int, seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    return [sampler(2, generator=g).mask for _ in range(n)]


def test_kept_positions_are_independent_across_samples():
    """Sample 0 vs sample 1 of each batch, 256 batches x 64 blocks: 9-dof independence test."""
    masks = _batches(UniformMasking((16, 16)), 256, seed=13)
    assert cross_sample_statistic(masks, (16, 16)) < CHI2_CRIT_0001[9]


def test_cross_sample_statistic_detects_copied_samples():
    """Negative control: sample 1 copies sample 0."""
    masks = [torch.stack([m[0], m[0]]) for m in _batches(UniformMasking((16, 16)), 256, seed=13)]
    assert cross_sample_statistic(masks, (16, 16)) > CHI2_CRIT_0001[9]


def cross_block_statistic(pos: torch.Tensor, axis: str) -> float:
    """Independence chi-square (9 dof) of neighbouring blocks' kept positions.

    Pairs are disjoint ((0, 1), (2, 3), ...) so that the pairs are independent draws.
    """
    if axis == "row":
        a, b = pos[:, :, 0::2], pos[:, :, 1::2]
    else:
        a, b = pos[:, 0::2, :], pos[:, 1::2, :]
    return chi_square_independence(a, b, 4)


@pytest.mark.parametrize("axis", ["row", "col"])
def test_kept_positions_are_independent_across_blocks(axis):
    """Neighbouring blocks of one sample (512 x 32 disjoint pairs): 9-dof independence test."""
    m = UniformMasking((16, 16))(512, generator=_gen(15))
    assert cross_block_statistic(_kept_positions(m.mask, (16, 16)), axis) < CHI2_CRIT_0001[9]


@pytest.mark.parametrize("axis", ["row", "col"])
def test_cross_block_statistic_detects_copied_blocks(axis):
    """Negative control: every odd block repeats its even neighbour's position."""
    m = UniformMasking((16, 16))(512, generator=_gen(15))
    pos = _kept_positions(m.mask, (16, 16)).clone()
    if axis == "row":
        pos[:, :, 1::2] = pos[:, :, 0::2]
    else:
        pos[:, 1::2, :] = pos[:, 0::2, :]
    assert cross_block_statistic(pos, axis) > CHI2_CRIT_0001[9]


def test_no_two_samples_of_a_batch_share_a_mask():
    m = UniformMasking((16, 16))(64, generator=_gen(14))
    assert torch.unique(m.mask, dim=0).shape[0] == 64


# ---------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("make", [lambda: UniformMasking((16, 16), 0.25),
                                  lambda: RandomMasking((16, 16), 0.75)],
                         ids=["uniform", "random"])
def test_same_seed_gives_identical_samples(make):
    a, b = make()(8, generator=_gen(42)), make()(8, generator=_gen(42))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    if a.secondary is not None:
        assert torch.equal(a.secondary, b.secondary)


@pytest.mark.parametrize("make", [lambda: UniformMasking((16, 16), 0.25),
                                  lambda: RandomMasking((16, 16), 0.75)],
                         ids=["uniform", "random"])
def test_different_seeds_give_different_samples(make):
    a, b = make()(8, generator=_gen(1)), make()(8, generator=_gen(2))
    assert not torch.equal(a.mask, b.mask)
    assert not torch.equal(a.ids_keep, b.ids_keep)
    if a.secondary is not None:
        assert not torch.equal(a.secondary, b.secondary)


@pytest.mark.parametrize("make", [lambda: UniformMasking((16, 16), 0.25),
                                  lambda: RandomMasking((16, 16), 0.75)],
                         ids=["uniform", "random"])
def test_without_generator_the_global_seed_decides(make):
    masking = make()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        a = masking(8)
        torch.manual_seed(123)
        b = masking(8)
        torch.manual_seed(124)
        c = masking(8)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    if a.secondary is not None:
        assert torch.equal(a.secondary, b.secondary)
    assert not torch.equal(a.mask, c.mask)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("grid", [(3, 4), (4, 5), 7, (5, 5)])
def test_uniform_rejects_odd_grids(grid):
    with pytest.raises(ConfigError, match="even"):
        UniformMasking(grid)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_uniform_rejects_bad_secondary_ratio(ratio):
    with pytest.raises(ConfigError, match="secondary_ratio"):
        UniformMasking((16, 16), secondary_ratio=ratio)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_random_rejects_mask_ratio_outside_unit_interval(ratio):
    with pytest.raises(ConfigError, match="mask_ratio"):
        RandomMasking((16, 16), mask_ratio=ratio)


def test_random_rejects_a_ratio_that_leaves_nothing_visible():
    with pytest.raises(ConfigError):
        RandomMasking((2, 2), mask_ratio=0.9)  # round(3.6) = 4 of 4 masked


@pytest.mark.parametrize("grid", [(0, 4), (4, 0)])
def test_empty_grids_are_rejected(grid):
    with pytest.raises(ConfigError):
        UniformMasking(grid)
    with pytest.raises(ConfigError):
        RandomMasking(grid)


def test_config_error_is_an_ummae_error():
    with pytest.raises(UmmaeError):
        UniformMasking((3, 3))


def test_check_uniform_accepts_uniform_masks():
    for grid in GRIDS:
        check_uniform(UniformMasking(grid)(16, generator=_gen(20)).mask, grid)


def test_check_uniform_rejects_random_masks():
    """A random 75% mask is (almost surely) not uniform; each of these 8 samples is not."""
    grid = (16, 16)
    m = RandomMasking(grid, 0.75)(8, generator=_gen(21))
    assert m.mask.sum(1).tolist() == [192] * 8
    for b in range(8):
        assert not bool((_blocks(m.mask[b:b + 1], grid).sum(-1) == 1).all())
        with pytest.raises(UmmaeError):
            check_uniform(m.mask[b:b + 1], grid)
    with pytest.raises(UmmaeError):
        check_uniform(m.mask, grid)


def test_check_uniform_rejects_two_visible_units_in_one_block():
    grid = (4, 6)
    mask = UniformMasking(grid)(3, generator=_gen(22)).mask.clone()
    block = _blocks(mask, grid)[1, 1, 2]  # sample 1, block (1, 2)
    hidden = int((~block).nonzero()[0])  # a masked position of that block
    dr, dc = divmod(hidden, 2)
    mask[1, (2 + dr) * 6 + 4 + dc] = False
    with pytest.raises(UmmaeError):
        check_uniform(mask, grid)
    with pytest.raises(UmmaeError):
        uniform_ids_keep(mask, grid)


def test_check_uniform_rejects_a_75_percent_mask_with_an_empty_block():
    """Moving a block's visible unit into the next block keeps 75% but breaks uniformity."""
    grid = (4, 4)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, [0, 2, 8, 10]] = False  # top-left of every block: uniform
    check_uniform(mask, grid)
    mask[0, 0], mask[0, 3] = True, False  # block 0 empty, block 1 has two
    assert mask.sum() == 12
    with pytest.raises(UmmaeError):
        check_uniform(mask, grid)


@pytest.mark.parametrize("grid", [(3, 4), (4, 4)])
def test_check_uniform_rejects_a_grid_that_does_not_fit(grid):
    mask = UniformMasking((4, 6))(2, generator=_gen(23)).mask
    with pytest.raises(UmmaeError):
        check_uniform(mask, grid)


# ---------------------------------------------------------------- random sampling


@pytest.mark.parametrize("grid,ratio", [((16, 16), 0.75), ((14, 14), 0.75), ((4, 6), 0.5),
                                        ((5, 7), 0.6), ((16, 16), 0.0), ((10, 10), 0.905)])
def test_random_masks_exactly_round_l_ratio_per_row(grid, ratio):
    h, w = grid
    L = h * w
    m = RandomMasking(grid, ratio)(16, generator=_gen(30))
    assert m.mask.shape == (16, L) and m.mask.dtype == torch.bool
    assert m.mask.sum(1).tolist() == [int(round(L * ratio))] * 16
    assert m.ids_keep.shape == (16, L - int(round(L * ratio)))
    assert m.secondary is None and m.grid_size == grid


@pytest.mark.parametrize("grid,ratio", [((16, 16), 0.75), ((5, 7), 0.6)])
def test_random_ids_keep_is_sorted_and_equals_visible_set(grid, ratio):
    m = RandomMasking(grid, ratio)(16, generator=_gen(31))
    assert bool((m.ids_keep[:, 1:] > m.ids_keep[:, :-1]).all())
    for b in range(16):
        assert set(m.ids_keep[b].tolist()) == _visible_set(m.mask, b)


def test_random_masks_every_unit_with_the_mask_ratio():
    """Each unit's masked count over 4000 draws is Binomial(4000, k/L): within 4.5 std."""
    grid, ratio, n = (8, 8), 0.75, 4000
    m = RandomMasking(grid, ratio)(n, generator=_gen(32))
    p = round(64 * ratio) / 64
    counts = m.mask.sum(0).double()
    std = math.sqrt(n * p * (1 - p))
    assert float((counts - n * p).abs().max()) < 4.5 * std
    # and the per-unit counts as a whole: 63-dof goodness of fit
    assert chi_square_gof(counts) < CHI2_CRIT_0001[63]


def test_random_masks_differ_across_samples():
    m = RandomMasking((16, 16), 0.75)(64, generator=_gen(33))
    assert torch.unique(m.mask, dim=0).shape[0] == 64


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("make", [lambda: UniformMasking((4, 6), 0.25),
                                  lambda: RandomMasking((4, 6), 0.75)],
                         ids=["uniform", "random"])
def test_device_argument_places_all_tensors(make):
    m = make()(4, generator=_gen(40), device="cpu")
    assert m.mask.device.type == "cpu" and m.ids_keep.device.type == "cpu"
    if m.secondary is not None:
        assert m.secondary.device.type == "cpu"
    ref = make()(4, generator=_gen(40))
    assert torch.equal(m.mask, ref.mask) and torch.equal(m.ids_keep, ref.ids_keep)
    moved = make()(4, generator=_gen(40), device="meta")
    assert moved.mask.is_meta and moved.ids_keep.is_meta
    if moved.secondary is not None:
        assert moved.secondary.is_meta


def test_mask_sample_to_moves_every_tensor_and_keeps_values():
    m = UniformMasking((4, 6), 0.25)(4, generator=_gen(41))
    same = m.to("cpu")
    assert isinstance(same, MaskSample) and same.grid_size == (4, 6)
    assert torch.equal(same.mask, m.mask) and torch.equal(same.ids_keep, m.ids_keep)
    assert torch.equal(same.secondary, m.secondary)
    meta = m.to(torch.device("meta"))
    assert meta.mask.is_meta and meta.ids_keep.is_meta and meta.secondary.is_meta
    assert meta.mask.shape == m.mask.shape and meta.ids_keep.dtype == torch.long
    assert meta.grid_size == (4, 6)
    assert m.mask.device.type == "cpu"  # the original is untouched


def test_mask_sample_to_without_secondary():
    m = RandomMasking((4, 6), 0.5)(2, generator=_gen(42)).to("meta")
    assert m.secondary is None and m.mask.is_meta and m.ids_keep.is_meta
