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
  ummae pretrain --preset P --data DIR --out runs/x --resume auto
                                                   one job command: starts the run, continues it after a
                                                   kill or SIGTERM (exit 143), extends it with a higher --epochs
  torchrun --nproc_per_node=8 -m ummae pretrain --preset ummae_swin_tiny_256 --data DIR --batch-size 128 --accum-steps 4
  torchrun --nproc_per_node=8 -m ummae pretrain --preset P --data DIR --strategy fsdp --grad-checkpointing
                                                   big backbones: sharded parameters, gradients and moments
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train an encoder (UM-MAE, MAE, EMAE or SimMIM)",
        description="Pre-train a Swin, PVT or ViT encoder with UM-MAE (uniform masking: the encoder "
                    "sees only the visible 25% of every image, packed into a half-size image), plain "
                    "MAE or the SimMIM baseline, as the preset says (`ummae presets`). With no "
                    "arguments: the `demo` preset on built-in photographs (README: how long it takes).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", metavar="NAME", help="named configuration (see `ummae presets`); default: demo")
    p.add_argument("--config", metavar="FILE", help="YAML file of config sections (e.g. a run's config.yaml)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                   help="override any config key, e.g. optim.blr=1e-4 (repeatable)")
    p.add_argument("--data", metavar="DIR|SHARDS",
                   help="folder of images, searched recursively (jpg/png/webp/bmp/tif/gif; sub-folders "
                        "and labels ignored), or tar shards (`ummae shards`): 'train-{000000..000127}.tar', "
                        "a directory of .tar files, or a text file listing them (URLs and pipe: commands are fetched "
                        "into a local cache first); default: the demo photographs")
    p.add_argument("--out", metavar="DIR", help="run directory; default: runs/<preset>-<timestamp>")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (sets the lr schedule)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after at most N optimizer steps (a cap: never beyond --epochs); the lr schedule is "
                        "fitted to the shorter of the two")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per micro-step (per device)")
    p.add_argument("--accum-steps", type=int, metavar="N",
                   help="micro-steps accumulated per optimizer step; effective batch = batch-size x "
                        "accum-steps x processes, and the lr scales with it (lr = blr x effective batch / 256)")
    p.add_argument("--seed", type=int, metavar="N", help="seed for initialisation, data order, crops and masks")
    p.add_argument("--device", metavar="DEV", help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU; fp16 uses a grad scaler (CUDA)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--strategy", choices=("ddp", "fsdp"),
                   help="data parallelism under torchrun: ddp (default; every process holds the whole model) or "
                        "fsdp (FSDP2: parameters, gradients and AdamW moments sharded over the processes, one "
                        "unit per transformer block; train.reshard_after_forward=false for ZeRO-2 style)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute each encoder block's activations in backward: less activation memory for one more forward of each block")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue a run from a checkpoint, exactly where it stopped; `auto`: the newest "
                        "checkpoint in --out, or a fresh start if there is none, so one job command both "
                        "starts and continues a run (requeue). The configuration must equal the "
                        "checkpoint's except --epochs/--max-steps (extend a run), --save-every, --keep-last, "
                        "logging, --device, --compile and workers; other differences are refused, naming them")
    p.add_argument("--init-weights", metavar="PATH",
                   help="start a new run from a checkpoint's weights only (fresh optimizer and schedule); "
                        "also the paper's released UM-MAE weights, converted on the fly (see `ummae convert`)")
    p.add_argument("--save-every", type=int, metavar="N",
                   help="write a checkpoint every N optimizer steps (default 1000; 0: only at the end)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="data-loading processes per training process (data.num_workers; default: fitted to the CPUs this "
                        "process may use (affinity, cgroup quota, torchrun's processes), together with torch's "
                        "intra-op threads; OMP_NUM_THREADS sets the threads)")
    p.add_argument("--keep-last", type=int, metavar="K", help="keep the newest K periodic checkpoints (default 3; 0: all)")
    p.add_argument("--no-progress", action="store_true",
                   help="plain log lines every log_every steps instead of the progress bar (the default "
                        "when stdout is not a terminal)")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration this command would run (every layer applied, checked) as "
                        "YAML and exit, creating nothing")
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
        "train.precision": args.precision,
        "train.compile": args.compile,
        "train.strategy": args.strategy,
        "train.grad_checkpointing": args.grad_checkpointing,
        "train.init_weights": args.init_weights,
        "train.save_every": args.save_every,
        "train.keep_last": args.keep_last,
        "data.num_workers": args.workers,
    }


def _parts(cfg) -> str:
    """What the method says after "effective batch N" (EMAE: each image is used K times)."""
    from ..models.specs import method_spec

    return method_spec(cfg.method).images_note(cfg)


def _summary(result, cfg) -> str:
    def rel(p):
        return "-" if p is None else str(p)

    lines = [
        "",
        f"ummae pretrain: done - preset {cfg.preset}, {result.steps} steps ({result.epochs:.2f} epochs) "
        f"in {result.seconds:.0f} s on {result.device}",
        f"  final loss       {result.final_loss:.4f}   ({result.images_per_sec:.1f} images/s, "
        f"{result.num_params / 1e6:.2f}M parameters, effective batch {cfg.effective_batch * result.world_size}"
        f"{_parts(cfg)}, lr {cfg.peak_lr(result.world_size):.3g})",  # the processes counted, as in training
        f"  run directory    {result.run_dir}",
        f"  config           {rel(result.config)}",
        f"  metrics          {rel(result.metrics)}",
        f"  tensorboard      tensorboard --logdir {rel(result.tensorboard)}",
        f"  checkpoint       {rel(result.checkpoint)}   (encoder + decoder + optimizer)",
        f"  reconstructions  {rel(result.reconstructions)}",
        f"  loss curve       {rel(result.loss_curve)}",
    ]
    if result.resumed_from:
        lines.insert(2, f"  resumed from     {result.resumed_from} (step {result.start_step})")
        if result.steps == result.start_step:
            lines[1] = (f"ummae pretrain: already finished - preset {cfg.preset}, {result.steps} steps "
                        f"({result.epochs:.2f} epochs); nothing left to run (raise --max-steps/--epochs to extend it)")
            lines[3] = f"  final loss       {result.final_loss:.4f}   (last logged)"
    if result.world_size > 1:
        lines.insert(2, f"  processes        {result.world_size} ({cfg.train.strategy.upper()})")
    if result.skipped_images:
        lines.append(f"  skipped          {len(result.skipped_images)} unreadable image(s), listed in "
                     f"{result.run_dir / 'skipped_images.txt'}")
    if result.skipped_steps:
        lines.append(f"  skipped steps    {result.skipped_steps} with a non-finite loss or gradients (train.on_nonfinite=skip)")
    if cfg.data.decode == "gpu" and cfg.data.path is not None and result.steps > result.start_step:
        lines.append(f"  decode=gpu       {result.cpu_decoded} image(s) decoded by the workers instead "
                     f"(not RGB JPEG: PNG, grey, CMYK, ...)")
    return "\n".join(lines)


def check_arguments(args: argparse.Namespace) -> None:
    """What can be judged without torch, before importing it (a typo costs no import): the
    preset, the --config file, the keys and types of --set and the flags, the values any
    configuration has, and the paths (`cli.checks`). The backbone's and method's own checks
    follow in `resolve_config`."""
    from ..config import validate
    from ..resolve import layer_config
    from .checks import check_input, check_output

    check_input("--config", args.config, "file")
    cfg = layer_config(args.preset, args.config, args.sets, _flags(args))[0]
    if args.resume is None:  # resuming, the checkpoint's configuration is the bottom layer
        validate(cfg)
    if args.resume not in (None, "auto"):
        check_input("--resume", args.resume)
    check_input("--data", cfg.data.path)  # a folder of images, a shard or a list of shards
    check_input("--init-weights", cfg.train.init_weights, "file")
    if not args.print_config:
        check_output("--out", cfg.train.out or "runs", "dir")


def run(args: argparse.Namespace) -> int:
    import sys

    check_arguments(args)

    from ..config import absolute_paths
    from ..resolve import resolve_config
    from ..engine.pretrain import pretrain, resume_pretrain
    from .common import is_main

    def configure(saved: dict | None, point) -> object:
        if point is not None and args.out is None:
            args.out = str(point.run_dir)
        # The requeue pattern: the command that started the run (--preset/--config included)
        # continues it; without them the checkpoint's configuration is the bottom layer. Either
        # way only the keys of RESUMABLE_KEYS may differ from the checkpoint's (resume_pretrain).
        base = saved if saved is not None and not (args.preset or args.config) else None
        return absolute_paths(resolve_config(args.preset, args.config, args.sets, _flags(args), base=base))

    cfg, point = resume_pretrain(args.resume, args.out, configure)
    if args.print_config:
        import yaml

        from ..config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")  # what config.yaml would hold
        return 0
    bar = not args.no_progress and sys.stdout.isatty()
    result = pretrain(cfg, progress=bar, resume=point, log_lines=not bar, fit_cpus=True)
    if result.run_dir is not None and is_main():
        print(_summary(result, cfg))
    return 0

