"""Frozen features of real (tiny) Swin / PVT / ViT checkpoints: shapes, pooling, freezing, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from ummae.errors import UmmaeError
from ummae.evaluate.features import eval_datasets, extract_features, load_frozen_backbone, pool_features

ARCHS = ("swin", "pvt", "vit")


def images(n: int = 5, size: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 2)


def test_pool_features_averages_the_map_or_the_patch_tokens():
    fmap = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)  # [B, h, w, C]
    assert torch.equal(pool_features(fmap), fmap.mean(dim=(1, 2)))
    tokens = torch.randn(2, 1 + 6, 4)  # [B, 1+N, C], class token first
    tokens[:, 0] = 1e6  # must not leak into the average
    assert torch.allclose(pool_features(tokens, num_prefix_tokens=1), tokens[:, 1:].mean(dim=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_features_of_each_backbone_are_one_frozen_vector_per_image(arch, arch_checkpoints):
    backbone, cfg = load_frozen_backbone(arch_checkpoints[arch])
    assert cfg.model.arch == arch
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    feats, labels = extract_features(backbone, images(5), batch_size=2)
    assert feats.shape == (5, backbone.num_features) and feats.dtype == torch.float32
    assert torch.equal(labels, torch.arange(5) % 2) and labels.dtype == torch.long
    assert torch.isfinite(feats).all()
    # Same numbers in one batch as in three: order kept, nothing depends on the batch.
    whole, _ = extract_features(backbone, images(5), batch_size=5)
    assert torch.allclose(feats, whole, atol=1e-5)
    # The vector is the global average of the final features (ViT: patch tokens only).
    x = images(1)[0][0].unsqueeze(0)
    with torch.no_grad():
        final = backbone.forward_features(x)
    if arch == "vit":
        assert final.ndim == 3 and final.shape[1] == 1 + (64 // 16) ** 2
        expected = final[:, 1:].mean(dim=1)
    else:
        assert final.ndim == 4
        expected = final.mean(dim=(1, 2))
    assert torch.allclose(feats[:1], expected, atol=1e-5)


@pytest.mark.parametrize("arch", ("swin", "vit"))
def test_init_random_is_seeded_and_differs_from_the_pretrained_weights(arch, arch_checkpoints):
    path = arch_checkpoints[arch]
    state = torch.get_rng_state()
    a, _ = load_frozen_backbone(path, init_random=True, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    b, _ = load_frozen_backbone(path, init_random=True, seed=1)
    c, _ = load_frozen_backbone(path, init_random=True, seed=2)
    trained, _ = load_frozen_backbone(path)
    fa, fb, fc, ft = (extract_features(m, images(3))[0] for m in (a, b, c, trained))
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa, fc) and not torch.allclose(fa, ft)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_vit_at_another_size_than_pretraining_is_a_one_line_error(arch_checkpoints):
    with pytest.raises(UmmaeError, match="do not fit a 96 px backbone") as info:
        load_frozen_backbone(arch_checkpoints["vit"], img_size=96)
    assert "\n" not in str(info.value)


def test_swin_runs_at_another_size(arch_checkpoints):
    backbone, _ = load_frozen_backbone(arch_checkpoints["swin"], img_size=128)
    feats, _ = extract_features(backbone, images(2, size=128))
    assert feats.shape == (2, backbone.num_features)


def test_a_class_with_one_image_leaves_no_validation_split(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / cls / "only.png")
    with pytest.raises(UmmaeError, match="validation split .* is empty"):
        eval_datasets(tmp_path, img_size=32)
