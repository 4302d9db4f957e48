"""The raw-pixel baseline: the very images, split and transform of `labeled_features`, flattened."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ummae.evaluate.features as features_module
from ummae.data.transforms import eval_transform
from ummae.evaluate import knn_evaluate, labeled_features, raw_pixel_features


def write_folder(root, per_class: dict[str, np.ndarray]) -> None:
    """`root/<class>/<i>.png` from `{class: uint8 array [n, H, W, 3]}`."""
    for name, images in per_class.items():
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")


@pytest.fixture
def mixed(tmp_path):
    """Two classes of 6 non-square noise images each, and one unreadable file in the first."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mixed"
    write_folder(root, {c: rng.integers(0, 256, (6, 20, 30, 3), dtype=np.uint8) for c in ("a", "b")})
    (root / "a" / "bad.png").write_bytes(b"not a png")
    return root


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_features_are_the_flattened_evaluation_transform_of_each_readable_image(mixed):
    f = raw_pixel_features(mixed, val_fraction=0.25, img_size=8, seed=3)
    assert f.source == "raw_pixels" and f.cfg is None and f.img_size == 8
    assert f.feature_dim == 3 * 8 * 8
    assert f.skipped == [str(mixed / "a" / "bad.png")]
    # The expected rows, computed here from the files (PIL + the evaluation transform) in the
    # order of the seeded split the evaluations use.
    train, val, _ = features_module.eval_datasets(mixed, None, 0.25, 8, 3)
    transform = eval_transform(8)
    for subset, got, labels in ((train, f.train_features, f.train_labels), (val, f.val_features, f.val_labels)):
        split = subset.dataset  # SkipUnreadable -> Subset of an ImageFolder
        samples = [split.dataset.samples[i] for i in split.indices]
        readable = [(p, y) for p, y in samples if not p.endswith("bad.png")]
        expected = torch.stack([transform(Image.open(p).convert("RGB")).flatten() for p, _ in readable])
        assert torch.allclose(got, expected, atol=1e-6)
        assert labels.tolist() == [y for _, y in readable]
    assert len(f.train_labels) + len(f.val_labels) == 12  # 13 files, one unreadable


class ChannelMeans(torch.nn.Module):
    """A stand-in encoder: `[B, 3, H, W] -> [B, H, W, 3]`, so the pooled feature is each channel's mean."""

    num_prefix_tokens = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_same_images_in_the_same_order_as_labeled_features(mixed, monkeypatch):
    cfg = SimpleNamespace(data=SimpleNamespace(img_size=8))
    monkeypatch.setattr(features_module, "load_frozen_backbone", lambda *a, **k: (ChannelMeans(), cfg))
    encoded = labeled_features("unused.pt", mixed, val_fraction=0.25, device="cpu", seed=5)
    raw = raw_pixel_features(mixed, val_fraction=0.25, img_size=8, seed=5)
    assert raw.skipped == encoded.skipped and raw.classes == encoded.classes
    for r, e in ((raw.train_features, encoded.train_features), (raw.val_features, encoded.val_features)):
        assert torch.allclose(r.view(len(r), 3, -1).mean(dim=2), e, atol=1e-5)
    assert torch.equal(raw.train_labels, encoded.train_labels) and torch.equal(raw.val_labels, encoded.val_labels)


def _dark_and_bright(rng, n: int) -> dict[str, np.ndarray]:
    """Class 'dark' in [0, 90], 'bright' in [165, 255]: separable in pixel space."""
    return {"bright": rng.integers(165, 256, (n, 10, 10, 3), dtype=np.uint8),
            "dark": rng.integers(0, 91, (n, 10, 10, 3), dtype=np.uint8)}


def test_knn_on_raw_pixels_separates_a_pixel_separable_folder_and_not_shuffled_labels(tmp_path):
    rng = np.random.default_rng(1)
    write_folder(tmp_path / "train", _dark_and_bright(rng, 30))
    write_folder(tmp_path / "val", _dark_and_bright(rng, 30))
    f = raw_pixel_features(tmp_path / "train", tmp_path / "val", img_size=8)
    result = knn_evaluate(f.train_features, f.train_labels, f.val_features, f.val_labels, ks=(5,))
    assert result[5]["top1"] == 100.0

    # Negative control: the same kind of images with labels assigned at random (half per class).
    shuffled = {}
    for split in ("train", "val"):
        images = np.concatenate(list(_dark_and_bright(rng, 30).values()))[rng.permutation(60)]
        shuffled[split] = tmp_path / f"shuffled_{split}"
        write_folder(shuffled[split], {"bright": images[:30], "dark": images[30:]})
    g = raw_pixel_features(shuffled["train"], shuffled["val"], img_size=8)
    chance = knn_evaluate(g.train_features, g.train_labels, g.val_features, g.val_labels, ks=(5,))[5]["top1"]
    assert 30.0 <= chance <= 70.0, chance  # 60 validation images: chance is 50% +- 6.5% (1 sd)
