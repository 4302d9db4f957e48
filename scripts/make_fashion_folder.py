"""Write an IDX data set (Fashion-MNIST, MNIST: four `*-ubyte[.gz]` files) as labeled image folders.

    apt-get install dataset-fashion-mnist        # Debian: the four IDX files, 30 MB
    python scripts/make_fashion_folder.py data/fashion --size 32
    python scripts/make_fashion_folder.py data/fashion --size 32 --shards 10000   # + tar shards of train

makes `OUT/train/<class>/<n>.png` (the 60,000 training images) and `OUT/test/<class>/<n>.png`
(the official 10,000 test images), grey PNGs, the folder names the class names in their label
order (`0_tshirt-top`, `1_trouser`, ...; sorted, they keep the official label indices). `--size`
above 28: the 28x28 image is padded with black borders (`--resize pad`, lossless: the original
pixels unchanged, the background is black), or resized bicubically (`--resize bicubic`, any size).
`--shards N`: also `ummae shards` of `OUT/train` into `OUT/shards/` (N images per tar).

The IDX format (LeCun's): a big-endian magic `0x0000TTDD` (type TT = 0x08: unsigned bytes; DD
dimensions), DD big-endian int32 sizes, then the values, row-major.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")  # where Debian's package puts the files
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
# Fashion-MNIST's classes in label order (Zalando's README), as folder names.
FASHION_CLASSES = ["tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]
SPLITS = {"train": "train", "test": "t10k"}  # folder -> IDX file prefix


class IdxError(ValueError):
    """An IDX file that is not one (wrong magic, truncated, sizes that disagree)."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (plain or gzip) -> `uint8` array of the shape its header states.

    Raises:
        IdxError: not an unsigned-byte IDX file, or fewer values than the header states.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip's "not a gzipped file", a cut-off gzip stream
        raise IdxError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise IdxError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'}, "
                       f"expected 000008 + number of dimensions)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(raw) - header < count:
        raise IdxError(f"{path}: truncated: {len(raw) - header} values, its header {list(shape)} states {count}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(shape)


def idx_file(source: Path, stem: str) -> Path:
    """`source/stem` or `source/stem.gz`, whichever exists (FileNotFoundError otherwise)."""
    for path in (source / f"{stem}.gz", source / stem):
        if path.exists():
            return path
    raise FileNotFoundError(source / f"{stem}.gz")


def load_split(source: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """`[N, H, W]` images and `[N]` labels of one split (`prefix`: 'train' or 't10k')."""
    images = read_idx(idx_file(source, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(idx_file(source, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IdxError(f"{source}: {prefix} images {list(images.shape)} and labels {list(labels.shape)} "
                       "do not pair up (expected [N, H, W] and [N])")
    return images, labels


def to_size(image: np.ndarray, size: int, resize: str) -> Image.Image:
    """`[H, W]` grey image -> `size` x `size` PIL image: black borders ('pad') or bicubic ('bicubic')."""
    h, w = image.shape
    if resize == "bicubic" or (h, w) == (size, size):
        return Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC)
    top, left = (size - h) // 2, (size - w) // 2
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[top:top + h, left:left + w] = image
    return Image.fromarray(canvas, mode="L")


def class_names(num_classes: int, names: list[str] | None) -> list[str]:
    """Folder names `<label>_<name>` that sort in label order (bare labels without names)."""
    width = len(str(num_classes - 1))
    if names is None or len(names) != num_classes:
        return [f"{i:0{width}d}" for i in range(num_classes)]
    return [f"{i:0{width}d}_{n}" for i, n in enumerate(names)]


def write_folders(source: Path, out: Path, size: int, resize: str, names: list[str] | None) -> dict[str, int]:
    """Both splits as `out/<split>/<class>/<n>.png`; returns the number of images per split."""
    splits = {split: load_split(source, prefix) for split, prefix in SPLITS.items()}
    num_classes = int(max(labels.max() for _, labels in splits.values())) + 1
    folders = class_names(num_classes, names)
    h, w = splits["train"][0].shape[1:]
    if resize == "pad" and size < max(h, w):
        raise IdxError(f"--resize pad needs --size >= the images' {max(h, w)} px, got {size}")
    counts = {}
    for split, (images, labels) in splits.items():
        for c in folders:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            to_size(image, size, resize).save(out / split / folders[label] / f"{i:05d}.png")
        counts[split] = len(images)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder to write train/ and test/ into")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                   help=f"folder of the four IDX files (default {DEFAULT_SOURCE}: Debian's package)")
    p.add_argument("--size", type=int, default=32, help="output side in px (default 32)")
    p.add_argument("--resize", choices=["pad", "bicubic"], default="pad",
                   help="pad: black borders around the original pixels (default); bicubic: rescale")
    p.add_argument("--names", choices=["fashion", "none"], default="fashion",
                   help="class folder names: Fashion-MNIST's (default) or bare labels (MNIST)")
    p.add_argument("--shards", type=int, metavar="N", help="also pack train/ into tar shards of N images")
    args = p.parse_args(argv)
    if args.size < 1:
        print(f"error: --size must be positive, got {args.size}", file=sys.stderr)
        return 2
    try:
        counts = write_folders(args.source, args.out, args.size, args.resize,
                               FASHION_CLASSES if args.names == "fashion" else None)
    except FileNotFoundError as e:
        hint = f" (install it: {INSTALL_HINT})" if args.source == DEFAULT_SOURCE else ""
        print(f"error: no IDX file {e.args[0] if e.args else e}{hint}", file=sys.stderr)
        return 2
    except IdxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['test']} test images ({args.size} px, {args.resize}) "
          f"to {args.out}")
    if args.shards:
        cmd = [sys.executable, "-m", "ummae", "shards", "--data", str(args.out / "train"),
               "--out", str(args.out / "shards"), "--shard-size", str(args.shards)]
        return subprocess.run(cmd).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
