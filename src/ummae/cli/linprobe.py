"""`ummae linprobe`: linear-probe accuracy of a pre-trained encoder's frozen features (MAE's protocol)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (add_feature_arguments, check_feature_arguments, describe, features_from_args, few_label_line,
                  headline, percent, range_text, skipped_line, summary_fields, write_json)

__all__ = ["add_parser", "run", "HEAD_FILE"]

HEAD_FILE = "linprobe_head.pt"

EPILOG = f"""\
The frozen encoder runs once over every image (evaluation transform, no augmentation); a
BatchNorm (no affine) + linear head is then trained on those cached features: SGD, momentum 0.9,
no weight decay, lr = blr x batch / 256, linear warm-up then cosine, as MAE's linear probe
except that MAE uses LARS for its batch of 16384. Features: global average pool of the final
features (ViT: mean of the patch tokens). Accuracies are percentages on the validation set after
every epoch; top-5 only with at least 5 classes. The head saved with --out is the one after the
last epoch; "best" is the highest validation top-1 seen, as MAE reports it. Unreadable images are
left out, counted and named (with --out, listed in DIR/skipped_images.txt), as in pretraining; a
folder with only one class, or no readable image, is refused. The training batch is at most the
number of training images (a smaller set clips it, and the lr follows: blr x clipped batch / 256);
a clipped batch is reported.

Baselines a pre-trained encoder has to beat: --init-random (the same architecture, randomly
initialised) and --raw-pixels (no checkpoint: each image's flattened, ImageNet-normalised pixels
at --img-size, which it then requires; same images, split, transform and probe).

Few labels: --labels-per-class N trains the probe on N images of every class (a stratified random
subset, seeded by --seed and the draw number; the head's initialisation and shuffling keep --seed,
so the draws differ only in their labeled images) and scores it on the full validation set;
--draws D (default 5) such subsets, each reported, then mean, min and max. The images go through
the encoder once. N larger than the smallest class is refused; so is --out (one head per draw).

--out DIR writes DIR/{HEAD_FILE}: model (head state dict: norm.running_mean/var, fc.weight/bias),
classes, feature_dim, num_classes, features, backbone_checkpoint, init_random, arch, img_size, epochs,
final_top1, best_top1.
--json FILE writes: command, features (pretrained, random_init or raw_pixels), checkpoint, init_random,
seed, arch, method, img_size, num_train, num_val, num_classes, classes, feature_dim, skipped_images,
epochs, warmup_epochs, blr, lr, batch_size, final_top1, final_top5, best_top1, best_epoch,
history = [{{epoch, lr, loss, top1, top5}}], head (checkpoint, arch, method null for raw pixels).
With --labels-per-class: labels_per_class, num_draws, num_train_per_draw, draws = [{{draw, num_train,
lr, batch_size, final_top1, final_top5, best_top1, best_epoch, history}}]; final_top1, final_top5 and
best_top1 are then the means over the draws, each with _min and _max beside it; best_epoch, history
and head are null at the top level.

examples:
  ummae linprobe --checkpoint runs/demo/checkpoint.pt --data flowers/ --out runs/demo/linprobe
  ummae linprobe --checkpoint ckpt.pt --data imagenet/train --val-data imagenet/val --batch-size 1024
  ummae linprobe --checkpoint ckpt.pt --data flowers/ --init-random     the baseline to beat
  ummae linprobe --raw-pixels --img-size 64 --data flowers/              the other baseline
  ummae linprobe --checkpoint ckpt.pt --data flowers/ --labels-per-class 10 --draws 5
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "linprobe", help="linear-probe accuracy of a checkpoint's frozen features",
        description="Train a linear classifier (BatchNorm without affine + linear, MAE's linear probe) "
                    "on the frozen features of a pre-training checkpoint's encoder for a labeled image folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --batch-size is the head's training batch here (it sets the lr), so the encoder's batch is renamed.
    add_feature_arguments(p, batch_flag="--extract-batch-size")
    p.add_argument("--epochs", type=int, default=90, metavar="N", help="training epochs of the head (default 90)")
    p.add_argument("--warmup-epochs", type=float, default=10, metavar="N", help="linear warm-up (default 10)")
    p.add_argument("--blr", type=float, default=0.1, metavar="LR",
                   help="base learning rate: lr = blr x batch / 256 (default 0.1)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="features per training step of the head (default 256; at most the training set)")
    p.add_argument("--weight-decay", type=float, default=0.0, metavar="WD", help="SGD weight decay (default 0)")
    p.add_argument("--out", metavar="DIR", help=f"save the trained head as DIR/{HEAD_FILE}")
    p.set_defaults(run=run)


def _draw_record(result) -> dict:
    return {"lr": result.lr, "batch_size": result.batch_size, "final_top1": result.final["top1"],
            "final_top5": result.final["top5"], "best_top1": result.best_top1, "best_epoch": result.best_epoch}


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .checks import check_output

    # Checked before torch is imported and the (slow) feature pass runs, so a typo costs nothing.
    if args.epochs < 1 or args.batch_size < 2 or not args.blr > 0 or args.warmup_epochs < 0 or args.weight_decay < 0:
        raise ConfigError("need --epochs >= 1, --batch-size >= 2, --blr > 0, --warmup-epochs >= 0 and "
                          "--weight-decay >= 0")
    check_feature_arguments(args)
    if args.labels_per_class is not None and args.out:
        raise ConfigError("--out saves one head, but --labels-per-class trains one per draw: leave out --out")
    check_output("--out", args.out, "dir")

    from ..engine.checkpoint import save_checkpoint
    from ..engine.distributed import resolve_device
    from ..evaluate.few_label import few_label, summarize
    from ..evaluate.linprobe import linear_probe

    feats = features_from_args(args)
    info = describe(args, feats)
    print(headline("linprobe", info))

    def show(record: dict) -> None:
        print(f"  epoch {record['epoch']:>{len(str(args.epochs))}d}/{args.epochs}  lr {record['lr']:.4g}  "
              f"loss {record['loss']:.4f}  top-1 {percent(record['top1'])}  top-5 {percent(record['top5'])}",
              flush=True)

    def probe(train_x, train_y, on_epoch=None):
        return linear_probe(train_x, train_y, feats.val_features, feats.val_labels,
                            num_classes=len(feats.classes), epochs=args.epochs, blr=args.blr,
                            batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                            weight_decay=args.weight_decay, seed=args.seed,
                            device=resolve_device(args.device), on_epoch=on_epoch)

    def clip_note(result) -> str:
        if result.batch_size < args.batch_size:
            return f"; --batch-size {args.batch_size} clipped to the {result.batch_size} training images"
        return ""

    record = {"command": "linprobe", **info, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
              "blr": args.blr}
    if args.labels_per_class is not None:
        print(few_label_line(info))
        draws = few_label(feats.train_features, feats.train_labels, args.labels_per_class, args.draws,
                          args.seed, probe, feats.classes)
        width = len(str(args.epochs))
        for d in draws:
            r = d.result
            print(f"  draw {d.draw:<3d} best top-1 {percent(r.best_top1)} at epoch {r.best_epoch:>{width}d}; "
                  f"final top-1 {percent(r.final['top1'])}, top-5 {percent(r.final['top5'])}", flush=True)
        first = draws[0].result  # every draw has the same size: same batch and lr
        summary = {key: summarize([_draw_record(d.result)[key] for d in draws])
                   for key in ("final_top1", "final_top5", "best_top1")}
        print(f"  final top-1 {range_text(summary['final_top1'])}")
        print(f"  best top-1  {range_text(summary['best_top1'])}  (batch {first.batch_size}, "
              f"lr {first.lr:.4g}{clip_note(first)})")
        record.update(lr=first.lr, batch_size=first.batch_size)
        for key, value in summary.items():
            record.update(summary_fields(key, value))
        record.update(best_epoch=None, history=None, head=None)
        record["draws"] = [{"draw": d.draw, "num_train": len(d.indices), **_draw_record(d.result),
                            "history": d.result.history} for d in draws]
        if feats.skipped:
            print(skipped_line(feats.skipped))
        if args.json:
            write_json(args.json, record)
        return 0

    result = probe(feats.train_features, feats.train_labels, on_epoch=show)
    print(f"  best top-1 {percent(result.best_top1)} at epoch {result.best_epoch}; final top-1 "
          f"{percent(result.final['top1'])}, top-5 {percent(result.final['top5'])}  "
          f"(batch {result.batch_size}, lr {result.lr:.4g}{clip_note(result)})")

    head_path = None
    if args.out:
        head_path = save_checkpoint(Path(args.out) / HEAD_FILE, {
            "model": result.head.state_dict(), "classes": feats.classes, "feature_dim": feats.feature_dim,
            "num_classes": len(feats.classes), "features": feats.source,
            "backbone_checkpoint": info["checkpoint"], "init_random": bool(args.init_random),
            "arch": info["arch"], "img_size": feats.img_size, "epochs": args.epochs,
            "final_top1": result.final["top1"], "best_top1": result.best_top1})
        print(f"  head             {head_path}")
    if feats.skipped:
        listing = None
        if args.out:
            from ..data.labeled import write_skipped

            listing = write_skipped(args.out, feats.skipped)
        print(skipped_line(feats.skipped, listing))
    if args.json:
        write_json(args.json, {
            **record, **_draw_record(result), "history": result.history,
            "head": None if head_path is None else str(head_path)})
    return 0
