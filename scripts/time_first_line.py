"""Seconds from `ummae ...` to its first line, for typed mistakes and the light commands.

    PYTHONPATH=src python scripts/time_first_line.py [--runs 5] [--src OTHER/src]

Each command runs `--runs` times in a fresh interpreter, all commands interleaved round by round
(so a change of load hits every row alike), in a scratch folder holding the files the cases name
(`error_table.make_sandbox`). Prints a markdown table of the medians, with `uptime` before and
after. `--before OTHER/src` also times another checkout's code (e.g. the code before the change),
interleaved with this one's command by command, and adds its column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from error_table import make_sandbox  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = [
    ["--help"],
    ["pretrain", "--help"],
    ["presets"],
    ["pretrain", "--data", "no/such/dir"],
    ["pretrain", "--preset", "dmeo"],
    ["pretrain", "--set", "optim.bl=1e-4"],
    ["pretrain", "--set", "train.epochs=ten"],
    ["pretrain", "--config", "no.yaml"],
    ["pretrain", "--config", "bad.yaml"],
    ["finetune", "--checkpoint", "no.pt", "--data", "images"],
    ["knn", "--checkpoint", "ckpt.pt", "--data", "no/dir"],
    ["linprobe", "--checkpoint", "no.pt", "--data", "images"],
    ["export", "--checkpoint", "no.pt", "--out", "x.safetensors"],
    ["convert", "no.pth", "--preset", "ummae_swin_tiny_256", "--out", "x.pt"],
    ["shards", "--data", "no/dir", "--out", "shards"],
    ["visualize", "img.png", "--checkpoint", "no.pt", "--out", "r.png"],
    ["bench", "dmeo"],
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", metavar="SRC", help="also time this source folder's code, interleaved")
    parser.add_argument("--only", type=int, nargs="*", help="time only these rows of COMMANDS (0-based)")
    args = parser.parse_args()
    commands = [COMMANDS[i] for i in args.only] if args.only else COMMANDS
    srcs = [str(ROOT / "src")] + ([os.path.abspath(args.before)] if args.before else [])
    times = {(i, s): [] for i in range(len(commands)) for s in srcs}
    codes = {(i, s): set() for i in range(len(commands)) for s in srcs}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_sandbox(Path(tmp))
        print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        for _ in range(args.runs):
            for i, argv in enumerate(commands):
                for src in srcs:
                    start = time.perf_counter()
                    done = subprocess.run([sys.executable, "-m", "ummae", *argv], cwd=root,
                                          env={**os.environ, "PYTHONPATH": src}, capture_output=True)
                    times[i, src].append(time.perf_counter() - start)
                    codes[i, src].add(done.returncode)
        print("uptime after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        (root / "denied").chmod(0o700)
    head = f"| command | exit | median of {args.runs} (s) | min-max (s) |"
    if args.before:
        head += " before: exit | before: median (s) |"
    print("\n" + head + "\n" + "|---" * head.count(" | ") + "|---|")
    for i, argv in enumerate(commands):
        row = f"| `ummae {' '.join(argv)}` |"
        for k, src in enumerate(srcs):
            t, c = times[i, src], ",".join(map(str, sorted(codes[i, src])))
            row += f" {c} | {statistics.median(t):.2f} |" + (f" {min(t):.2f}-{max(t):.2f} |" if k == 0 else "")
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
