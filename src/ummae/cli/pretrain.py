"""`ummae pretrain`: UM-MAE pre-training from a preset, a YAML file and overrides."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EPILOG = """\
configuration layers (later wins): --preset < --config FILE < --set KEY=VALUE < named flags.
Every key of the resolved configuration is in the run's config.yaml; any of them can be given
with --set, e.g. --set optim.blr=1e-4 --set model.drop_path_rate=0.1.

examples:
  ummae pretrain                                   tiny Swin on the built-in demo photographs
  ummae pretrain --preset ummae_swin_tiny_256 --data /data/imagenet/train --batch-size 128 --accum-steps 32
  ummae pretrain --config runs/demo-XXXX/config.yaml --epochs 50
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train an encoder with UM-MAE",
        description="Pre-train a Swin encoder with UM-MAE (uniform masking: the encoder sees only "
                    "the visible 25%% of every image, packed into a half-size image). With no "
                    "arguments: the `demo` preset on built-in photographs, about two minutes on a CPU.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", metavar="NAME", help="named configuration (see `ummae presets`); default: demo")
    p.add_argument("--config", metavar="FILE", help="YAML file of config sections (e.g. a run's config.yaml)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                   help="override any config key, e.g. optim.blr=1e-4 (repeatable)")
    p.add_argument("--data", metavar="DIR",
                   help="folder of images, searched recursively (jpg/png/webp/bmp/tif/gif; sub-folders "
                        "and labels ignored); default: the built-in demo photographs")
    p.add_argument("--out", metavar="DIR", help="run directory; default: runs/<preset>-<timestamp>")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (sets the lr schedule)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N optimizer steps; the lr schedule is fitted to N")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per micro-step (per device)")
    p.add_argument("--accum-steps", type=int, metavar="N",
                   help="micro-steps accumulated per optimizer step; effective batch = batch-size x "
                        "accum-steps, and the lr scales with it (lr = blr x effective batch / 256)")
    p.add_argument("--seed", type=int, metavar="N", help="seed for initialisation, data order, crops and masks")
    p.add_argument("--device", metavar="DEV", help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _flags(args: argparse.Namespace) -> dict:
    return {
        "data.path": args.data,
        "train.out": args.out,
        "train.epochs": args.epochs,
        "train.max_steps": args.max_steps,
        "train.batch_size": args.batch_size,
        "train.accum_steps": args.accum_steps,
        "train.seed": args.seed,
        "train.device": args.device,
    }


def _summary(result, cfg) -> str:
    def rel(p):
        return "-" if p is None else str(p)

    lines = [
        "",
        f"ummae pretrain: done - preset {cfg.preset}, {result.steps} steps ({result.epochs:.2f} epochs) "
        f"in {result.seconds:.0f} s on {result.device}",
        f"  final loss       {result.final_loss:.4f}   ({result.images_per_sec:.1f} images/s, "
        f"{result.num_params / 1e6:.2f}M parameters, effective batch {cfg.effective_batch}, lr {cfg.lr:.3g})",
        f"  run directory    {result.run_dir}",
        f"  config           {rel(result.config)}",
        f"  metrics          {rel(result.metrics)}",
        f"  tensorboard      tensorboard --logdir {rel(result.tensorboard)}",
        f"  checkpoint       {rel(result.checkpoint)}   (encoder + decoder + optimizer)",
        f"  reconstructions  {rel(result.reconstructions)}",
        f"  loss curve       {rel(result.loss_curve)}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..config import resolve_config
    from ..engine.pretrain import pretrain

    cfg = resolve_config(args.preset, args.config, args.sets, _flags(args))
    result = pretrain(cfg, progress=not args.no_progress)
    print(_summary(result, cfg))
    return 0
