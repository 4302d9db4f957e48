"""Write scikit-learn's handwritten digits (real 8x8 scans, 1797 images, 10 classes) as a labeled
image folder, for the pre-training evidence in docs/benchmarks.md.

    pip install scikit-learn
    python scripts/make_digits_folder.py data/digits --size 64

makes data/digits/{train,val}/<digit>/<n>.png: a stratified 80/20 split (seed 0), each image
upscaled bicubically to --size px (so a mask unit of 8 px holds a smooth patch rather than one
flat pixel, which per-unit normalised targets could not use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args()

    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # an optional dependency: one line saying how to get it, not a traceback
        sys.exit("make_digits_folder.py: the digits come with scikit-learn, which is not installed: "
                 "pip install scikit-learn")

    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)  # 0..16 grey levels
    idx = np.arange(len(images))
    train, val = train_test_split(idx, test_size=args.val_fraction, stratify=digits.target, random_state=0)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = args.out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((args.size, args.size), Image.BICUBIC)
            img.convert("RGB").save(folder / f"{i:04d}.png")
    print(f"wrote {len(train)} train and {len(val)} val images to {args.out}")


if __name__ == "__main__":
    main()
