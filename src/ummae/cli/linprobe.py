"""`ummae linprobe`: linear-probe accuracy of a pre-trained encoder's frozen features (MAE's protocol)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .knn import add_feature_arguments, describe, features_from_args, headline, percent, skipped_line, write_json

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
folder with only one class, or no readable image, is refused.

--out DIR writes DIR/{HEAD_FILE}: model (head state dict: norm.running_mean/var, fc.weight/bias),
classes, feature_dim, num_classes, backbone_checkpoint, init_random, arch, img_size, epochs,
final_top1, best_top1.
--json FILE writes: command, checkpoint, init_random, seed, arch, method, img_size, num_train,
num_val, num_classes, classes, feature_dim, skipped_images, epochs, warmup_epochs, blr, lr, batch_size,
final_top1, final_top5, best_top1, best_epoch, history = [{{epoch, lr, loss, top1, top5}}], head.

examples:
  ummae linprobe --checkpoint runs/demo/checkpoint.pt --data flowers/ --out runs/demo/linprobe
  ummae linprobe --checkpoint ckpt.pt --data imagenet/train --val-data imagenet/val --batch-size 1024
  ummae linprobe --checkpoint ckpt.pt --data flowers/ --init-random     the baseline to beat
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


def run(args: argparse.Namespace) -> int:
    from ..engine.checkpoint import save_checkpoint
    from ..engine.pretrain import resolve_device
    from ..errors import ConfigError
    from ..evaluate.linprobe import linear_probe

    # Checked before the (slow) feature pass, so a typo costs nothing.
    if args.epochs < 1 or args.batch_size < 2 or not args.blr > 0 or args.warmup_epochs < 0 or args.weight_decay < 0:
        raise ConfigError("need --epochs >= 1, --batch-size >= 2, --blr > 0, --warmup-epochs >= 0 and "
                          "--weight-decay >= 0")
    feats = features_from_args(args)
    info = describe(args, feats)
    print(headline("linprobe", info))

    def show(record: dict) -> None:
        print(f"  epoch {record['epoch']:>{len(str(args.epochs))}d}/{args.epochs}  lr {record['lr']:.4g}  "
              f"loss {record['loss']:.4f}  top-1 {percent(record['top1'])}  top-5 {percent(record['top5'])}",
              flush=True)

    result = linear_probe(feats.train_features, feats.train_labels, feats.val_features, feats.val_labels,
                          num_classes=len(feats.classes), epochs=args.epochs, blr=args.blr,
                          batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                          weight_decay=args.weight_decay, seed=args.seed,
                          device=resolve_device(args.device), on_epoch=show)
    print(f"  best top-1 {percent(result.best_top1)} at epoch {result.best_epoch}; final top-1 "
          f"{percent(result.final['top1'])}, top-5 {percent(result.final['top5'])}  "
          f"(batch {result.batch_size}, lr {result.lr:.4g})")

    head_path = None
    if args.out:
        head_path = save_checkpoint(Path(args.out) / HEAD_FILE, {
            "model": result.head.state_dict(), "classes": feats.classes, "feature_dim": feats.feature_dim,
            "num_classes": len(feats.classes), "backbone_checkpoint": str(args.checkpoint),
            "init_random": bool(args.init_random), "arch": info["arch"], "img_size": feats.img_size,
            "epochs": args.epochs, "final_top1": result.final["top1"], "best_top1": result.best_top1})
        print(f"  head             {head_path}")
    if feats.skipped:
        listing = None
        if args.out:
            from ..data.labeled import write_skipped

            listing = write_skipped(args.out, feats.skipped)
        print(skipped_line(feats.skipped, listing))
    if args.json:
        write_json(args.json, {
            "command": "linprobe", **info, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
            "blr": args.blr, "lr": result.lr, "batch_size": result.batch_size,
            "final_top1": result.final["top1"], "final_top5": result.final["top5"],
            "best_top1": result.best_top1, "best_epoch": result.best_epoch, "history": result.history,
            "head": None if head_path is None else str(head_path)})
    return 0
