"""Tests for `ummae.compaction`: the compact image, its flags and its true coordinates.

Expected values are computed independently of `patchify` (explicit slicing / reshapes), and the
compact image plus its coordinates are checked together against the reference computation: the
patch embedding of the compact image must equal the full image's patch embedding gathered at the
compact patches' true positions.
"""

from __future__ import annotations

import pytest
import torch

from ummae.compaction import compact_coordinates, compact_image, compact_unit_flags, full_coordinates
from ummae.masking import UniformMasking, uniform_ids_keep


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(grid: tuple[int, int], unit: int, batch: int = 3, seed: int = 0):
    """Random images `[B, 3, h*unit, w*unit]` (all units distinct) and a uniform mask sample."""
    g = _gen(seed)
    h, w = grid
    imgs = torch.randn(batch, 3, h * unit, w * unit, generator=g, dtype=torch.float64)
    return imgs, UniformMasking(grid, secondary_ratio=0.25)(batch, generator=g)


def _fixed_ids_keep(grid: tuple[int, int], dr: int, dc: int, batch: int) -> torch.Tensor:
    """ids_keep of the mask that keeps unit (dr, dc) of every block, built from the mask."""
    h, w = grid
    mask = torch.ones(batch, h, w, dtype=torch.bool)
    mask[:, dr::2, dc::2] = False
    return uniform_ids_keep(mask.reshape(batch, h * w), grid)


# ---------------------------------------------------------------- compact_image


@pytest.mark.parametrize("grid,unit", [((4, 6), 8), ((6, 4), 4), ((16, 16), 2), ((2, 2), 16)])
def test_compact_unit_is_the_visible_unit_of_its_block(grid, unit):
    h, w = grid
    hb, wb = h // 2, w // 2
    imgs, m = _setup(grid, unit)
    out = compact_image(imgs, m.ids_keep, unit)
    assert out.shape == (imgs.shape[0], 3, h * unit // 2, w * unit // 2)
    assert out.dtype == imgs.dtype
    for b in range(imgs.shape[0]):
        for k in range(hb * wb):
            i, j = divmod(k, wb)
            r, c = divmod(int(m.ids_keep[b, k]), w)
            got = out[b, :, i * unit:(i + 1) * unit, j * unit:(j + 1) * unit]
            want = imgs[b, :, r * unit:(r + 1) * unit, c * unit:(c + 1) * unit]
            assert torch.equal(got, want), (b, k)


@pytest.mark.parametrize("dr,dc", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("grid", [(4, 6), (8, 8)])
def test_fixed_position_mask_compacts_to_a_strided_unit_grid(grid, dr, dc):
    """Keeping unit (dr, dc) of every block, the compact image is the units [dr::2, dc::2]."""
    unit, B = 4, 2
    h, w = grid
    imgs = torch.randn(B, 3, h * unit, w * unit, generator=_gen(1))
    ids_keep = _fixed_ids_keep(grid, dr, dc, B)
    units = imgs.reshape(B, 3, h, unit, w, unit)[:, :, dr::2, :, dc::2, :]
    expected = units.reshape(B, 3, h // 2 * unit, w // 2 * unit)
    assert torch.equal(compact_image(imgs, ids_keep, unit), expected)


def test_compact_image_of_each_sample_uses_its_own_ids_keep():
    """Swapping two samples' images and masks swaps the compact images."""
    imgs, m = _setup((4, 4), 4, batch=2, seed=2)
    out = compact_image(imgs, m.ids_keep, 4)
    swapped = compact_image(imgs.flip(0), m.ids_keep.flip(0), 4)
    assert torch.equal(swapped, out.flip(0))
    assert not torch.equal(compact_image(imgs, m.ids_keep.flip(0), 4), out)


# ---------------------------------------------------------------- reference equivalence


@pytest.mark.parametrize("grid", [(4, 6), (4, 4)])
@pytest.mark.parametrize("unit,patch", [(8, 4), (16, 4)])
def test_patch_embedding_of_compact_image_equals_full_embedding_at_true_coordinates(grid, unit, patch):
    """Compaction before the patch embedding == gathering embeddings at the coordinates after it."""
    with torch.random.fork_rng():  # seed the conv's init without touching the global RNG
        torch.manual_seed(0)
        embed = torch.nn.Conv2d(3, 8, kernel_size=patch, stride=patch).double()
    imgs, m = _setup(grid, unit, batch=3, seed=3)
    p = unit // patch
    with torch.no_grad():
        full_emb = embed(imgs)  # [B, 8, h*p, w*p]
        compact_emb = embed(compact_image(imgs, m.ids_keep, unit))  # [B, 8, h/2*p, w/2*p]
    coords = compact_coordinates(m.ids_keep, grid, p)
    B, _, ch, cw = compact_emb.shape
    assert coords.shape == (B, ch, cw, 2)
    rows = (coords[..., 0] - 0.5).long()
    cols = (coords[..., 1] - 0.5).long()
    batch = torch.arange(B).view(B, 1, 1)
    gathered = full_emb.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, ch, cw, 8]
    torch.testing.assert_close(compact_emb.permute(0, 2, 3, 1), gathered, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- compact_coordinates


COORD_CASES = [((4, 6), 2), ((16, 16), 4), ((6, 4), 1), ((2, 2), 3)]


@pytest.mark.parametrize("grid,p", COORD_CASES)
def test_compact_coordinates_are_patch_centres(grid, p):
    h, w = grid
    _, m = _setup(grid, 1, batch=4, seed=4)
    coords = compact_coordinates(m.ids_keep, grid, p)
    assert coords.shape == (4, h // 2 * p, w // 2 * p, 2) and coords.dtype == torch.float32
    assert torch.equal(coords - coords.floor(), torch.full_like(coords, 0.5))
    assert bool((coords[..., 0] > 0).all()) and bool((coords[..., 0] < h * p).all())
    assert bool((coords[..., 1] > 0).all()) and bool((coords[..., 1] < w * p).all())


@pytest.mark.parametrize("grid,p", COORD_CASES)
def test_each_compact_patch_lies_inside_its_own_visible_unit(grid, p):
    h, w = grid
    hb, wb = h // 2, w // 2
    _, m = _setup(grid, 1, batch=4, seed=5)
    coords = compact_coordinates(m.ids_keep, grid, p)
    pi = torch.arange(hb * p).view(-1, 1)
    pj = torch.arange(wb * p).view(1, -1)
    k = (pi // p) * wb + pj // p  # compact unit of each compact patch, [hb*p, wb*p]
    unit = m.ids_keep[:, k.flatten()].reshape(4, hb * p, wb * p)
    assert torch.equal(coords[..., 0].floor().long() // p, unit // w)
    assert torch.equal(coords[..., 1].floor().long() // p, unit % w)


@pytest.mark.parametrize("grid,p", COORD_CASES)
def test_coordinates_are_contiguous_inside_a_compact_unit(grid, p):
    """Neighbouring compact patches of one unit are neighbours in the true grid too."""
    _, m = _setup(grid, 1, batch=4, seed=6)
    coords = compact_coordinates(m.ids_keep, grid, p)
    H, W = coords.shape[1:3]
    same_unit_down = (torch.arange(H - 1) % p) != p - 1  # row i and i+1 in the same unit
    same_unit_right = (torch.arange(W - 1) % p) != p - 1
    d_down = coords[:, 1:] - coords[:, :-1]  # [B, H-1, W, 2]
    d_right = coords[:, :, 1:] - coords[:, :, :-1]  # [B, H, W-1, 2]
    assert torch.equal(d_down[:, same_unit_down],
                       torch.tensor([1.0, 0.0]).expand_as(d_down[:, same_unit_down]))
    assert torch.equal(d_right[:, :, same_unit_right],
                       torch.tensor([0.0, 1.0]).expand_as(d_right[:, :, same_unit_right]))


@pytest.mark.parametrize("grid,p", COORD_CASES)
def test_coordinates_are_exactly_the_patch_centres_of_the_visible_units(grid, p):
    h, w = grid
    _, m = _setup(grid, 1, batch=4, seed=7)
    coords = compact_coordinates(m.ids_keep, grid, p)
    for b in range(4):
        got = [tuple(xy) for xy in coords[b].reshape(-1, 2).tolist()]
        want = set()
        for u in (~m.mask[b]).nonzero().flatten().tolist():
            r, c = divmod(u, w)
            want |= {(r * p + a + 0.5, c * p + q + 0.5) for a in range(p) for q in range(p)}
        assert len(got) == len(set(got)), "a position appears twice"
        assert set(got) == want


@pytest.mark.parametrize("dr,dc", [(0, 0), (1, 1), (0, 1)])
def test_fixed_position_coordinates_are_a_strided_full_grid(dr, dc):
    """Keeping unit (dr, dc) of every block, coordinates are full_coordinates' units [dr::2, dc::2]."""
    grid, p = (4, 6), 2
    h, w = grid
    full = full_coordinates(h * p, w * p)[0].reshape(h, p, w, p, 2)
    expected = full[dr::2, :, dc::2].reshape(h // 2 * p, w // 2 * p, 2)
    coords = compact_coordinates(_fixed_ids_keep(grid, dr, dc, 2), grid, p)
    assert torch.equal(coords, expected.expand(2, -1, -1, -1))


# ---------------------------------------------------------------- compact_unit_flags


@pytest.mark.parametrize("grid,p", COORD_CASES)
def test_compact_unit_flags_replicate_the_visible_units_flags(grid, p):
    h, w = grid
    hb, wb = h // 2, w // 2
    g = _gen(8)
    _, m = _setup(grid, 1, batch=4, seed=8)
    flags = torch.rand(4, h * w, generator=g) < 0.5
    out = compact_unit_flags(flags, m.ids_keep, grid, p)
    assert out.shape == (4, hb * p, wb * p) and out.dtype == torch.bool
    for b in range(4):
        for k in range(hb * wb):
            i, j = divmod(k, wb)
            want = bool(flags[b, m.ids_keep[b, k]])
            block = out[b, i * p:(i + 1) * p, j * p:(j + 1) * p]
            assert bool((block == want).all()), (b, k)


def test_compact_secondary_flags_count_matches_secondary():
    """The secondary mask moved to the compact grid keeps its count, p*p patches per unit."""
    grid, p = (16, 16), 4
    _, m = _setup(grid, 1, batch=4, seed=9)
    out = compact_unit_flags(m.secondary, m.ids_keep, grid, p)
    assert out.sum((1, 2)).tolist() == (m.secondary.sum(1) * p * p).tolist()


# ---------------------------------------------------------------- full_coordinates


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (8, 8), (6, 2)])
def test_full_coordinates_are_patch_centres_row_major(h, w):
    coords = full_coordinates(h, w)
    assert coords.shape == (1, h, w, 2) and coords.dtype == torch.float32
    for i in range(h):
        for j in range(w):
            assert coords[0, i, j].tolist() == [i + 0.5, j + 0.5]


def test_full_coordinates_device():
    assert full_coordinates(2, 3, device=torch.device("meta")).is_meta
    assert full_coordinates(2, 3, device=torch.device("cpu")).device.type == "cpu"
