"""Swin encoder: true-coordinate position bias, compact and full paths, mask checks."""

import pytest
import torch

from ummae.compaction import full_coordinates
from ummae.errors import UmmaeError
from ummae.masking import MaskSample, RandomMasking, UniformMasking
from ummae.models.swin import CoordinatePositionBias, SwinTransformer, log_spaced, merge_coordinates

UNIT = 8  # 2x2 patches of 4 px: keeps the test models tiny


def tiny_swin(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    args = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    args.update(kw)
    return SwinTransformer(**args).eval()


def masks_with_position(pos: torch.Tensor, grid: tuple[int, int]) -> MaskSample:
    """Uniform masks whose kept unit in each block is `pos` ([B, h/2, w/2], 0..3 row-major)."""
    B, hb, wb = pos.shape
    h, w = grid
    rows = 2 * torch.arange(hb).view(1, -1, 1) + pos // 2
    cols = 2 * torch.arange(wb).view(1, 1, -1) + pos % 2
    ids_keep = (rows * w + cols).reshape(B, -1)
    mask = torch.ones(B, h * w, dtype=torch.bool).scatter(1, ids_keep, False)
    return MaskSample(mask, ids_keep, grid, torch.zeros_like(mask))


def images_with_compact_content(compact: torch.Tensor, masks: MaskSample) -> torch.Tensor:
    """Full images whose compact image (under `masks`) is `compact`; hidden units are noise."""
    B, C, Hc, Wc = compact.shape
    h, w = masks.grid_size
    imgs = torch.randn(B, C, Hc * 2, Wc * 2)
    for b in range(B):
        for k, unit in enumerate(masks.ids_keep[b].tolist()):
            (ur, uc), (cr, cc) = divmod(unit, w), divmod(k, w // 2)
            imgs[b, :, ur * UNIT:(ur + 1) * UNIT, uc * UNIT:(uc + 1) * UNIT] = \
                compact[b, :, cr * UNIT:(cr + 1) * UNIT, cc * UNIT:(cc + 1) * UNIT]
    return imgs


def test_position_bias_table_equals_direct_mlp_evaluation():
    """The distinct-offset table + gather gives exactly the per-pair MLP values."""
    torch.manual_seed(0)
    bias = CoordinatePositionBias(num_heads=3, hidden_dim=8)
    coords = torch.randint(0, 20, (2, 5, 16, 2)).float() + 0.5  # [B, nW, N, 2]
    out = bias(coords)
    offsets = coords.unsqueeze(-2) - coords.unsqueeze(-3)
    direct = bias.mlp(log_spaced(offsets)).movedim(-1, -3)
    assert out.shape == (2, 5, 3, 16, 16)
    torch.testing.assert_close(out, direct)


def test_merge_coordinates_maps_full_grid_onto_next_grid():
    coords = full_coordinates(8, 12)
    torch.testing.assert_close(merge_coordinates(coords), full_coordinates(4, 6))


def test_compact_path_uses_true_coordinates_not_compact_offsets():
    """Same compact pixels, different true positions -> different features; a pure translation of
    every visible unit by one unit (top-left vs bottom-right of each block) -> same features.
    A bias computed from compact-grid offsets would give equal features in all three cases."""
    model = tiny_swin()
    with torch.no_grad():  # trained-size biases: at init the MLP's output is ~1e-3
        for m in model.modules():
            if isinstance(m, CoordinatePositionBias):
                for p in m.parameters():
                    p.normal_(0, 1.0)
    grid = (8, 8)
    B = 2
    compact = torch.randn(B, 3, 32, 32)
    top_left = masks_with_position(torch.zeros(B, 4, 4, dtype=torch.long), grid)
    bottom_right = masks_with_position(torch.full((B, 4, 4), 3, dtype=torch.long), grid)
    scattered = masks_with_position(torch.randint(0, 4, (B, 4, 4), generator=torch.Generator().manual_seed(1)), grid)

    with torch.no_grad():
        f_tl = model.forward_masked(images_with_compact_content(compact, top_left), top_left, UNIT)
        f_br = model.forward_masked(images_with_compact_content(compact, bottom_right), bottom_right, UNIT)
        f_sc = model.forward_masked(images_with_compact_content(compact, scattered), scattered, UNIT)

    torch.testing.assert_close(f_tl, f_br, atol=1e-5, rtol=1e-5)
    assert (f_tl - f_sc).abs().max() > 1e-3


def test_compact_and_full_paths_share_weights_and_shapes():
    model = tiny_swin()
    imgs = torch.randn(2, 3, 64, 64)
    masks = UniformMasking((8, 8), 0.25)(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        compact = model.forward_masked(imgs, masks, UNIT)
        model.set_window_size(8)  # fine-tuning window: the coordinate MLP needs no resizing
        full = model.forward_features(imgs)
    assert compact.shape == (2, 4, 4, 32)
    assert full.shape == (2, 8, 8, 32)
    assert torch.isfinite(full).all() and torch.isfinite(compact).all()


def test_full_path_is_translation_equivariant_inside_windows():
    """Relative (not absolute) positions: shifting the image by one window shifts the output."""
    model = tiny_swin(depths=(1,), num_heads=(2,))
    model.set_window_size(4)
    imgs = torch.randn(1, 3, 64, 64)
    shifted = torch.roll(imgs, shifts=(16, 16), dims=(2, 3))  # 4 tokens = one window
    with torch.no_grad():
        a = model.forward_features(imgs)
        b = model.forward_features(shifted)
    torch.testing.assert_close(torch.roll(a, (4, 4), dims=(1, 2)), b, atol=1e-5, rtol=1e-5)


def test_secondary_units_get_the_mask_token_before_the_norm():
    model = tiny_swin()
    imgs = torch.randn(1, 3, 32, 32)
    replace = torch.zeros(1, 8, 8, dtype=torch.bool)
    replace[0, 2, 3] = True
    with torch.no_grad():
        out = model.embed(imgs, replace)
        expected = model.patch_norm(model.mask_token)[0, 0, 0]
        plain = model.embed(imgs)
    torch.testing.assert_close(out[0, 2, 3], expected)
    replace_flat = replace.view(-1)
    torch.testing.assert_close(out.view(-1, 16)[~replace_flat], plain.view(-1, 16)[~replace_flat])


def test_compact_path_refuses_a_non_uniform_mask():
    model = tiny_swin()
    imgs = torch.randn(2, 3, 64, 64)
    masks = RandomMasking((8, 8), 0.75)(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UmmaeError, match="uniform mask"):
        model.forward_masked(imgs, masks, UNIT)


def test_window_that_does_not_divide_the_grid_pads_the_grid():
    # 8x8 grid, window 3: padded to 9x9 inside each block; the output keeps the input's grid.
    model = tiny_swin(window_size=3)
    out = model.forward_features(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 4, 4, 32) and torch.isfinite(out).all()


# ------------------------------------------------ the static position-bias table (issue 14)

def _bias_calls(model: SwinTransformer, run) -> list[tuple]:
    """Every (module, coords, lattice, window, blocked) the position biases see during `run()`."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: calls.append((mod, *args, *kw.values())),
                                         with_kwargs=True)
             for m in model.modules() if isinstance(m, CoordinatePositionBias)]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("unit,window,img", [(16, 8, 256), (8, 4, 128), (4, 4, 128), (12, 3, 192)])
def test_bias_table_equals_the_per_pair_mlp_on_every_stage_compact_and_full(unit, window, img):
    """Table + integer-offset gather == MLP(log_spaced(c_i - c_j)) per pair, for every block of
    every stage (plain and shifted windows), on the compact grids of several random and extreme
    uniform masks (every kept unit top-left / bottom-right) and on the full grid."""
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2), window_size=window).eval()
    for m in model.modules():
        if isinstance(m, CoordinatePositionBias):
            for p in m.parameters():
                p.data.normal_(0, 1.0)  # trained-size biases: wrong entries would show
    grid = (img // unit, img // unit)
    hb, wb = grid[0] // 2, grid[1] // 2
    masks = [UniformMasking(grid)(2, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    masks += [masks_with_position(torch.full((1, hb, wb), pos, dtype=torch.long), grid) for pos in (0, 3)]
    imgs = torch.randn(2, 3, img, img)
    calls = []
    for m in masks:
        calls += _bias_calls(model, lambda: model.forward_masked(imgs[:m.mask.shape[0]], m, unit))
    calls += _bias_calls(model, lambda: model.forward_features(imgs))
    kinds = {(lat.kind, lat.merges, blocked is not None) for _, _, lat, _, blocked in calls}
    assert {(k, s) for k, s, _ in kinds} == {(k, s) for k in ("compact", "full") for s in range(4)}
    assert ("full", 0, True) in kinds and ("compact", 0, True) in kinds  # shifted windows seen
    tables = 0
    for mod, coords, lattice, window_rc, blocked in calls:
        direct = mod.direct(coords, blocked)
        outputs = [mod(coords, lattice, window_rc, blocked)]  # what the model uses (table or direct)
        if lattice.table_size(window_rc) <= 50_000:  # finer lattices (p = 1 or 3, late stages) go direct
            outputs.append(mod.table(coords, lattice, window_rc, blocked))
            tables += 1
        for out in outputs:
            assert out.shape == direct.shape
            assert torch.equal(out.isinf(), direct.isinf())
            torch.testing.assert_close(out.nan_to_num(neginf=0.0), direct.nan_to_num(neginf=0.0),
                                       atol=1e-5, rtol=1e-5)
    assert tables >= len(calls) // 2


def test_bias_table_of_the_wrong_lattice_differs_from_the_per_pair_mlp():
    """Negative control: compact coordinates looked up on the full grid's (integer) lattice."""
    from ummae.models.swin import CoordinateLattice

    torch.manual_seed(0)
    bias = CoordinatePositionBias(num_heads=2, hidden_dim=8)
    for p in bias.parameters():
        p.data.normal_(0, 1.0)
    model = tiny_swin(depths=(1, 1), num_heads=(1, 1))
    masks = UniformMasking((16, 16))(1, generator=torch.Generator().manual_seed(0))
    calls = _bias_calls(model, lambda: model.forward_masked(torch.randn(1, 3, 128, 128), masks, UNIT))
    coords = calls[-1][1]  # stage 2: merged compact coordinates (quarter-unit offsets)
    wrong = bias.table(coords, CoordinateLattice.full(), (4, 4))
    assert (wrong - bias.direct(coords)).abs().max() > 1e-2


def test_masks_from_uniform_masking_are_trusted_hand_made_ones_are_checked(monkeypatch):
    """The encoder does not read back masks drawn by UniformMasking (no device sync); a hand-made
    non-uniform mask still gets the clear error, and a hand-made uniform one passes."""
    import ummae.masking as masking

    model = tiny_swin()
    imgs = torch.randn(2, 3, 64, 64)
    drawn = UniformMasking((8, 8))(2, generator=torch.Generator().manual_seed(0))
    assert drawn.uniform and drawn.to("cpu").uniform and MaskSample.cat([drawn, drawn]).uniform
    checked = []
    monkeypatch.setattr(masking, "check_uniform", lambda *a: checked.append(a))
    with torch.no_grad():
        model.forward_masked(imgs, drawn, UNIT)
    assert checked == []
    monkeypatch.undo()
    hand_made = MaskSample(drawn.mask, drawn.ids_keep, drawn.grid_size, drawn.secondary)
    assert not hand_made.uniform
    with torch.no_grad():
        model.forward_masked(imgs, hand_made, UNIT)  # checked, and uniform: fine
    bad = RandomMasking((8, 8), 0.75)(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UmmaeError, match="uniform mask"):
        model.forward_masked(imgs, MaskSample(bad.mask, bad.ids_keep[:, :16], bad.grid_size), UNIT)


def test_forward_runs_on_the_meta_device():
    """Shape inference without memory (timm's `test_model_default_cfgs` builds on `meta`): no op
    may need values or a device-specific context (the bias MLP's autocast switch)."""
    with torch.device("meta"):
        model = SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)
        out = model.forward_features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2, 2, 64) and out.device.type == "meta"
