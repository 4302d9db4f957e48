"""ummae's Swin as timm's own `swin_*` (models/swin_timm.py): the tables evaluated from the
coordinate MLPs make timm's `SwinTransformer` compute ummae's full-image backbone.

Tiny random Swins with two blocks per stage (so every stage has a shifted block where its grid
is larger than the window), built in-process: every stage's map, and the padded grids where the
two differ by design. The export files, the loading without ummae, more windows and sizes and
the wrong-table control are in tests/test_export.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch

from ummae.models.swin import SwinTransformer
from ummae.models.swin_timm import timm_swin_model, to_timm_state

RTOL = 1e-5  # export.NATIVE_RTOL: float32 rounding relative to the features' scale


def _pair(window: int, img: int):
    """(ummae's Swin, timm's Swin holding its export, timm state, ummae-only tensors)."""
    torch.manual_seed(window * 1000 + img)
    cfg = SimpleNamespace(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 2], patch_size=4,
                          mlp_ratio=2.0, merge="linear", norm_eps=1e-5)
    ours = SwinTransformer(patch_size=4, embed_dim=8, depths=cfg.depths, num_heads=cfg.num_heads,
                           window_size=window, mlp_ratio=2.0, mask_token=True).eval()
    with torch.no_grad():  # a bias of the scale of the logits, so a wrong table shows
        for name, p in ours.named_parameters():
            if ".pos_bias." in name:
                p.mul_(8.0)
    name, args = timm_swin_model(cfg, window, img)
    theirs = timm.create_model(name, pretrained=False, **args).eval()
    state, extra = to_timm_state(ours, theirs)
    theirs.load_state_dict(state, strict=True)
    return ours, theirs, state, extra


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= RTOL * a.abs().max())


# Stage grids (patch 4): 64 px -> 16, 8, 4, 2; 96 px -> 24, 12, 6, 3; 32 px -> 8, 4, 2, 1. Every
# grid a whole number of windows or at most one window (timm then clips the window, no shift).
@pytest.mark.parametrize("window, img", [(4, 64), (3, 96), (2, 32), (8, 64)])
def test_timm_swin_with_the_evaluated_tables_is_ummaes_full_image_backbone(window, img):
    ours, theirs, _, _ = _pair(window, img)
    shifted = [b.attn.window_size for layer in theirs.layers for b in layer.blocks if any(b.shift_size)]
    if window < img // 4:
        assert shifted  # the shifted-window masks are exercised, not only plain windows
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = ours.forward_features(x), theirs.forward_features(x)
        assert _close(ref, got), (ref - got).abs().max()
        # The maps of every stage too, NCHW (what timm's features_only returns).
        ours_maps = ours.forward_intermediates(x, intermediates_only=True)
        timm_maps = theirs.forward_intermediates(x, intermediates_only=True)
    assert len(ours_maps) == len(timm_maps) == 4
    for a, b in zip(ours_maps, timm_maps):
        assert _close(a, b)


def test_padded_grids_differ_as_documented():
    """Where a stage grid is not a whole number of windows, timm attends its zero padding (and
    rolls before padding) and ummae does not: the features differ (docs/export.md says so, and
    to pick sizes that are whole windows). Pinned so the doc is updated if timm changes."""
    ours, theirs, _, _ = _pair(4, 80)  # grids 20, 10, 5, 3: stage 2 pads 10 -> 12
    x = torch.randn(1, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = ours.forward_features(x), theirs.forward_features(x)
    assert ref.shape == got.shape  # the same map, other numbers (not a shape mismatch)
    assert not _close(ref, got)
