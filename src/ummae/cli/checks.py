"""The path checks every command runs first, before it imports torch or does any work.

One rule for every input and output path of every command, so a typo or an unwritable folder
costs a fraction of a second and reads the same everywhere: one line that names the option, the
path and what is wrong (`UmmaeError`: exit status 2).

    check_input("--data", args.data, "dir")       # must exist, and be a folder
    check_output("--out", args.out, "dir")        # a folder that can be created / written into

`check_output` creates nothing that stays: it finds the nearest folder that exists on the way to
the path and writes (and removes) a small probe file there, since permission bits alone do not
tell (root ignores them; a read-only mount or a full disk ignores the bits). Checked here:
a folder where a file is expected and the reverse, a file on the way to the path, no write
permission, a read-only file system, no space left. The writers themselves stay atomic (a
temporary name renamed over the target, removed on failure), for a disk that fills mid-run.

Torch-free: only the standard library.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import UmmaeError

__all__ = ["check_input", "check_output", "is_remote", "PROBE_PREFIX"]

PROBE_PREFIX = ".ummae-write-probe-"  # the probe file's name starts so (tests look for leftovers)
_PROBE_BYTES = 4096  # a whole block: a full disk refuses it (an empty file may still be created)


def is_remote(path: str) -> bool:
    """URLs, `pipe:` commands and brace patterns: not one local path (their own code checks them)."""
    text = str(path)
    return "://" in text or text.startswith("pipe:") or "{" in text


def check_input(option: str, path: str | os.PathLike | None, kind: str = "any") -> None:
    """`path` (given with `option`) exists; `kind`: "dir" (a folder), "file", or "any". None passes."""
    if path is None or is_remote(str(path)):
        return
    p = Path(os.path.expanduser(str(path)))
    if not str(path).strip():
        raise UmmaeError(f"{option}: the path is empty")
    if not p.exists():
        raise UmmaeError(f"{option}: '{path}' does not exist")
    if kind == "dir" and not p.is_dir():
        raise UmmaeError(f"{option}: '{path}' is a file, not a folder")
    if kind == "file" and p.is_dir():
        raise UmmaeError(f"{option}: '{path}' is a folder, not a file")


def check_output(option: str, path: str | os.PathLike | None, kind: str = "file") -> None:
    """`path` (given with `option`) can be written: `kind` "file" (created or replaced) or "dir"
    (created if missing, files written into it). None passes (the command's default is checked
    by passing it). Raises `UmmaeError` naming the option, the path and the cause."""
    if path is None:
        return
    if not str(path).strip():
        raise UmmaeError(f"{option}: the path is empty")
    p = Path(os.path.expanduser(str(path)))  # as given: the messages show the user's own spelling
    if kind == "file" and p.is_dir():
        raise UmmaeError(f"{option}: '{path}' is a folder, not a file; give a file name")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise UmmaeError(f"{option}: '{path}' is a file, not a folder")
    # The folder the writes land in (a file's parent), or the nearest one that exists on the way.
    folder = p if kind == "dir" else p.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UmmaeError(f"{option}: cannot create '{path}': '{existing}' is a file, not a folder")
    _probe(option, path, existing)


def _probe(option: str, path, folder: Path) -> None:
    """Write and remove a small file in `folder`; any refusal becomes one line naming its cause."""
    probe = folder / f"{PROBE_PREFIX}{os.getpid()}"
    fd = None
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"\0" * _PROBE_BYTES)
    except OSError as e:
        raise UmmaeError(f"{option}: cannot write '{path}': {_cause(e, folder)}") from None
    finally:
        if fd is not None:
            os.close(fd)
        try:
            probe.unlink()
        except OSError:
            pass


def _cause(e: OSError, folder: Path) -> str:
    """What to tell the user about a refused write (the OS's words, and where it happened)."""
    where = f" ('{folder}')"
    if e.errno == errno.ENOSPC:
        return "no space left on the device" + where
    if e.errno == errno.EROFS:
        return "read-only file system" + where
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied" + where
    return (e.strerror or str(e)) + where
