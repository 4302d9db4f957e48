"""k-NN and linear probe on raw pixels: the floor any frozen encoder has to clear.

Each image goes through the same evaluation transform as `ummae knn` / `ummae linprobe` (resize +
centre crop + ImageNet normalisation) and is flattened to one `3*S*S` vector; k-NN and the linear
probe then run with the same code and defaults as the two commands.

    python scripts/raw_pixel_baseline.py --data data/digits/train --val-data data/digits/val --img-size 64
"""

from __future__ import annotations

import argparse
import json

import torch

from ummae.evaluate.features import eval_datasets
from ummae.evaluate.knn import knn_evaluate
from ummae.evaluate.linprobe import linear_probe


def pixels(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).flatten(1), torch.as_tensor(labels)  # [N, 3*S*S], [N]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--val-data", required=True)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[10, 20])
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    train, val, classes = eval_datasets(args.data, args.val_data, img_size=args.img_size, seed=args.seed)
    train_x, train_y = pixels(train)
    val_x, val_y = pixels(val)
    knn = knn_evaluate(train_x, train_y, val_x, val_y, args.k, 0.07, num_classes=len(classes))
    probe = linear_probe(train_x, train_y, val_x, val_y, num_classes=len(classes), epochs=args.epochs,
                         seed=args.seed)
    print(json.dumps({"feature_dim": train_x.shape[1], "num_train": len(train_y), "num_val": len(val_y),
                      "knn": {str(k): knn[k] for k in args.k},
                      "linprobe_final_top1": probe.final["top1"], "linprobe_best_top1": probe.best_top1}))


if __name__ == "__main__":
    main()
