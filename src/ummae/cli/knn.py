"""`ummae knn`: k-NN accuracy of a pre-trained encoder's frozen features on a labeled folder.

The options that choose the checkpoint (or the raw-pixel baseline), the images, the feature pass
and the few-label draws are shared with `ummae linprobe` (`cli.common`).
"""

from __future__ import annotations

import argparse

from .common import (add_feature_arguments, check_feature_arguments, describe, features_from_args, few_label_line,
                     headline, percent, range_text, skipped_line, summary_fields, write_json)

__all__ = ["add_parser", "run"]

EPILOG = """\
Features: global average pool of the backbone's final features (ViT: mean of the patch tokens),
L2-normalised, from the evaluation transform (resize + centre crop) at the pre-training size.
Each validation image is classified by its k most similar training images (cosine similarity),
each voting with weight exp(similarity / T), as in DINO. Accuracies are percentages; top-5 is
reported only with at least 5 classes. Unreadable images are left out, counted and named (as in
pretraining); a folder with only one class, or no readable image, is refused.

Baselines a pre-trained encoder has to beat: --init-random (the same architecture, randomly
initialised) and --raw-pixels (no checkpoint: each image's flattened, ImageNet-normalised pixels
at --img-size, which it then requires; same images, split and transform as with a checkpoint).

Few labels: --labels-per-class N keeps N training images of every class (a stratified random
subset, seeded by --seed and the draw number) and classifies the full validation set with them;
--draws D (default 5) such subsets, each reported, then their mean, min and max. The images go
through the encoder once; the draws only subset the cached features. N larger than the smallest
class is refused.

--json FILE writes: command, features (pretrained, random_init or raw_pixels), checkpoint, init_random,
seed, arch, method, img_size, num_train, num_val, num_classes, classes, feature_dim, skipped_images
(unreadable files left out), temperature, results = [{k, top1, top5}] (top5 null with fewer than 5
classes; checkpoint, arch and method null for raw pixels). With --labels-per-class also
labels_per_class, num_draws, num_train_per_draw, draws = [{draw, num_train, results}], and each
results entry holds the mean over the draws in top1 / top5 plus top1_min, top1_max, top5_min, top5_max.

examples:
  ummae knn --checkpoint runs/demo/checkpoint.pt --data flowers/ --k 10 20
  ummae knn --checkpoint ckpt.pt --data imagenet/train --val-data imagenet/val --device cuda
  ummae knn --checkpoint ckpt.pt --data flowers/ --init-random     the baseline to beat
  ummae knn --raw-pixels --img-size 64 --data flowers/              the other baseline
  ummae knn --checkpoint ckpt.pt --data flowers/ --labels-per-class 10 --draws 5
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "knn", help="k-NN accuracy of a checkpoint's frozen features",
        description="Weighted k-nearest-neighbour classification (DINO's protocol) of a labeled image "
                    "folder with the frozen encoder of a pre-training checkpoint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_feature_arguments(p)
    p.add_argument("--k", type=int, nargs="+", default=[20], metavar="K",
                   help="neighbours voting per image; several values are evaluated in one pass (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, metavar="T",
                   help="vote weight exp(similarity / T) (default 0.07)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    # Checked before torch is imported and the (slow) feature pass runs, so a typo costs nothing.
    if any(k < 1 for k in args.k):
        raise ConfigError(f"--k must be positive, got {args.k}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    check_feature_arguments(args)

    from ..engine.distributed import resolve_device
    from ..evaluate.few_label import few_label, summarize
    from ..evaluate.knn import knn_evaluate

    feats = features_from_args(args)
    ks = list(dict.fromkeys(args.k))  # duplicates removed, order kept
    # The search compares every validation feature with every training feature: on the GPU if any.
    dev = resolve_device(args.device)

    def evaluate(train_x, train_y):
        return knn_evaluate(train_x.to(dev), train_y, feats.val_features, feats.val_labels, ks,
                            args.temperature, num_classes=len(feats.classes))

    info = describe(args, feats)
    record = {"command": "knn", **info, "temperature": args.temperature}
    if args.labels_per_class is None:
        results = evaluate(feats.train_features, feats.train_labels)
        print(headline("knn", info))
        for k in ks:
            note = f"   (k > {info['num_train']} training images: all of them vote)" if k > info["num_train"] else ""
            print(f"  k {k:<4d} T {args.temperature:<6g} top-1 {percent(results[k]['top1'])}   "
                  f"top-5 {percent(results[k]['top5'])}{note}")
        record["results"] = [{"k": k, **results[k]} for k in ks]
    else:
        draws = few_label(feats.train_features, feats.train_labels, args.labels_per_class, args.draws,
                          args.seed, evaluate, feats.classes)
        print(headline("knn", info))
        print(few_label_line(info))
        n = info["num_train_per_draw"]
        for d in draws:
            for k in ks:
                print(f"  draw {d.draw:<3d} k {k:<4d} top-1 {percent(d.result[k]['top1'])}   "
                      f"top-5 {percent(d.result[k]['top5'])}")
        record["draws"] = [{"draw": d.draw, "num_train": len(d.indices),
                            "results": [{"k": k, **d.result[k]} for k in ks]} for d in draws]
        record["results"] = []
        for k in ks:
            top1 = summarize([d.result[k]["top1"] for d in draws])
            top5 = summarize([d.result[k]["top5"] for d in draws])
            note = f"   (k > {n} training images: all of them vote)" if k > n else ""
            print(f"  k {k:<4d} T {args.temperature:<6g} top-1 {range_text(top1)}   top-5 {range_text(top5)}{note}")
            record["results"].append({"k": k, **summary_fields("top1", top1), **summary_fields("top5", top5)})
    if feats.skipped:
        print(skipped_line(feats.skipped))
    if args.json:
        write_json(args.json, record)
    return 0
