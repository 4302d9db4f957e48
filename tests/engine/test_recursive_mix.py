"""RecursiveMix: box draws, label fusion vs pasted area, the carried history, the RoI consistency loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ummae.resolve import resolve_config
from ummae.engine.recursive_mix import MixedBatch, RecursiveMix, smooth_one_hot, soft_cross_entropy
from ummae.errors import ConfigError
from ummae.models.classifier import build_classifier

K = 3


def tiny_classifier(arch: str = "swin"):
    """A tiny untrained classifier at 64 px (Swin/PVT: stride 8, an 8x8 last map; ViT: 8x8 patches)."""
    sets = {
        "swin": ("ummae_swin_demo", ["model.embed_dim=8", "model.depths=[1,1]", "model.num_heads=[1,1]"]),
        "pvt": ("ummae_pvt_demo", ["model.embed_dims=[8,16]", "model.depths=[1,1]", "model.num_heads=[1,2]",
                                   "model.mlp_ratios=[2,2]", "model.sr_ratios=[2,1]"]),
        "vit": ("mae_vit_demo", ["model.embed_dim=16", "model.depths=[1]", "model.num_heads=[2]",
                                 "model.patch_size=8"]),
    }[arch]
    cfg = resolve_config(preset=sets[0], sets=[*sets[1], "data.img_size=64", "masking.unit_size=8"])
    torch.manual_seed(0)
    model, _ = build_classifier(cfg, None, K)
    with torch.no_grad():  # a head that is not ~0, so the logits carry information
        model.head.weight.normal_(0, 1)
    return model


def labels_to_targets(labels):
    return smooth_one_hot(torch.tensor(labels), K, 0.0)


def test_alpha_and_omega_are_checked():
    with pytest.raises(ConfigError, match="rm-alpha"):
        RecursiveMix(alpha=0)
    with pytest.raises(ConfigError, match="rm-omega"):
        RecursiveMix(omega=-1)


def test_boxes_have_side_ratio_at_most_sqrt_alpha_and_stay_inside():
    rm = RecursiveMix(alpha=0.5, generator=torch.Generator().manual_seed(0))
    areas = []
    for _ in range(500):
        x1, y1, x2, y2 = rm.draw_box(40, 60)
        assert 0 <= x1 <= x2 <= 60 and 0 <= y1 <= y2 <= 40
        assert x2 - x1 <= round(math.sqrt(0.5) * 60) and y2 - y1 <= round(math.sqrt(0.5) * 40)
        areas.append((x2 - x1) * (y2 - y1) / (40 * 60))
    # r^2 ~ U(0, alpha): unclipped mean area alpha/2 = 0.25; clipping at the borders lowers it.
    assert 0.1 < sum(areas) / len(areas) < 0.26


def test_label_fusion_matches_the_pasted_area():
    """Paste a constant batch of ones into zeros: 1 - lam is exactly the fraction of ones."""
    rm = RecursiveMix(alpha=1.0, generator=torch.Generator().manual_seed(3))
    y_prev = labels_to_targets([0, 1, 2, 0])
    y = labels_to_targets([1, 2, 0, 2])
    pasted = 0
    for _ in range(30):
        rm.remember(MixedBatch(torch.ones(4, 3, 24, 32), y_prev), torch.zeros(4, K))
        batch = rm.mix(torch.zeros(4, 3, 24, 32), y)
        if batch.box is None:
            continue
        pasted += 1
        fraction = (batch.images > 0.5).float().mean().item()  # pixels now showing the previous batch
        assert 1 - batch.lam == pytest.approx(fraction, abs=1e-6)
        torch.testing.assert_close(batch.targets, batch.lam * y + (1 - batch.lam) * y_prev)
        torch.testing.assert_close(batch.targets.sum(1), torch.ones(4))
        x1, y1, x2, y2 = batch.box
        torch.testing.assert_close(batch.images[:, :, y1:y2, x1:x2], torch.ones(4, 3, y2 - y1, x2 - x1))
    assert pasted >= 25


def test_history_is_carried_from_one_iteration_to_the_next():
    model = tiny_classifier()
    rm = RecursiveMix(alpha=0.5, omega=0.5, generator=torch.Generator().manual_seed(1))
    x1_, y1_ = torch.randn(2, 3, 64, 64), labels_to_targets([0, 1])
    logits1, batch1, loss1 = rm.step(model, x1_, y1_)
    # First iteration: nothing to paste.
    assert batch1.images is x1_ and batch1.box is None and batch1.lam == 1.0
    torch.testing.assert_close(batch1.targets, y1_)
    assert loss1.item() == 0.0
    # Second iteration: the first (mixed) batch, resized, sits in the box; its logits are the teacher.
    x2_, y2_ = torch.randn(2, 3, 64, 64), labels_to_targets([2, 2])
    logits2, batch2, loss2 = rm.step(model, x2_, y2_)
    assert batch2.box is not None  # (seeded: r ~ 0, an empty box, is possible in principle)
    bx1, by1, bx2, by2 = batch2.box
    expected = F.interpolate(batch1.images, size=(by2 - by1, bx2 - bx1), mode="bilinear",
                             align_corners=False, antialias=True)
    torch.testing.assert_close(batch2.images[:, :, by1:by2, bx1:bx2], expected)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[by1:by2, bx1:bx2] = False
    assert torch.equal(batch2.images[:, :, outside], x2_[:, :, outside])
    torch.testing.assert_close(batch2.prev_logits, logits1.detach())
    torch.testing.assert_close(batch2.targets, batch2.lam * y2_ + (1 - batch2.lam) * y1_)
    assert loss2.item() > 0
    # Third iteration pastes the SECOND mixed batch (recursion), with its logits.
    rm.reset()
    assert not rm.has_history
    rm.remember(batch2, logits2)
    batch3 = rm.mix(torch.zeros(2, 3, 64, 64), labels_to_targets([0, 0]))
    assert batch3.box is not None
    torch.testing.assert_close(batch3.prev_logits, logits2.detach())
    torch.testing.assert_close(batch3.targets, batch3.lam * labels_to_targets([0, 0])
                               + (1 - batch3.lam) * batch2.targets)


@pytest.mark.parametrize("arch", ["swin", "pvt", "vit"])
def test_roi_consistency_is_finite_reaches_the_model_and_vanishes_with_omega_0(arch):
    model = tiny_classifier(arch)
    rm = RecursiveMix(alpha=1.0, omega=0.5, generator=torch.Generator().manual_seed(0))
    rm.remember(MixedBatch(torch.randn(2, 3, 64, 64), labels_to_targets([0, 1])), torch.randn(2, K))
    batch = rm.mix(torch.randn(2, 3, 64, 64), labels_to_targets([1, 2]))
    assert batch.box is not None
    logits, roi_logits = model(batch.images, batch.rois)
    loss = rm.consistency_loss(roi_logits, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    expected = 0.5 * (1 - batch.lam) * soft_cross_entropy(roi_logits, F.softmax(batch.prev_logits, -1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("encoder.") and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert model.head.weight.grad.abs().sum() > 0

    off = RecursiveMix(alpha=1.0, omega=0.0)
    assert off.consistency_loss(roi_logits, batch).item() == 0.0
    off.remember(batch, logits)
    _, _, zero = off.step(model, torch.randn(2, 3, 64, 64), labels_to_targets([0, 0]))
    assert zero.item() == 0.0


def test_a_previous_batch_of_another_size_is_cycled():
    rm = RecursiveMix(alpha=1.0, generator=torch.Generator().manual_seed(0))
    prev = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 16, 16)
    rm.remember(MixedBatch(prev, labels_to_targets([0, 1, 2])), torch.zeros(3, K))
    for _ in range(10):
        batch = rm.mix(torch.full((5, 3, 16, 16), -1.0), labels_to_targets([0] * 5))
        if batch.box is not None:
            break
    x1, y1, x2, y2 = batch.box
    assert batch.images[:, 0, y1, x1].tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]
