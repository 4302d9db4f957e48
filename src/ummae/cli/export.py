"""`ummae export`: a pre-trained encoder as safetensors + a JSON card that timm can load."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EPILOG = """\
writes NAME.safetensors (the encoder of the full-image backbone: no decoder, Swin's window
doubled for UM-MAE checkpoints) and NAME.json ({"model": ..., "model_args": {...}, ...}).
Each export is checked: timm rebuilds the model from the two files, loads the weights with
strict key matching and must reproduce the backbone's features exactly.

examples:
  ummae export --checkpoint runs/swin_t/checkpoint.pt --out swin_t_ummae.safetensors
  ummae export --checkpoint runs/swin_t --out exports/swin_t.safetensors     (a run directory)

load it (after `import ummae`, which registers ummae_swin / ummae_pvt / ummae_vit with timm):
  card = json.load(open("swin_t_ummae.json"))
  model = timm.create_model(card["model"], pretrained=True,
                            pretrained_cfg_overlay=dict(file="swin_t_ummae.safetensors"), **card["model_args"])
  or: ummae.export.create_exported("swin_t_ummae.safetensors", features_only=True)
see docs/export.md for detection / segmentation necks.
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

    result = export_backbone(args.checkpoint, args.out)
    print(f"wrote {result.weights} ({result.model}, {result.num_params / 1e6:.2f}M values in "
          f"{result.num_tensors} tensors; checked: timm reloads it strictly and reproduces the features)")
    print(f"wrote {result.card}")
    needs = "import timm" if result.model.startswith("hiera_") else "import ummae, timm"  # timm's own Hiera
    print(f"load: {needs}; timm.create_model({result.model!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(result.weights)!r}), **model_args)  "
          f"# model_args from {result.card.name}")
    return 0
