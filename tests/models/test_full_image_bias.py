"""Swin's full-image position bias: one `[heads, N, N]` per block gathered from the MLP's
integer-offset rows by a cached pair index (`CoordinatePositionBias.window_table`) gives the
same numbers as the per-pair gather it replaces, on shifted, padded and rectangular grids."""

from __future__ import annotations

import pytest
import torch

from ummae.models import swin
from ummae.models.swin import CoordinatePositionBias, SwinTransformer


def _per_pair(self, coords, lattice=None, window=None, blocked=None):
    """The bias without the full-image shortcut: every window's pairs gathered by offset."""
    if lattice is not None and window is not None:
        if lattice.table_size(window) <= coords[..., 0].numel() * coords.shape[-2]:
            return self.table(coords, lattice, window, blocked)
    return self.direct(coords, blocked)


# 64 px: whole windows, shifted; 80 px: grids 20, 10, 5, 3 (padded to whole windows);
# 64x96: rectangular.
@pytest.mark.parametrize("size", [(64, 64), (80, 80), (64, 96)])
def test_window_table_equals_the_per_pair_gather(monkeypatch, size):
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2), window_size=4,
                            mlp_ratio=2.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".pos_bias." in name:
                p.mul_(8.0)  # a bias large enough to matter
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    calls = []
    original = CoordinatePositionBias.window_table
    monkeypatch.setattr(CoordinatePositionBias, "window_table",
                        lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        fast = model.forward_features(x)
        ran = len(calls)
        monkeypatch.setattr(CoordinatePositionBias, "forward", _per_pair)
        slow = model.forward_features(x)
    # Not vacuous: the shortcut ran the first time and not the second.
    assert ran > 0 and len(calls) == ran
    assert torch.equal(fast, slow)


def test_pair_index_is_timms_relative_position_index():
    from timm.models.swin_transformer import get_relative_position_index

    for rows, cols in [(4, 4), (3, 5), (7, 7)]:
        ours = swin._window_pair_index(rows, cols, torch.device("cpu"))
        assert torch.equal(ours, get_relative_position_index(rows, cols))
