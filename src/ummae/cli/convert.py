"""`ummae convert`: the paper's released UM-MAE checkpoints as ordinary ummae checkpoints."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EPILOG = """\
reads an official UM-MAE pre-training checkpoint (github.com/implus/UM-MAE: Swin-T, Swin-L, PVT-S,
ViT-B; a torch file {'model': state_dict, ...}) without running code from it, maps its weights onto
the preset's model with the options that reproduce the official architecture (Swin: conv patch
merging, LayerNorm eps 1e-6; PVT: no embedding norms, reduction weights in every stage), and writes
an ummae pre-training checkpoint: export, finetune --checkpoint, knn, linprobe, visualize and
pretrain --init-weights take it. See docs/fidelity.md, "Load the paper's checkpoints".

examples:
  ummae convert mae_swin_tiny_256.pth --preset ummae_swin_tiny_256 --out swin_t_official.pt
  ummae convert mae_pvt_small_256.pth --preset ummae_pvt_small_256 --out pvt_s_official.pt
  ummae convert vit_b.pth --preset ummae_vit_base_224 --out vit_b_official.pt
  ummae convert swin_l.pth --preset ummae_swin_large_256 --set model.decoder_depth=2 --out swin_l.pt
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert the paper's released UM-MAE checkpoints to ummae checkpoints",
        description="Convert an official UM-MAE pre-training checkpoint (Swin, PVT, ViT) into an ummae "
                    "pre-training checkpoint of the given preset.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("official", metavar="OFFICIAL.pth", help="the official checkpoint")
    p.add_argument("--preset", required=True, metavar="NAME",
                   help="the preset of the same architecture and size (see `ummae presets`)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                   help="override a configuration key, e.g. model.decoder_depth=2 (repeatable)")
    p.add_argument("--out", required=True, metavar="OUT.pt", help="the ummae checkpoint to write (replaced)")
    p.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """The file, the preset, the keys and types of --set and the output, before importing torch."""
    from ..config import validate
    from ..resolve import layer_config
    from .checks import check_input, check_output

    check_input("OFFICIAL.pth", args.official, "file")
    # A preset typo, an unknown or ill-typed key, a value no configuration may have (the official
    # architecture options, applied later, are valid values themselves).
    validate(layer_config(args.preset, None, args.sets)[0])
    check_output("--out", args.out, "file")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)

    from ..models.official import OFFICIAL_OPTIONS, convert_official, set_value

    result, cfg = convert_official(args.official, args.preset, args.out, args.sets)
    options = " ".join(f"model.{k}={set_value(getattr(cfg.model, k))}" for k in OFFICIAL_OPTIONS[cfg.model.arch])
    print(f"wrote {args.out} ({cfg.model.arch}, preset {cfg.preset}; {result.converted} official tensors "
          f"converted{'; architecture options ' + options if options else ''})")
    for reason in sorted(set(result.dropped.values())):  # one line per reason
        keys = sorted(k for k, why in result.dropped.items() if why == reason)
        shown = ", ".join(keys) if len(keys) <= 4 else f"{len(keys)} tensors ({', '.join(keys[:3])} ...)"
        print(f"dropped: {shown}: {reason}")
    if result.initialised:
        shown = ", ".join(result.initialised[:3]) + (" ..." if len(result.initialised) > 3 else "")
        print(f"initialised afresh (not in the file): {len(result.initialised)} tensors ({shown})")
    if options:
        sets = " ".join(f"--set {o}" for o in options.split())
        print(f"continue pre-training from it: ummae pretrain --preset {cfg.preset} {sets} --init-weights {args.out}")
    return 0
