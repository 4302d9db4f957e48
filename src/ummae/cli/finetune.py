"""`ummae finetune`: supervised fine-tuning of a pre-trained encoder on a labeled folder."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EPILOG = """\
defaults are the paper's ImageNet recipe (SPEC sec. 6): 100 epochs, blr 5e-4 (lr = blr x effective
batch / 256), 5 warm-up epochs then cosine, AdamW wd 0.05, layer decay 0.85 (ViT 0.8, Swin-L 0.7),
drop path 0.1 (Swin-L 0.2), RandAugment m9-mstd0.5, random erasing 0.25, mixup 0.8, cutmix 1.0,
label smoothing 0.1, input size = the checkpoint's pre-training size. The paper's effective batch
is 1024: e.g. --batch-size 128 --accum-steps 8 on one GPU.

the run directory holds config.yaml, metrics.jsonl (per epoch: loss, lr, val_top1, val_top5),
tb/, best.pt (best validation top-1) and last.pt; both checkpoints are also encoder sources for
k-NN, linear probing and export. checkpoints/step-*.pt hold the whole training state (every
--save-every steps and every epoch's end): --resume continues from them exactly.

examples:
  ummae finetune --checkpoint runs/swin/checkpoint.pt --data /data/imagenet/train --val-data /data/imagenet/val \\
      --batch-size 128 --accum-steps 8
  ummae finetune --checkpoint runs/demo/checkpoint.pt --data photos/ --val-fraction 0.2 --epochs 30
  ummae finetune --checkpoint runs/demo/checkpoint.pt --data photos/ --init-random    from-scratch baseline
  ummae finetune --checkpoint ... --data ... --recursive-mix                        RecursiveMix, no mixup
  ummae finetune --checkpoint ... --data ... --out runs/ft --resume auto
                                                  one job command: starts the run, continues it after a
                                                  kill or SIGTERM (exit 143), extends it with a higher --epochs
  torchrun --nproc_per_node=8 -m ummae finetune --checkpoint ... --data ... --batch-size 128
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a pre-trained encoder for classification",
        description="Fine-tune the encoder of a pre-training checkpoint on a labeled folder (DIR/<class>/*.jpg): "
                    "the encoder runs full images (Swin window doubled, PVT full-image reductions) with a "
                    "global-average-pool + LayerNorm + linear head; top-1/top-5 on validation every epoch.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="the encoder: an `ummae pretrain` checkpoint (.pt; a fine-tuned best.pt works "
                        "too) or an `ummae export` .safetensors file (with its .json card); required unless "
                        "--resume finds a checkpoint")
    p.add_argument("--data", metavar="DIR",
                   help="training images, one folder per class: DIR/<class>/*.jpg; required unless --resume finds "
                        "a checkpoint")
    p.add_argument("--val-data", metavar="DIR", help="validation images with the same class folders")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help="without --val-data: hold out this share of every class of --data (default 0.1, seeded)")
    p.add_argument("--out", metavar="DIR", help="run directory; default: runs/finetune-<checkpoint>-<timestamp>")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (default 100)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after at most N optimizer steps (a cap: never beyond --epochs); the lr schedule is "
                        "fitted to the shorter of the two")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="images per micro-step per device (default 64)")
    p.add_argument("--accum-steps", type=int, metavar="N",
                   help="micro-steps per optimizer step; effective batch = batch-size x accum-steps x processes")
    p.add_argument("--blr", type=float, metavar="LR",
                   help="base lr; lr = blr x effective batch / 256 (default 5e-4)")
    p.add_argument("--min-lr", type=float, metavar="LR",
                   help="lr at the end of the cosine (default 1e-6)")
    p.add_argument("--warmup-epochs", type=float, metavar="E", help="linear warm-up (default 5)")
    p.add_argument("--weight-decay", type=float, metavar="WD",
                   help="AdamW weight decay (default 0.05)")
    p.add_argument("--layer-decay", type=float, metavar="D",
                   help="layer-wise lr decay: block k of L gets lr x D^(L+1-k), the stem D^(L+1) "
                        "(default 0.85; ViT 0.8; Swin-L 0.7)")
    p.add_argument("--drop-path", type=float, metavar="P", help="stochastic depth rate (default 0.1; Swin-L 0.2)")
    p.add_argument("--mixup", type=float, metavar="A", help="mixup alpha (default 0.8; 0 = off)")
    p.add_argument("--cutmix", type=float, metavar="A", help="cutmix alpha (default 1.0; 0 = off)")
    p.add_argument("--smoothing", type=float, metavar="S", help="label smoothing (default 0.1)")
    p.add_argument("--reprob", type=float, metavar="P", help="random erasing probability (default 0.25)")
    p.add_argument("--auto-augment", metavar="POLICY",
                   help="timm's augmentation policy (default rand-m9-mstd0.5-inc1-mmax9, RandAugment; e.g. "
                        "augmix, original; none = off)")
    p.add_argument("--hflip", type=float, metavar="P",
                   help="horizontal flip probability (default 0.5; 0 for digits, text, anything flipping changes)")
    p.add_argument("--min-crop-scale", type=float, metavar="S",
                   help="random resized crops keep S-100%% of the image's area (default 0.08)")
    p.add_argument("--no-augment", action="store_true", default=None,
                   help="no image augmentation (centre crops only) and, unless given, no mixup/cutmix/random "
                        "erasing: for tiny data sets and quick checks")
    p.add_argument("--recursive-mix", action="store_true", default=None,
                   help="RecursiveMix (paste the previous batch into a box, RoI consistency loss); turns "
                        "mixup and cutmix OFF")
    p.add_argument("--rm-alpha", type=float, metavar="A",
                   help="RecursiveMix box side ratio sqrt(U(0, A)) (default 0.5)")
    p.add_argument("--rm-omega", type=float, metavar="W",
                   help="RecursiveMix RoI consistency weight (default 0.5; 0 = labels only)")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="input size (default: the checkpoint's pre-training size)")
    p.add_argument("--init-random", action="store_true", default=None,
                   help="train the checkpoint's architecture from random weights (the from-scratch baseline)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed for the head, data order, split and augmentation")
    p.add_argument("--device", metavar="DEV",
                   help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, metavar="N",
                   help="data-loading processes per training process (default: fitted to the CPUs this process may "
                        "use, with torch's threads, see docs/benchmarks.md)")
    p.add_argument("--num-workers", type=int, default=argparse.SUPPRESS, dest="workers",
                   help=argparse.SUPPRESS)  # the old spelling, kept working
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue a run from a periodic checkpoint (RUN/checkpoints/step-*.pt), exactly where it "
                        "stopped; `auto`: the newest one in --out, or a fresh start if there is none, so one job "
                        "command both starts and continues a run (requeue). Options not given are the "
                        "checkpoint's; those given must equal them except --epochs/--max-steps (extend a run), "
                        "--save-every, --keep-last, --log-every, --out, --device and --workers: other "
                        "differences are refused, naming them")
    p.add_argument("--save-every", type=int, metavar="N",
                   help="write the whole training state every N optimizer steps (default 1000; 0: only at the end "
                        "of each epoch, where it is always written)")
    p.add_argument("--keep-last", type=int, metavar="K",
                   help="keep the newest K periodic checkpoints (default 3; 0: all)")
    p.add_argument("--log-every", type=int, metavar="N",
                   help="a plain progress line every N steps when there is no progress bar (default 50)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: plain log lines every --log-every steps (the default when stdout is not a "
                        "terminal); epoch lines are always printed")
    p.add_argument("--print-config", action="store_true",
                   help="print the settings this command would run (the recipe's defaults filled in from the "
                        "checkpoint, checked) as YAML and exit, creating nothing")
    p.set_defaults(run=run)


# FinetuneConfig field <- argparse destination (None: not given)
_OPTIONS = {"checkpoint": "checkpoint", "data": "data", "val_data": "val_data", "val_fraction": "val_fraction",
            "out": "out", "epochs": "epochs", "max_steps": "max_steps", "batch_size": "batch_size",
            "accum_steps": "accum_steps", "blr": "blr", "min_lr": "min_lr", "warmup_epochs": "warmup_epochs",
            "weight_decay": "weight_decay", "layer_decay": "layer_decay", "drop_path": "drop_path",
            "re_prob": "reprob", "auto_augment": "auto_augment", "hflip": "hflip",
            "min_crop_scale": "min_crop_scale", "mixup": "mixup", "cutmix": "cutmix", "smoothing": "smoothing",
            "recursive_mix": "recursive_mix", "rm_alpha": "rm_alpha", "rm_omega": "rm_omega",
            "img_size": "img_size", "init_random": "init_random", "seed": "seed", "device": "device",
            "precision": "precision", "num_workers": "workers", "save_every": "save_every",
            "keep_last": "keep_last", "log_every": "log_every"}


def config_from_args(args: argparse.Namespace, base: dict | None = None):
    """The `FinetuneConfig` of parsed command-line arguments, over `base` (a resumed checkpoint's
    settings) or the recipe's defaults; paths made absolute."""
    import dataclasses

    from ..engine.finetune import FinetuneConfig, absolute_finetune_paths
    from ..errors import ConfigError

    if args.val_data is not None and args.val_fraction is not None:
        raise ConfigError("give either --val-data or --val-fraction, not both")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in (base or {}).items() if k in known}
    for field, dest in _OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[field] = value
    if args.no_augment:
        values["augment"] = False
    if args.val_data is not None:  # the two ways of validating exclude each other
        values["val_fraction"] = FinetuneConfig.val_fraction
    elif args.val_fraction is not None:
        values["val_data"] = None
    return absolute_finetune_paths(FinetuneConfig(**values))


def _summary(result, cfg) -> str:
    s = result.settings
    if cfg.recursive_mix:
        mixing = f"RecursiveMix alpha {cfg.rm_alpha} omega {cfg.rm_omega} (mixup/cutmix off)"
    elif s["mixup"] > 0 or s["cutmix"] > 0:
        mixing = f"mixup {s['mixup']} cutmix {s['cutmix']}"
    else:
        mixing = "no mixing"
    if not cfg.augment:
        augmentation = "no augmentation"
    else:
        augmentation = (f"crops {cfg.min_crop_scale:g}-1, flip {cfg.hflip:g}, {cfg.auto_augment}, "
                        f"random erasing {s['re_prob']:g}")
    lines = [
        "",
        f"ummae finetune: done - {len(result.classes)} classes, {result.steps} steps ({result.epochs} epochs) "
        f"in {result.seconds:.0f} s on {result.device}",
        f"  best val top-1   {result.best_top1:.2f}  (top-5 {result.best_top5:.2f}, epoch {result.best_epoch})",
        f"  last val top-1   {result.final_top1:.2f}  (top-5 {result.final_top5:.2f}), "
        f"train loss {result.final_loss:.4f}",
        f"  encoder          {'random init (--init-random)' if cfg.init_random else cfg.checkpoint}",
        f"  data             {result.train_images} train / {result.val_images} val images, {s['img_size']} px, "
        f"{augmentation}, {mixing}",
        f"  recipe           lr {result.lr:.3g} (effective batch {result.effective_batch}), layer decay "
        f"{s['layer_decay']}, drop path {s['drop_path']}, smoothing {cfg.smoothing}, "
        f"{result.num_params / 1e6:.2f}M parameters",
        f"  run directory    {result.run_dir}",
        f"  config           {result.config}",
        f"  metrics          {result.metrics}",
        f"  best checkpoint  {result.best}",
        f"  last checkpoint  {result.last}",
    ]
    if result.resumed_from:
        lines.insert(2, f"  resumed from     {result.resumed_from} (step {result.start_step})")
        if result.steps == result.start_step:
            lines[1] = (f"ummae finetune: already finished - {len(result.classes)} classes, {result.steps} steps "
                        f"({result.epochs} epochs); nothing left to run (raise --max-steps/--epochs to extend it)")
    if result.skipped_images:
        lines.append(f"  skipped          {len(result.skipped_images)} unreadable image(s), listed in "
                     f"{result.run_dir / 'skipped_images.txt'}")
    if result.world_size > 1:
        lines.insert(2, f"  processes        {result.world_size} (DDP)")
    return "\n".join(lines)


def check_arguments(args: argparse.Namespace) -> None:
    """The paths and the options' combinations, before importing torch (`cli.checks`): a typo
    costs no import. The values are checked by the fine-tuning engine."""
    from ..errors import ConfigError
    from .checks import check_input, check_output

    if args.val_data is not None and args.val_fraction is not None:
        raise ConfigError("give either --val-data or --val-fraction, not both")
    if args.resume not in (None, "auto"):
        check_input("--resume", args.resume, "file")
    check_input("--checkpoint", args.checkpoint)  # a .pt file, a .safetensors export or a run folder
    check_input("--data", args.data, "dir")
    check_input("--val-data", args.val_data, "dir")
    if not args.print_config:
        check_output("--out", args.out or "runs", "dir")


def _print_config(cfg) -> int:
    """--print-config: the settings with the recipe's defaults filled in (they depend on the
    checkpoint's backbone and size), as the run's config.yaml would record them."""
    import dataclasses

    import yaml

    from ..engine.finetune import _validate, recipe_defaults
    from ..models.loading import encoder_source

    _validate(cfg)
    values = dataclasses.asdict(cfg)
    values.update(recipe_defaults(cfg, encoder_source(cfg.checkpoint)[0]))
    print(yaml.safe_dump(values, sort_keys=False, default_flow_style=None), end="")
    return 0


def run(args: argparse.Namespace) -> int:
    import sys

    check_arguments(args)

    from ..engine.finetune import finetune, resume_finetune
    from .common import is_main

    def configure(saved: dict | None, point):
        if point is not None and args.out is None:
            args.out = str(point.run_dir)
        # The requeue pattern: the command that started the run continues it; options it does not
        # give are the checkpoint's. Only FINETUNE_RESUMABLE_KEYS may differ from the checkpoint's.
        return config_from_args(args, base=saved)

    cfg, point = resume_finetune(args.resume, args.out, configure)
    if args.print_config:
        return _print_config(cfg)
    bar = not args.no_progress and sys.stdout.isatty()
    result = finetune(cfg, progress=bar, resume=point, log_lines=not bar, fit_cpus=True)
    if is_main():
        print(_summary(result, cfg))
    return 0
