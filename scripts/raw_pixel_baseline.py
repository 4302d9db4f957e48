"""Raw-pixel baseline for the frozen-feature evaluations in docs/benchmarks.md: the same k-NN
(cosine, T 0.07) and linear probe (BatchNorm + linear, 90 epochs) as `ummae knn` / `ummae
linprobe`, on the flattened, normalised input pixels instead of an encoder's features.

    python scripts/raw_pixel_baseline.py data/digits/train data/digits/val --img-size 64 --json raw.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def pixels(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=256):
        images.append(x.flatten(1))
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels)


def main() -> None:
    from ummae.evaluate.features import eval_datasets
    from ummae.evaluate.knn import knn_evaluate
    from ummae.evaluate.linprobe import linear_probe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("val_data", type=Path)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    train, val, classes = eval_datasets(args.data, args.val_data, img_size=args.img_size)
    train_x, train_y = pixels(train)
    val_x, val_y = pixels(val)
    knn = knn_evaluate(train_x, train_y, val_x, val_y, ks=args.k, num_classes=len(classes))
    probes = {}
    for seed in args.seeds:
        result = linear_probe(train_x, train_y, val_x, val_y, num_classes=len(classes), seed=seed)
        probes[seed] = {"final_top1": result.final["top1"], "best_top1": result.best_top1}
    record = {"features": f"raw pixels, {args.img_size} px, ImageNet-normalised, flattened",
              "feature_dim": train_x.shape[1], "num_train": len(train_y), "num_val": len(val_y),
              "knn": {str(k): v for k, v in knn.items()}, "linprobe": probes}
    args.json.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
