"""One progress rule for every long command: a bar on a terminal, plain periodic lines otherwise.

A tqdm bar redraws itself with carriage returns; written into a log file (a batch job's, `cmd >
log`) that becomes one endless line. So, as `ummae pretrain` and `ummae finetune` do for their
training steps: on a terminal a bar, anywhere else a plain line every `every_s` seconds with
what is done, the rate and the ETA (and a closing line if any was printed), and nothing with
`--no-progress`. This module is used for the other long loops: feature extraction (`knn`,
`linprobe`), `shards`, fine-tuning's validation; `eta_text` also formats the training lines.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["eta_text", "progress_mode", "Progress", "track"]

T = TypeVar("T")
EVERY_S = 10.0  # seconds between plain lines


def eta_text(seconds: float) -> str:
    """`HH:MM:SS` (with days beyond 24 h), `-` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    text = time.strftime("%H:%M:%S", time.gmtime(seconds))
    return f"{int(seconds // 86400)}d {text}" if seconds >= 86400 else text


def progress_mode(enabled: bool, stream: TextIO | None = None) -> str:
    """`bar` when `stream` (default stderr, where tqdm draws) is a terminal, `lines` when it is
    not, `off` when progress is not wanted."""
    if not enabled:
        return "off"
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "lines"


class Progress:
    """Progress of `total` units (None: unknown) labelled `desc`, drawn as `mode` says.

    `bar`: a tqdm bar on `stream` (removed when done unless `leave`); `lines`: a plain line on
    `stream` at most every `every_s` seconds, `desc: done/total unit, rate, ETA`; `off`: nothing.
    """

    def __init__(self, total: int | None, desc: str, mode: str, unit: str = "it", stream: TextIO | None = None,
                 every_s: float = EVERY_S, leave: bool = False):
        self.total, self.desc, self.mode, self.unit = total, desc, mode, unit
        self.stream = sys.stderr if stream is None else stream
        self.every_s, self.done, self.printed = every_s, 0, False
        self.start = self.last = time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=self.stream,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self.last >= self.every_s:
                self.last = now
                self._line(now)

    def _line(self, now: float, closing: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if closing:
            text = f"{self.desc}: {self.done} {self.unit} in {elapsed:.0f} s ({rate:.1f} {self.unit}/s)"
        else:
            of = f"/{self.total}" if self.total is not None else ""
            eta = (self.total - self.done) / rate if self.total is not None and rate > 0 else float("nan")
            text = f"{self.desc}: {self.done}{of} {self.unit}  {rate:.1f} {self.unit}/s  ETA {eta_text(eta)}"
        print(text, file=self.stream, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines" and self.printed:  # a long loop says when it is over
            self._line(time.perf_counter(), closing=True)


def track(iterable: Iterable[T], desc: str, mode: str, total: int | None = None, unit: str = "it",
          stream: TextIO | None = None, every_s: float = EVERY_S) -> Iterator[T]:
    """`iterable`'s items, one `Progress` step each (`total` defaults to its length)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    progress = Progress(total, desc, mode, unit=unit, stream=stream, every_s=every_s)
    try:
        for item in iterable:
            yield item
            progress.update()
    finally:
        progress.close()
