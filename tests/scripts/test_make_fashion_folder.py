"""scripts/make_fashion_folder.py: IDX files (built here, a few hundred images) -> labeled folders."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_fashion_folder.py"


@pytest.fixture(scope="module")
def importer():
    spec = importlib.util.spec_from_file_location("make_fashion_folder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def idx_bytes(values: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x000008<ndim>, big-endian int32 sizes, values."""
    header = bytes([0, 0, 0x08, values.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in values.shape)
    return header + values.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int, n_test: int, compress: bool, seed: int = 0) -> dict:
    """Four IDX files like Fashion-MNIST's (28x28, labels 0-9 in turn); returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for stem, values in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(values)
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(importer, tmp_path, compress):
    arrays = write_idx_set(tmp_path, 30, 10, compress)
    suffix = ".gz" if compress else ""
    images = importer.read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    labels = importer.read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert images.shape == (30, 28, 28) and np.array_equal(images, arrays["train"][0])
    assert np.array_equal(labels, arrays["train"][1])


def test_folders_padded_losslessly_with_class_names(importer, tmp_path):
    arrays = write_idx_set(tmp_path / "idx", 300, 100, compress=True)
    code = importer.main([str(tmp_path / "out"), "--source", str(tmp_path / "idx"), "--size", "32"])
    assert code == 0
    train = tmp_path / "out" / "train"
    classes = sorted(p.name for p in train.iterdir())
    assert classes == [f"{i}_{n}" for i, n in enumerate(importer.FASHION_CLASSES)]
    assert sum(1 for _ in train.rglob("*.png")) == 300
    assert sum(1 for _ in (tmp_path / "out" / "test").rglob("*.png")) == 100
    # image 7 of the training file: label 7, the original 28x28 pixels inside 2 px of black
    img = np.asarray(Image.open(train / classes[7] / "00007.png"))
    assert img.shape == (32, 32)
    assert np.array_equal(img[2:30, 2:30], arrays["train"][0][7])
    assert img[:2].max() == 0 and img[:, :2].max() == 0 and img[30:].max() == 0


def test_bicubic_resize_and_bare_label_names(importer, tmp_path):
    write_idx_set(tmp_path / "idx", 20, 10, compress=False)
    code = importer.main([str(tmp_path / "out"), "--source", str(tmp_path / "idx"), "--size", "16",
                          "--resize", "bicubic", "--names", "none"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out" / "test").iterdir()) == [str(i) for i in range(10)]
    assert Image.open(tmp_path / "out" / "test" / "3" / "00003.png").size == (16, 16)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_missing_files_one_line_exit_2(tmp_path):
    r = run_script(str(tmp_path / "out"), "--source", str(tmp_path / "nothing"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no IDX file" in r.stderr and "Traceback" not in r.stderr


def test_missing_package_names_the_install_command(importer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(importer, "DEFAULT_SOURCE", tmp_path / "not-installed")
    code = importer.main([str(tmp_path / "out")])  # the default --source: the package's folder
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install dataset-fashion-mnist" in err and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["magic", "truncated", "header"])
def test_bad_idx_one_line_exit_2(tmp_path, damage):
    write_idx_set(tmp_path / "idx", 20, 10, compress=False)
    path = tmp_path / "idx" / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes({"magic": b"\x00\x00\x0d\x03" + data[4:], "truncated": data[:-100], "header": data[:9]}[damage])
    r = run_script(str(tmp_path / "out"), "--source", str(tmp_path / "idx"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert {"magic": "not an unsigned-byte IDX", "truncated": "truncated", "header": "truncated header"}[damage] in r.stderr


def test_not_gzip_one_line(tmp_path):
    write_idx_set(tmp_path / "idx", 20, 10, compress=True)
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"plain bytes, not gzip")
    r = run_script(str(tmp_path / "out"), "--source", str(tmp_path / "idx"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read" in r.stderr
