"""Tests for `ummae.masking.DisjointPartsMasking` (EMAE's K disjoint parts per image).

Properties: the K visible sets are disjoint and cover the grid, every part masks the same number
of units, uniform parts are valid uniform masks, the deal is uniform (chi-square at the 0.001
level, each with a negative control: a deliberately biased deal of the same sample size must be
rejected), seeded draws are reproducible, impossible settings are one-line `ConfigError`s.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ummae.data.sampling import SeededSamples, draw_masks
from ummae.errors import ConfigError
from ummae.masking import DisjointPartsMasking, MaskSample, PartsSample, check_uniform, uniform_ids_keep

# scipy.stats.chi2.ppf(0.999, dof)
CHI2_CRIT_0001 = {23: 49.728, 48: 84.037}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi_square_gof(counts: torch.Tensor) -> float:
    """Pearson's statistic of `counts` against equal cell probabilities."""
    counts = counts.double().flatten()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


RANDOM_CASES = [((4, 4), 2), ((4, 4), 4), ((3, 5), 3), ((14, 14), 4), ((8, 8), 8)]
UNIFORM_GRIDS = [(2, 2), (4, 6), (8, 8), (14, 14)]


def _all_parts() -> list[tuple[DisjointPartsMasking, tuple[int, int]]]:
    out = [(DisjointPartsMasking(g, k, uniform=False), g) for g, k in RANDOM_CASES]
    return out + [(DisjointPartsMasking(g, 4, uniform=True), g) for g in UNIFORM_GRIDS]


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("masking,grid", _all_parts())
def test_visible_sets_are_disjoint_and_cover_every_unit(masking, grid):
    p = masking(16, generator=_gen(0))
    K, L = masking.num_parts, grid[0] * grid[1]
    assert p.mask.shape == (16, K, L) and p.mask.dtype == torch.bool
    visible_count = (~p.mask).sum(dim=1)  # [B, L]: in how many parts each unit is visible
    assert bool((visible_count == 1).all())  # disjoint (never 2) and covering (never 0)


@pytest.mark.parametrize("masking,grid", _all_parts())
def test_every_part_masks_the_same_number_of_units(masking, grid):
    p = masking(16, generator=_gen(1))
    L, K = grid[0] * grid[1], masking.num_parts
    assert bool((p.mask.sum(-1) == L - L // K).all())
    assert masking.mask_ratio == pytest.approx(1 - 1 / K)


@pytest.mark.parametrize("masking,grid", _all_parts())
def test_ids_keep_is_each_parts_visible_set(masking, grid):
    p = masking(8, generator=_gen(2))
    assert p.ids_keep.shape == (8, masking.num_parts, grid[0] * grid[1] // masking.num_parts)
    for b, k in itertools.product(range(8), range(masking.num_parts)):
        assert set(p.ids_keep[b, k].tolist()) == set((~p.mask[b, k]).nonzero().flatten().tolist())


@pytest.mark.parametrize("grid", UNIFORM_GRIDS)
def test_every_uniform_part_is_a_valid_uniform_mask_in_block_order(grid):
    p = DisjointPartsMasking(grid, 4, uniform=True)(8, generator=_gen(3))
    flat = p.flatten()
    check_uniform(flat.mask, grid)  # raises if any part has != 1 visible unit in some block
    # ids_keep in block row-major order: what the compact encoders and the decoder rely on.
    assert torch.equal(flat.ids_keep, uniform_ids_keep(flat.mask, grid))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5])
def test_secondary_is_drawn_per_part_among_that_parts_visible_units(ratio):
    masking = DisjointPartsMasking((8, 8), 4, uniform=True, secondary_ratio=ratio)
    p = masking(64, generator=_gen(4))
    assert p.secondary.shape == p.mask.shape
    assert bool((p.secondary.sum(-1) == round(16 * ratio)).all())
    assert not bool((p.secondary & p.mask).any())  # only visible units
    if ratio:  # drawn independently per part: parts do not share one pattern of blocks
        blocks = p.secondary.reshape(64, 4, 4, 2, 4, 2).any(dim=(3, 5))  # [B, K, hb, wb]
        assert not torch.equal(blocks[:, 0], blocks[:, 1])


def test_random_parts_have_no_secondary_masking():
    assert DisjointPartsMasking((4, 4), 4, uniform=False)(2, generator=_gen(0)).secondary is None


def test_flatten_is_image_major():
    p = DisjointPartsMasking((4, 6), 4, uniform=True)(3, generator=_gen(5))
    flat = p.flatten()
    assert isinstance(flat, MaskSample) and flat.mask.shape == (12, 24)
    for b, k in itertools.product(range(3), range(4)):
        assert torch.equal(flat.mask[b * 4 + k], p.mask[b, k])
        assert torch.equal(flat.ids_keep[b * 4 + k], p.ids_keep[b, k])
        assert torch.equal(flat.secondary[b * 4 + k], p.secondary[b, k])


# ---------------------------------------------------------------- uniformity of the deal


def _deal_codes(p: PartsSample, grid: tuple[int, int]) -> torch.Tensor:
    """Per block: which in-block position (0..3) each of the 4 parts keeps, as one code 0..255."""
    h, w = grid
    vis = (~p.mask).reshape(-1, 4, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5)
    pos = (vis.reshape(-1, 4, h // 2, w // 2, 4).long() * torch.arange(4)).sum(-1)  # [B, K, hb, wb]
    return (pos * torch.tensor([64, 16, 4, 1]).view(1, 4, 1, 1)).sum(1).flatten()


PERMUTATION_CODES = [sum(q * 4 ** (3 - i) for i, q in enumerate(perm)) for perm in itertools.permutations(range(4))]


def deal_statistic(p: PartsSample, grid: tuple[int, int]) -> float:
    """Chi-square of the 24 possible deals of a block against uniform (23 dof)."""
    counts = torch.bincount(_deal_codes(p, grid), minlength=256)
    assert counts.sum() == counts[PERMUTATION_CODES].sum(), "a block was not dealt one unit per part"
    return chi_square_gof(counts[PERMUTATION_CODES])


def test_uniform_deal_is_uniform_over_the_24_orders():
    """8192 block deals: the 24 orders pass a chi-square test at the 0.001 level."""
    p = DisjointPartsMasking((8, 8), 4, uniform=True)(512, generator=_gen(6))
    assert deal_statistic(p, (8, 8)) < CHI2_CRIT_0001[23]


def _biased_rand(monkeypatch, last_dim: int, factor: float) -> list:
    """Make torch.rand favour index 0 of the last axis (when it has `last_dim` entries)."""
    rand, calls = torch.rand, []

    def biased(*size, **kwargs):
        noise = rand(*size, **kwargs)
        if noise.shape[-1] == last_dim:
            calls.append(noise.shape)
            noise[..., 0] *= factor  # a smaller key sorts first more often
        return noise

    monkeypatch.setattr(torch, "rand", biased)
    return calls


def test_deal_statistic_detects_a_biased_deal(monkeypatch):
    """Negative control: part 0 getting the top-left unit a little too often is rejected."""
    calls = _biased_rand(monkeypatch, 4, 0.8)
    p = DisjointPartsMasking((8, 8), 4, uniform=True, secondary_ratio=0.0)(512, generator=_gen(6))
    assert calls, "the biased sampler was not used; the control tests nothing"
    check_uniform(p.flatten().mask, (8, 8))  # still valid parts, only biased
    assert deal_statistic(p, (8, 8)) > CHI2_CRIT_0001[23]


def random_deal_statistic(p: PartsSample) -> float:
    """Sum over units of the chi-square of which part keeps the unit (L x (K-1) dof)."""
    part_of_unit = (~p.mask).long().argmax(dim=1)  # [B, L]: the part in which the unit is visible
    K = p.mask.shape[1]
    counts = torch.stack([(part_of_unit == k).sum(0) for k in range(K)], dim=1)  # [L, K]
    return sum(chi_square_gof(row) for row in counts)


def test_random_deal_gives_every_unit_to_every_part_equally_often():
    p = DisjointPartsMasking((4, 4), 4, uniform=False)(2000, generator=_gen(7))
    assert random_deal_statistic(p) < CHI2_CRIT_0001[48]


def test_random_deal_statistic_detects_a_biased_deal(monkeypatch):
    """Negative control: unit 0 dealt to part 0 too often is rejected at the same sample size."""
    calls = _biased_rand(monkeypatch, 16, 0.5)
    p = DisjointPartsMasking((4, 4), 4, uniform=False)(2000, generator=_gen(7))
    assert calls
    assert bool(((~p.mask).sum(1) == 1).all())  # still disjoint covering parts
    assert random_deal_statistic(p) > CHI2_CRIT_0001[48]


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("uniform", [True, False])
def test_same_seed_same_parts_other_seed_other_parts(uniform):
    masking = DisjointPartsMasking((8, 8), 4, uniform=uniform)
    a, b, c = masking(4, generator=_gen(9)), masking(4, generator=_gen(9)), masking(4, generator=_gen(10))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    if uniform:
        assert torch.equal(a.secondary, b.secondary)
    assert not torch.equal(a.mask, c.mask)


def test_workers_draw_parts_per_sample_and_the_batch_rebuilds_them():
    """SeededSamples gives each item its [K, L] parts; a collated batch rebuilds the same
    PartsSample that draw_masks gives for those indices (the resume/DDP seeding scheme)."""
    masking = DisjointPartsMasking((4, 4), 4, uniform=True)
    data = SeededSamples([torch.zeros(3, 4, 4)] * 6, seed=3, masking=masking)
    items = [data[(1, i)] for i in (4, 0, 2)]
    batch = torch.utils.data.default_collate(items)
    rebuilt = masking.from_batch(batch)
    expected = draw_masks(masking, 3, 1, [4, 0, 2])
    assert isinstance(expected, PartsSample)
    for name in ("mask", "ids_keep", "secondary"):
        assert torch.equal(getattr(rebuilt, name), getattr(expected, name)), name
    assert not torch.equal(expected.mask[0], expected.mask[1])  # seeded per index


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid_size=(3, 3), num_parts=4, uniform=False), "multiple of 4"),
    (dict(grid_size=(4, 4), num_parts=3, uniform=False), "multiple of 3"),
    (dict(grid_size=(4, 4), num_parts=2, uniform=True), "must be 4"),
    (dict(grid_size=(4, 4), num_parts=8, uniform=True), "must be 4"),
    (dict(grid_size=(3, 4), num_parts=4, uniform=True), "even unit grid"),
    (dict(grid_size=(4, 4), num_parts=1, uniform=False), ">= 2"),
    (dict(grid_size=(4, 4), num_parts=4, uniform=True, secondary_ratio=1.0), "secondary_ratio"),
])
def test_impossible_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DisjointPartsMasking(**kwargs)
