"""`ummae knn`: k-NN accuracy of a pre-trained encoder's frozen features on a labeled folder.

The options that choose the checkpoint (or the raw-pixel baseline), the images, the feature pass
and the few-label draws are shared with `ummae linprobe` (`add_feature_arguments`,
`features_from_args`, `describe`, `write_json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser", "run", "add_feature_arguments", "check_feature_arguments", "features_from_args",
           "describe", "headline", "few_label_line", "summary_fields", "range_text", "percent", "write_json",
           "skipped_line"]

DEFAULT_DRAWS = 5

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


def add_feature_arguments(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """Checkpoint, labeled data and feature-pass options (`ummae knn` and `ummae linprobe`)."""
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="an `ummae pretrain` checkpoint (.pt) or an `ummae export` .safetensors file "
                        "(required unless --raw-pixels)")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="labeled training images: DIR/<class>/*.jpg (class = folder name)")
    p.add_argument("--val-data", metavar="DIR",
                   help="labeled validation images with the same class folders; default: hold out "
                        "--val-fraction of --data")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of every class held out for validation without --val-data (default 0.2)")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="evaluation image size (default: the pre-training size; ViT only supports that; "
                        "required with --raw-pixels)")
    p.add_argument(batch_flag, type=int, default=64, metavar="N", dest="extract_batch_size",
                   help="images per forward pass of the frozen encoder (default 64)")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="image loading processes (default 4)")
    p.add_argument("--num-workers", type=int, default=argparse.SUPPRESS, dest="workers",
                   help=argparse.SUPPRESS)  # finetune's old spelling, accepted everywhere
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--init-random", action="store_true",
                   help="evaluate the same architecture randomly initialised (seeded): the baseline")
    p.add_argument("--raw-pixels", action="store_true",
                   help="no encoder: the flattened, normalised input pixels at --img-size are the features "
                        "(the raw-pixel baseline; no --checkpoint)")
    p.add_argument("--labels-per-class", type=int, metavar="N",
                   help="few labels: keep only N training images per class (a seeded stratified draw)")
    p.add_argument("--draws", type=int, metavar="D",
                   help=f"with --labels-per-class: how many random subsets (default {DEFAULT_DRAWS}); "
                        "each is reported, then mean, min and max")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the validation split, of --init-random and of the few-label draws (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_feature_arguments(args: argparse.Namespace) -> None:
    """The feature and few-label options' own checks: before any work, so a typo costs nothing.

    Also fills in the default `--draws` when `--labels-per-class` is given (None otherwise)."""
    from ..errors import ConfigError

    if args.raw_pixels:
        if args.checkpoint is not None:
            raise ConfigError("--checkpoint and --raw-pixels exclude each other: --raw-pixels evaluates the "
                              "input pixels themselves, without an encoder")
        if args.init_random:
            raise ConfigError("--init-random and --raw-pixels exclude each other: raw pixels have no weights")
        if args.img_size is None:
            raise ConfigError("--raw-pixels needs --img-size PX (there is no checkpoint to take the size from)")
    elif args.checkpoint is None:
        raise ConfigError("give --checkpoint CKPT, or --raw-pixels for the raw-pixel baseline")
    if args.extract_batch_size < 1 or args.workers < 0:
        raise ConfigError("the feature batch size must be >= 1 and --workers >= 0")
    if args.img_size is not None and args.img_size < 1:
        raise ConfigError(f"--img-size must be positive, got {args.img_size}")
    if args.labels_per_class is None:
        if args.draws is not None:
            raise ConfigError("--draws needs --labels-per-class N")
    else:
        if args.labels_per_class < 1:
            raise ConfigError(f"--labels-per-class must be >= 1, got {args.labels_per_class}")
        if args.draws is None:
            args.draws = DEFAULT_DRAWS
        if args.draws < 1:
            raise ConfigError(f"--draws must be >= 1, got {args.draws}")


def features_from_args(args: argparse.Namespace):
    """The cached train / validation features the options describe (`LabeledFeatures`): computed
    once, whatever the number of few-label draws."""
    from ..evaluate.features import labeled_features, raw_pixel_features

    check_feature_arguments(args)
    if args.raw_pixels:
        return raw_pixel_features(args.data, args.val_data, args.val_fraction, args.img_size,
                                  args.extract_batch_size, args.workers, args.seed,
                                  progress=not args.no_progress)
    return labeled_features(args.checkpoint, args.data, args.val_data, args.val_fraction, args.img_size,
                            args.extract_batch_size, args.device, args.workers, args.init_random,
                            args.seed, progress=not args.no_progress)


def describe(args: argparse.Namespace, feats) -> dict:
    """The JSON fields that say what was evaluated on what."""
    info = {"features": feats.source, "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
            "init_random": bool(args.init_random), "seed": args.seed,
            "arch": feats.cfg.model.arch if feats.cfg is not None else None,
            "method": feats.cfg.method if feats.cfg is not None else None, "img_size": feats.img_size,
            "num_train": len(feats.train_labels), "num_val": len(feats.val_labels),
            "num_classes": len(feats.classes), "classes": feats.classes, "feature_dim": feats.feature_dim,
            "skipped_images": feats.skipped}
    if args.labels_per_class is not None:
        info.update(labels_per_class=args.labels_per_class, num_draws=args.draws,
                    num_train_per_draw=args.labels_per_class * len(feats.classes))
    return info


def few_label_line(info: dict) -> str:
    """The summary line that says what a few-label evaluation draws."""
    return (f"  few labels       {info['labels_per_class']} per class ({info['num_train_per_draw']} training "
            f"images per draw), {info['num_draws']} draw(s) seeded by --seed {info['seed']}; full "
            f"validation set")


def summary_fields(key: str, summary: dict | None) -> dict:
    """A `summarize` result as flat JSON fields: `key` (the mean over the draws), `key_min`, `key_max`."""
    if summary is None:
        return {key: None, f"{key}_min": None, f"{key}_max": None}
    return {key: summary["mean"], f"{key}_min": summary["min"], f"{key}_max": summary["max"]}


def range_text(summary: dict | None) -> str:
    """`mean  93.10%  (min  91.00%, max  94.50%)` of a `summarize` result ("-" for None)."""
    if summary is None:
        return "     -"
    return f"mean {percent(summary['mean'])} (min {percent(summary['min'])}, max {percent(summary['max'])})"


def skipped_line(paths: list[str], listing=None) -> str | None:
    """The summary line about unreadable images left out (None if there were none)."""
    if not paths:
        return None
    where = f"listed in {listing}" if listing is not None else ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")
    return f"  skipped          {len(paths)} unreadable image(s), {where}"


def headline(command: str, info: dict) -> str:
    if info["features"] == "raw_pixels":
        what = "raw pixels (flattened, ImageNet-normalised)"
    else:
        weights = f"random init, seed {info['seed']}" if info["init_random"] else "pre-trained"
        what = f"{info['arch']} ({weights}) from {info['checkpoint']}"
    return (f"ummae {command}: {what}, {info['img_size']} px, {info['feature_dim']}-d features; "
            f"{info['num_train']} train / {info['num_val']} val images, {info['num_classes']} classes")


def write_json(path: str, record: dict) -> None:
    from ..errors import UmmaeError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise UmmaeError(f"--json: cannot write '{path}': {e.strerror or e}") from None


def percent(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.2f}%"


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
    from ..engine.pretrain import resolve_device
    from ..errors import ConfigError
    from ..evaluate.few_label import few_label, summarize
    from ..evaluate.knn import knn_evaluate

    # Checked before the (slow) feature pass, so a typo costs nothing.
    if any(k < 1 for k in args.k):
        raise ConfigError(f"--k must be positive, got {args.k}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
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
