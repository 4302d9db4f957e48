"""`ummae shard-index`: write the start-up index next to tar shards that `ummae shards` did not write."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  ummae shard-index --data '/data/laion-shards/{000000..012345}.tar'
  ummae shard-index --data /data/imagenet-shards            (every .tar in the folder)
  ummae shard-index --data shards.txt --force               (a list of shards; rewrite every index)
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shard-index", help="write the start-up index next to tar shards written by other tools",
        description="Write SHARD.ummae-index next to every shard --data names that lacks a fresh one, "
                    "so that `ummae pretrain` reads one small file per shard at start-up instead of "
                    "every member's tar header. `ummae shards` writes them already; this is for "
                    "shards written by anything else (WebDataset, tar, img2dataset), or rewritten "
                    "since. The shards' folder must be writable.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="SHARDS", required=True,
                   help="the shards, as `ummae pretrain --data` takes them: a brace pattern, a folder "
                        "of .tar files, one .tar, or a text file listing shards")
    p.add_argument("--force", action="store_true", help="rewrite fresh indexes too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from .checks import check_input

    check_input("--data", args.data)  # before importing torch (`ummae.data`): a typo costs no import

    from ..data.shards import index_shards

    written, fresh, problems = index_shards(args.data, force=args.force, progress=not args.no_progress)
    for problem in problems:
        warnings.warn(f"no index for {problem}; its tar headers are read at every start instead")
    total = written + fresh + len(problems)
    line = f"ummae shard-index: {total} shard(s): wrote {written} index(es), {fresh} already up to date"
    print(line + (f", {len(problems)} not indexable (warned above)" if problems else ""))
    return 0
