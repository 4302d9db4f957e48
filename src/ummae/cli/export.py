"""`ummae export`: a pre-trained encoder as safetensors + a JSON card that timm can load."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EPILOG = """\
writes NAME.safetensors (the encoder of the full-image backbone: no decoder, Swin's window
doubled for UM-MAE checkpoints) and NAME.json ({"model": ..., "model_args": {...}, ...}).
Swin, Swin V2, ViT and Hiera export as timm's own models (swin_*, swinv2_*, vit_*, hiera_*),
which load without ummae; PVT (and, with --format ummae, Swin and ViT) as ummae's registered
models, which need `import ummae`.
Each export is checked: timm rebuilds the model from the two files, loads the weights with
strict key matching and must reproduce the backbone's features (timm's Swin and ViT: to
float32 rounding; ummae's models: exactly).

examples:
  ummae export --checkpoint runs/swin_t/checkpoint.pt --out swin_t.safetensors
  ummae export --checkpoint runs/swin_t --out swin_t_224.safetensors --window 7 --img-size 224
  ummae export --checkpoint runs/swin_t --out swin_t_ummae.safetensors --format ummae

load it (no ummae needed for timm's own models):
  card = json.load(open("swin_t.json"))
  model = timm.create_model(card["model"], pretrained=True,
                            pretrained_cfg_overlay=dict(file="swin_t.safetensors"), **card["model_args"])
see docs/export.md for which export needs ummae, and for detection / segmentation necks.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a pre-trained encoder for timm (safetensors + JSON)",
        description="Export the encoder of an `ummae pretrain` checkpoint as a safetensors file plus "
                    "a JSON card naming the timm model and its arguments.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="pre-training checkpoint (e.g. RUN/checkpoint.pt), or a run directory")
    p.add_argument("--out", required=True, metavar="NAME.safetensors",
                   help="weights file to write; the card goes to NAME.json beside it (both replaced "
                        "if present)")
    p.add_argument("--format", choices=("timm", "ummae"), default="timm",
                   help="timm (default): timm's own model where the architecture allows (Swin: "
                        "swin_*, with the position-bias tables evaluated from the coordinate MLPs; "
                        "ViT: vit_*); ummae: ummae's registered model (ummae_swin: the MLPs, any "
                        "window; ummae_vit)")
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="Swin's full-image window (default: 2x the pre-training window for UM-MAE, "
                        "as fine-tuning uses it: 16 at 256 px); written in the card")
    p.add_argument("--img-size", type=int, default=None, metavar="PX",
                   help="input size written in the card; timm's Swin fixes each stage's window from "
                        "it (default: the pre-training size)")
    p.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """The paths, before importing torch (`cli.checks`): a typo costs no import."""
    from pathlib import Path

    from .checks import check_input, check_output

    check_input("--checkpoint", args.checkpoint)  # a checkpoint file or a run folder
    check_output("--out", args.out, "file")
    out = Path(args.out)
    if out.name.endswith(".safetensors"):  # the card NAME.json is written beside it
        check_output("--out", out.with_name(out.name[:-len(".safetensors")] + ".json"), "file")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)

    from ..export import export_backbone

    result = export_backbone(args.checkpoint, args.out, format=args.format, window=args.window,
                             img_size=args.img_size)
    print(f"wrote {result.weights} ({result.model}, {result.num_params / 1e6:.2f}M values in "
          f"{result.num_tensors} tensors; checked: timm reloads it strictly and reproduces the features)")
    print(f"wrote {result.card}")
    if result.note:
        print(f"note: {result.note}")
    needs = "import ummae, timm" if result.needs_ummae else "import timm"  # only ummae_* names need ummae: timm's own Swin, Swin V2, ViT, Hiera
    print(f"load: {needs}; timm.create_model({result.model!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(result.weights)!r}), **model_args)  "
          f"# model_args from {result.card.name}")
    return 0
