"""`ummae` command line: one module per command, each with `add_parser` and `run`.

Errors in what the user gave (config values, paths, checkpoints) are `UmmaeError`s: printed as
one line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UmmaeError, one_line
from . import bench as bench_cmd
from . import convert as convert_cmd
from . import export as export_cmd
from . import finetune as finetune_cmd
from . import knn as knn_cmd
from . import linprobe as linprobe_cmd
from . import presets as presets_cmd
from . import shard_index as shard_index_cmd
from . import shards as shards_cmd
from . import pretrain as pretrain_cmd
from . import visualize as visualize_cmd

__all__ = ["main", "build_parser"]

COMMANDS = (pretrain_cmd, shards_cmd, shard_index_cmd, finetune_cmd, linprobe_cmd, knn_cmd, visualize_cmd, export_cmd,
            convert_cmd, presets_cmd, bench_cmd)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="ummae", description="Efficient masked-image-modeling pre-training (UM-MAE) "
                                               "for Swin, PVT, ViT and Hiera backbones.")
    parser.add_argument("--version", action="version", version=f"ummae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line for the user: the message only, never the source line that raised it."""
    text = str(message).strip().splitlines()
    text = text[0] if text else category.__name__
    if not text.startswith("ummae"):
        text = f"ummae: warning: {text}"
    return text + "\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # For the whole command (forked DataLoader workers inherit it); restored for in-process callers.
    previous_format, warnings.formatwarning = warnings.formatwarning, _warning_line
    from ..engine.signals import RunInterrupted

    try:
        code = args.run(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return code
    except RunInterrupted as e:  # stopped by SIGTERM/SIGINT after a checkpoint: 128 + signal, e.g. 143
        print(f"ummae {args.command}: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except UmmaeError as e:
        print(f"ummae {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ummae {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout left (`ummae presets | head`): not an error of ours, nothing to say.
        # stdout is pointed at devnull so the interpreter's own flush at exit stays silent too.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it
    finally:
        warnings.formatwarning = previous_format
