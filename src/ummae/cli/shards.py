"""`ummae shards`: pack a folder of images into tar shards (WebDataset format) for pre-training."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  ummae shards --data /data/imagenet/train --out /data/imagenet-shards --shard-size 5000
  ummae pretrain --data '/data/imagenet-shards/train-{000000..000256}.tar' ...
  ummae pretrain --data /data/imagenet-shards ...     (a directory of .tar files works too)
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shards", help="pack a folder of images into tar shards (for large data sets, many nodes)",
        description="Write every image under --data (searched recursively, as `ummae pretrain` does) "
                    "into uncompressed tar shards of --shard-size images, in the WebDataset format, "
                    "bytes unchanged, each with an index file (SHARD.ummae-index) that start-up reads "
                    "instead of every tar header. Unreadable files are left out and listed in "
                    "OUT/skipped_images.txt.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="DIR", required=True, help="folder of images")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the shards into")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    p.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar, ... (default train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError, UmmaeError
    from .checks import check_input, check_output

    # Before importing torch (`cli.checks`): a typo costs no import.
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {args.shard_size}")
    check_input("--data", args.data, "dir")
    check_output("--out", args.out, "dir")

    from ..data.shards import write_shards

    shards, unreadable = write_shards(args.data, args.out, args.shard_size, args.prefix,
                                      progress=not args.no_progress)
    out = Path(args.out)
    first, last = Path(shards[0]).stem.rsplit("-", 1)[1], Path(shards[-1]).stem.rsplit("-", 1)[1]
    pattern = out / (f"{args.prefix}-{{{first}..{last}}}.tar" if len(shards) > 1 else Path(shards[0]).name)
    print(f"ummae shards: wrote {len(shards)} shard(s) to {out}")
    print(f"  train with     ummae pretrain --data '{pattern}'")
    if unreadable:
        listing = out / "skipped_images.txt"
        try:
            listing.write_text("".join(f"{line}\n" for line in unreadable))
        except OSError as e:
            raise UmmaeError(f"--out: cannot write '{listing}': {e.strerror or e}") from None
        print(f"  skipped        {len(unreadable)} unreadable image(s), listed in {listing}")
    return 0
