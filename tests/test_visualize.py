"""Tests for `ummae.visualize`: prediction de-normalisation, the grid layout, the loss plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ummae import visualize as vis
from ummae.objectives import normalize_targets, patchify

UNIT = 8
SIZE = 32  # 4x4 grid of units
L = (SIZE // UNIT) ** 2


def _batch(b: int = 2, seed: int = 0) -> torch.Tensor:
    """Random ImageNet-normalised-looking images `[b, 3, SIZE, SIZE]`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, SIZE, SIZE, generator=g)


def _panel(img: Image.Image, row: int, col: int) -> np.ndarray:
    """Crop panel (row, col) out of a grid, following the layout documented in the module."""
    scale = math.ceil(vis.MIN_PANEL_WIDTH / SIZE)
    side = SIZE * scale
    x = vis.PANEL_GAP + col * (side + vis.PANEL_GAP)
    y = vis.HEADER_HEIGHT + vis.PANEL_GAP + row * (side + vis.PANEL_GAP)
    # Sample one pixel per unit-grid pixel (panels are nearest-neighbour upscaled).
    return np.asarray(img)[y : y + side : scale, x : x + side : scale].astype(int)


def _unit_pixels(panel: np.ndarray, index: int) -> np.ndarray:
    """Pixels `[UNIT, UNIT, 3]` of unit `index` (row-major) in a `[SIZE, SIZE, 3]` panel."""
    r, c = divmod(index, SIZE // UNIT)
    return panel[r * UNIT : (r + 1) * UNIT, c * UNIT : (c + 1) * UNIT]


def test_denormalize_inverts_normalize_targets():
    imgs = _batch()
    target = patchify(imgs, UNIT)
    pred = normalize_targets(target)
    assert torch.allclose(vis.denormalize_prediction(pred, imgs, UNIT), target, atol=1e-5)


def test_denormalize_is_identity_without_norm_pix_loss():
    imgs = _batch()
    pred = torch.randn(2, L, UNIT * UNIT * 3)
    assert torch.equal(vis.denormalize_prediction(pred, imgs, UNIT, norm_pix_loss=False), pred)


def test_grid_size_matches_layout():
    imgs = _batch()
    pred = torch.zeros(2, L, UNIT * UNIT * 3)
    mask = torch.zeros(2, L, dtype=torch.bool)
    img = vis.reconstruction_grid(imgs, pred, mask, UNIT)
    side = SIZE * math.ceil(vis.MIN_PANEL_WIDTH / SIZE)
    gap = vis.PANEL_GAP
    assert img.mode == "RGB"
    assert img.size == (4 * side + 5 * gap, vis.HEADER_HEIGHT + 2 * (side + gap) + gap)


def test_grid_panels_with_perfect_prediction():
    imgs = _batch()
    pred = normalize_targets(patchify(imgs, UNIT))
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, [0, 5, 10, 15]] = True
    secondary = torch.zeros(2, L, dtype=torch.bool)
    secondary[:, 3] = True
    img = vis.reconstruction_grid(imgs, pred, mask, UNIT, secondary=secondary)

    grey = round(vis.MASK_GREY * 255)
    for row in range(2):
        original = _panel(img, row, 0)
        masked_input = _panel(img, row, 1)
        reconstruction = _panel(img, row, 2)
        assert np.abs(reconstruction - original).max() <= 1
        for u in (0, 5, 10, 15):
            assert (_unit_pixels(masked_input, u) == grey).all()
        sec = _unit_pixels(masked_input, 3)
        assert np.abs(sec - _unit_pixels(original, 3)).max() > 10
        assert np.abs(sec - grey).max() > 10
        # A unit neither masked nor secondary is shown as is.
        assert np.array_equal(_unit_pixels(masked_input, 1), _unit_pixels(original, 1))


def test_grid_accepts_bf16_and_caps_rows():
    imgs = _batch(b=5).bfloat16()
    pred = torch.randn(5, L, UNIT * UNIT * 3, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(5, L) < 0.75
    capped = vis.reconstruction_grid(imgs, pred, mask, UNIT, max_rows=3)
    full = vis.reconstruction_grid(imgs, pred, mask, UNIT)
    row_height = full.height - capped.height
    assert capped.width == full.width
    assert row_height == 2 * (SIZE * math.ceil(vis.MIN_PANEL_WIDTH / SIZE) + vis.PANEL_GAP)


def test_grid_rejects_mismatched_pred():
    imgs = _batch()
    with pytest.raises(ValueError):
        vis.reconstruction_grid(imgs, torch.zeros(2, L - 1, 192), torch.zeros(2, L, dtype=torch.bool), UNIT)


def test_save_reconstruction_grid_creates_dirs(tmp_path):
    out = tmp_path / "a" / "b" / "grid.png"
    imgs = _batch()
    got = vis.save_reconstruction_grid(
        out, imgs, torch.zeros(2, L, 192), torch.ones(2, L, dtype=torch.bool), UNIT
    )
    assert got == out
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_save_loss_curve_with_truncated_last_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 2.0 / (s + 1), "lr": 1e-4 * min(1, s / 5)}) for s in range(30)]
    lines.insert(3, json.dumps({"step": 3, "epoch": 0}))  # a record without the key
    metrics.write_text("\n".join(lines) + '\n{"step": 30, "lo', encoding="utf-8")
    out = vis.save_loss_curve(metrics, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.width > 0 and img.height > 0


def test_save_loss_curve_empty_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("", encoding="utf-8")
    out = tmp_path / "loss.png"
    assert vis.save_loss_curve(metrics, out) is None
    assert not out.exists()


# ---------------------------------------------------------------- which images a picture shows


@pytest.mark.parametrize("total, n", [(16, 4), (10, 3), (7, 7), (100, 8), (5, 1)])
def test_spread_indices_are_distinct_increasing_and_reach_every_part_of_the_list(total, n):
    picked = vis.spread_indices(total, n)
    assert len(picked) == n and picked == sorted(set(picked))
    assert all(0 <= i < total for i in picked)
    # One index in each of the n equal slices of the list (not the first n files).
    assert [i * n // total for i in picked] == list(range(n))
    assert picked == vis.spread_indices(total, n)  # deterministic


def test_spread_indices_with_fewer_files_than_asked_takes_them_all():
    assert vis.spread_indices(3, 8) == [0, 1, 2]
    assert vis.spread_indices(0, 8) == [] and vis.spread_indices(5, 0) == []
