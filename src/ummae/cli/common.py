"""Helpers shared by commands: the frozen-feature options and summaries of `ummae knn` and
`ummae linprobe` (which checkpoint or the raw-pixel baseline, the images, the feature pass, the
few-label draws, the JSON record), and which process prints.

Imports of torch and the library stay inside the functions, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["add_feature_arguments", "check_feature_arguments", "features_from_args", "describe", "headline",
           "few_label_line", "summary_fields", "range_text", "percent", "write_json", "skipped_line", "is_main",
           "DEFAULT_DRAWS"]

DEFAULT_DRAWS = 5


def is_main() -> bool:
    """True in the process that prints a run's summary (rank 0 under torchrun, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


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
    p.add_argument("--workers", type=int, metavar="N",
                   help="image loading processes (default: fitted to the CPUs this process may use)")
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

    Also fills in the default `--draws` when `--labels-per-class` is given (None otherwise).
    Torch-free: the commands call it before importing anything heavy."""
    from ..errors import ConfigError
    from .checks import check_input, check_output

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
    check_input("--checkpoint", args.checkpoint)  # a .pt file, a .safetensors export or a run folder
    check_input("--data", args.data, "dir")
    check_input("--val-data", args.val_data, "dir")
    check_output("--json", args.json, "file")
    if args.extract_batch_size < 1 or (args.workers is not None and args.workers < 0):
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
