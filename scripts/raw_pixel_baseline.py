"""Raw-pixel baseline for the frozen-feature evaluations in docs/benchmarks.md, in one JSON file:
k-NN for several k and the linear probe for several seeds, from one pass over the images.

A thin wrapper over the library: `ummae.evaluate.raw_pixel_features` (the flattened, normalised
evaluation-transform pixels, same split as `ummae knn` / `ummae linprobe`), `knn_evaluate` and
`linear_probe` with the commands' defaults. One setting at a time is one command:

    ummae knn --raw-pixels --img-size 64 --data data/digits/train --val-data data/digits/val --k 10 20
    ummae linprobe --raw-pixels --img-size 64 --data data/digits/train --val-data data/digits/val

This script:

    python scripts/raw_pixel_baseline.py data/digits/train data/digits/val --img-size 64 --json raw.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from ummae.evaluate import knn_evaluate, linear_probe, raw_pixel_features

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("val_data", type=Path)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    f = raw_pixel_features(args.data, args.val_data, img_size=args.img_size)
    knn = knn_evaluate(f.train_features, f.train_labels, f.val_features, f.val_labels, ks=args.k,
                       num_classes=len(f.classes))
    probes = {}
    for seed in args.seeds:
        result = linear_probe(f.train_features, f.train_labels, f.val_features, f.val_labels,
                              num_classes=len(f.classes), seed=seed)
        probes[seed] = {"final_top1": result.final["top1"], "best_top1": result.best_top1}
    record = {"features": f"raw pixels, {args.img_size} px, ImageNet-normalised, flattened",
              "feature_dim": f.feature_dim, "num_train": len(f.train_labels), "num_val": len(f.val_labels),
              "skipped_images": f.skipped, "knn": {str(k): v for k, v in knn.items()}, "linprobe": probes}
    args.json.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
