"""One checkpoint file: written atomically, read without unpickling code.

A checkpoint is a dict of tensors and plain Python values only (the configuration is stored as
a plain dict, never as an object), so it loads with `torch.load(weights_only=True)`: a
tampered file cannot run code. It is written to a temporary file in the same folder, flushed to
disk and renamed over the target, so a crash or a full disk mid-write never leaves a truncated
checkpoint in place of a good one. The temporary file (which `mkstemp` makes 0600) gets the
permissions of any other output, 0666 less the umask, before the rename: teammates who may read
a run directory may read its checkpoints.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UmmaeError, first_sentence

__all__ = ["save_checkpoint", "load_checkpoint", "unreadable_reason"]

FORMAT_VERSION = 1


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]


def unreadable_reason(path: str | Path, error: BaseException) -> str:
    """Why torch could not read `path`, in words a user can act on: torch's own messages are
    about its internals ("failed finding central directory ..."; a text file gives "101"), so
    the file's first bytes say what it is instead, and torch's text is quoted whole or not at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return e.strerror or str(e)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):  # torch's zip format, cut short or damaged
        return f"a torch file that is truncated or damaged (torch: {first_sentence(error)})"
    if head.startswith(b"\x80"):  # a pickle: the legacy torch format
        return f"a damaged pickle ({type(error).__name__}: {first_sentence(error)})"
    shown = head.decode("ascii", "replace").splitlines()[0] if head.isascii() else head[:8].hex(" ")
    return f"not a torch file at all: it starts with {shown!r}"


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it can only be read by setting
    it, so it is set back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (plus a format version) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # as open() would have made it
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's writer reports a failed write (a full disk) as a RuntimeError.
        Path(tmp).unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        raise UmmaeError(f"could not write checkpoint '{path}' (disk full or not writable?): {reason}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, refusing anything but tensors and plain values."""
    path = Path(path)
    if not path.is_file():
        raise UmmaeError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UmmaeError(f"refusing to load '{path}': it holds more than weights and plain values "
                         f"({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - junk files fail in the unpickler in many ways
        raise UmmaeError(f"'{path}' is not a readable checkpoint: {unreadable_reason(path, e)}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UmmaeError(f"'{path}' is not an ummae checkpoint (no 'model' entry)")
    return state
