"""`ummae shards`: pack a folder of images into tar shards (WebDataset format) for pre-training."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

# The smallest --max-side: a smaller image cannot hold one 16 px masking unit of any preset.
MIN_SIDE = 16

EPILOG = """\
--max-side auto: each image larger than its preset's crops need is shrunk to the smallest size at
which RandomResizedCrop never upsamples a crop. A crop covers a fraction s >= min_crop_scale of
the image's AREA at an aspect ratio of 3/4..4/3, so its shorter side is at least
sqrt(min_crop_scale * 3/4 * width * height): the rule bounds the image's area, not one of its
sides. The image is shrunk so that
    sqrt(width x height) >= img_size / sqrt(min_crop_scale * 3/4)   (and shorter side >= img_size)
e.g. 661 px for ummae_swin_tiny_256 (256 px, scale 0.2): 764x573 for a 4:3 photo, 661x661 for a
square one. No single longer (or shorter) side is right for every aspect ratio, so --max-side N
stays the plain cap on the longer side.

With --max-side (N or auto), images larger than the size become upright JPEGs of that size
(EXIF orientation applied, Pillow LANCZOS, quality 90). Smaller ones keep their bytes if they are JPEGs, BMPs or uncompressed TIFFs; other formats (PNG,
WebP, GIF, compressed TIFF), which decode 1.6-3.1x slower per training sample than a JPEG, are
stored as JPEGs at their own size. Keys and order are the folder's, so a run on the shards draws
the same images in the same order as on the folder (the crop boxes are drawn anew: same relative
sizes, other positions).

examples:
  ummae shards --data /data/imagenet/train --out /data/imagenet-shards --shard-size 5000
  ummae shards --data /data/photos --out /data/photos-shards --max-side auto --preset ummae_swin_tiny_256
  ummae shards --data /data/photos --out /data/photos-1024 --max-side 1024
  ummae pretrain --data '/data/imagenet-shards/train-{000000..000256}.tar' ...
  ummae pretrain --data /data/imagenet-shards ...     (a directory of .tar files works too)
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shards", help="pack a folder of images into tar shards (for large data sets, many nodes)",
        description="Write every image under --data (searched recursively, as `ummae pretrain` does) "
                    "into uncompressed tar shards of --shard-size images, in the WebDataset format: "
                    "bytes unchanged, or with --max-side shrunk once to the size training needs "
                    "(a 12 MP photo's training sample is then ~8x faster, every epoch); each shard with "
                    "an index file (SHARD.ummae-index) that start-up reads instead of every tar header. "
                    "Unreadable files are left out and listed in OUT/skipped_images.txt.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="DIR", required=True, help="folder of images")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the shards into")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    p.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar, ... (default train)")
    p.add_argument("--max-side", metavar="N|auto",
                   help="store images whose longer side exceeds N px as JPEGs with longer side N; "
                        "auto: at the smallest size the preset's crops need (see below; needs --preset "
                        "or --config). Default: every image's bytes as they are")
    p.add_argument("--preset", metavar="NAME",
                   help="with --max-side auto: the preset whose data.img_size and data.min_crop_scale "
                        "size the images (`ummae presets`)")
    p.add_argument("--config", metavar="FILE",
                   help="with --max-side auto: a YAML config (e.g. a run's config.yaml) instead of or "
                        "on top of --preset")
    p.add_argument("--img-size", type=int, metavar="PX", help="with --max-side auto: override data.img_size")
    p.add_argument("--min-crop-scale", type=float, metavar="S",
                   help="with --max-side auto: override data.min_crop_scale")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _size_rule(args: argparse.Namespace):
    """`("auto", img_size, min_crop_scale)`, `("max", N)` or None, from the options; one-line
    ConfigError for a bad combination. Torch-free (`layer_config` reads the preset and file)."""
    from ..errors import ConfigError
    from .checks import check_input

    sizing = {"--preset": args.preset, "--config": args.config, "--img-size": args.img_size,
              "--min-crop-scale": args.min_crop_scale}
    given = [option for option, value in sizing.items() if value is not None]
    if args.max_side != "auto" and given:
        raise ConfigError(f"{given[0]} only applies with --max-side auto (it sizes the images for the preset's crops)")
    if args.max_side is None:
        return None
    if args.max_side == "auto":
        if args.preset is None and args.config is None:
            raise ConfigError("--max-side auto needs --preset NAME (or --config FILE): the crop size and "
                              "smallest crop scale it sizes the images for")
        check_input("--config", args.config, "file")
        from ..resolve import layer_config

        flags = {"data.img_size": args.img_size, "data.min_crop_scale": args.min_crop_scale}
        data = layer_config(args.preset, args.config, flags=flags)[0].data
        if data.img_size < MIN_SIDE:
            raise ConfigError(f"--img-size (data.img_size) must be at least {MIN_SIDE}, got {data.img_size}")
        if not 0 < data.min_crop_scale <= 1:
            raise ConfigError(f"--min-crop-scale (data.min_crop_scale) must be in (0, 1], got {data.min_crop_scale}")
        return "auto", data.img_size, data.min_crop_scale
    try:
        side = int(args.max_side)
    except ValueError:
        raise ConfigError(f"--max-side must be a number of pixels or auto, got '{args.max_side}'") from None
    if side < MIN_SIDE:
        raise ConfigError(f"--max-side must be at least {MIN_SIDE} px, got {side}")
    return "max", side


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError, UmmaeError
    from .checks import check_input, check_output

    # Before importing torch (`cli.checks`): a typo costs no import.
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {args.shard_size}")
    rule = _size_rule(args)
    check_input("--data", args.data, "dir")
    check_output("--out", args.out, "dir")

    from ..data.reencode import CropSafe, LongerSideAtMost
    from ..data.shards import write_shards

    shrink = None if rule is None else CropSafe(*rule[1:]) if rule[0] == "auto" else LongerSideAtMost(rule[1])
    shards, unreadable = write_shards(args.data, args.out, args.shard_size, args.prefix,
                                      progress=not args.no_progress, shrink=shrink)
    out = Path(args.out)
    first, last = Path(shards[0]).stem.rsplit("-", 1)[1], Path(shards[-1]).stem.rsplit("-", 1)[1]
    pattern = out / (f"{args.prefix}-{{{first}..{last}}}.tar" if len(shards) > 1 else Path(shards[0]).name)
    print(f"ummae shards: wrote {len(shards)} shard(s) to {out}")
    if shrink is not None:
        shards_mb = sum(Path(s).stat().st_size for s in shards) / 1e6
        print(f"  images stored  {shrink.describe()}; {shards_mb:,.1f} MB of shards")
    print(f"  train with     ummae pretrain --data '{pattern}'")
    if unreadable:
        listing = out / "skipped_images.txt"
        try:
            listing.write_text("".join(f"{line}\n" for line in unreadable))
        except OSError as e:
            raise UmmaeError(f"--out: cannot write '{listing}': {e.strerror or e}") from None
        print(f"  skipped        {len(unreadable)} unreadable image(s), listed in {listing}")
    return 0
