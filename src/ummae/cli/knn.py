"""`ummae knn`: k-NN accuracy of a pre-trained encoder's frozen features on a labeled folder.

The options that choose the checkpoint, the images and the feature pass are shared with
`ummae linprobe` (`add_feature_arguments`, `features_from_args`, `write_json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser", "run", "add_feature_arguments", "features_from_args", "describe", "headline",
           "percent", "write_json", "skipped_line"]

EPILOG = """\
Features: global average pool of the backbone's final features (ViT: mean of the patch tokens),
L2-normalised, from the evaluation transform (resize + centre crop) at the pre-training size.
Each validation image is classified by its k most similar training images (cosine similarity),
each voting with weight exp(similarity / T), as in DINO. Accuracies are percentages; top-5 is
reported only with at least 5 classes. Unreadable images are left out, counted and named (as in
pretraining); a folder with only one class, or no readable image, is refused.

--json FILE writes: command, checkpoint, init_random, seed, arch, method, img_size, num_train,
num_val, num_classes, classes, feature_dim, skipped_images (unreadable files left out), temperature,
results = [{k, top1, top5}] (top5 null with fewer than 5 classes).

examples:
  ummae knn --checkpoint runs/demo/checkpoint.pt --data flowers/ --k 10 20
  ummae knn --checkpoint ckpt.pt --data imagenet/train --val-data imagenet/val --device cuda
  ummae knn --checkpoint ckpt.pt --data flowers/ --init-random     the baseline to beat
"""


def add_feature_arguments(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """Checkpoint, labeled data and feature-pass options (`ummae knn` and `ummae linprobe`)."""
    p.add_argument("--checkpoint", metavar="CKPT", required=True,
                   help="an `ummae pretrain` checkpoint (.pt) or an `ummae export` .safetensors file")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="labeled training images: DIR/<class>/*.jpg (class = folder name)")
    p.add_argument("--val-data", metavar="DIR",
                   help="labeled validation images with the same class folders; default: hold out "
                        "--val-fraction of --data")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of every class held out for validation without --val-data (default 0.2)")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="evaluation image size (default: the pre-training size; ViT only supports that)")
    p.add_argument(batch_flag, type=int, default=64, metavar="N", dest="extract_batch_size",
                   help="images per forward pass of the frozen encoder (default 64)")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="image loading processes (default 4)")
    p.add_argument("--num-workers", type=int, default=argparse.SUPPRESS, dest="workers",
                   help=argparse.SUPPRESS)  # finetune's old spelling, accepted everywhere
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--init-random", action="store_true",
                   help="evaluate the same architecture randomly initialised (seeded): the baseline")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the validation split and of --init-random (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def features_from_args(args: argparse.Namespace):
    """The cached train / validation features the options describe (`LabeledFeatures`)."""
    from ..errors import ConfigError
    from ..evaluate.features import labeled_features

    if args.extract_batch_size < 1 or args.workers < 0:
        raise ConfigError("the feature batch size must be >= 1 and --workers >= 0")
    if args.img_size is not None and args.img_size < 1:
        raise ConfigError(f"--img-size must be positive, got {args.img_size}")
    return labeled_features(args.checkpoint, args.data, args.val_data, args.val_fraction, args.img_size,
                            args.extract_batch_size, args.device, args.workers, args.init_random,
                            args.seed, progress=not args.no_progress)


def describe(args: argparse.Namespace, feats) -> dict:
    """The JSON fields that say what was evaluated on what."""
    return {"checkpoint": str(args.checkpoint), "init_random": bool(args.init_random), "seed": args.seed,
            "arch": feats.cfg.model.arch, "method": feats.cfg.method, "img_size": feats.img_size,
            "num_train": len(feats.train_labels), "num_val": len(feats.val_labels),
            "num_classes": len(feats.classes), "classes": feats.classes, "feature_dim": feats.feature_dim,
            "skipped_images": feats.skipped}


def skipped_line(paths: list[str], listing=None) -> str | None:
    """The summary line about unreadable images left out (None if there were none)."""
    if not paths:
        return None
    where = f"listed in {listing}" if listing is not None else ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")
    return f"  skipped          {len(paths)} unreadable image(s), {where}"


def headline(command: str, info: dict) -> str:
    weights = f"random init, seed {info['seed']}" if info["init_random"] else "pre-trained"
    return (f"ummae {command}: {info['arch']} ({weights}) from {info['checkpoint']}, {info['img_size']} px, "
            f"{info['feature_dim']}-d features; {info['num_train']} train / {info['num_val']} val images, "
            f"{info['num_classes']} classes")


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
    results = knn_evaluate(feats.train_features.to(dev), feats.train_labels, feats.val_features,
                           feats.val_labels, ks, args.temperature, num_classes=len(feats.classes))
    info = describe(args, feats)
    print(headline("knn", info))
    for k in ks:
        note = f"   (k > {info['num_train']} training images: all of them vote)" if k > info["num_train"] else ""
        print(f"  k {k:<4d} T {args.temperature:<6g} top-1 {percent(results[k]['top1'])}   "
              f"top-5 {percent(results[k]['top5'])}{note}")
    if feats.skipped:
        print(skipped_line(feats.skipped))
    if args.json:
        write_json(args.json, {"command": "knn", **info, "temperature": args.temperature,
                               "results": [{"k": k, **results[k]} for k in ks]})
    return 0
