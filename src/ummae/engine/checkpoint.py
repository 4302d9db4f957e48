"""Checkpoints: written atomically, read without unpickling code.

A checkpoint is a dict of tensors and plain Python values only (the configuration is stored as
a plain dict, never as an object), so it loads with `torch.load(weights_only=True)`: a
tampered file cannot run code. It is written to a temporary file in the same folder, flushed to
disk and renamed over the target, so a crash or a full disk mid-write never leaves a truncated
checkpoint in place of a good one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UmmaeError

__all__ = ["save_checkpoint", "load_checkpoint"]

FORMAT_VERSION = 1


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (plus a format version) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
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
        raise UmmaeError(f"'{path}' is not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UmmaeError(f"'{path}' is not an ummae checkpoint (no 'model' entry)")
    return state


# ---------------------------------------------------------------------------------------------
# a run's checkpoint folder: run_dir/checkpoints/step-00001000.pt, the last K kept

CHECKPOINT_DIR = "checkpoints"


def step_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's periodic checkpoints, oldest first (temporary files of a crashed write ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*.pt") if p.stem[5:].isdigit())


def prune_step_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` periodic checkpoints (0 = keep all)."""
    if keep_last <= 0:
        return
    for old in list_step_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> Path:
    """Make `dst` the same file as `src` (hard link, else copy), replacing `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def find_resume_checkpoint(resume: str, out: str | None) -> Path | None:
    """The checkpoint `--resume` means: a path, or with `auto` the newest one in `--out`.

    `auto` with no checkpoint yet returns None (start from scratch), so one job script can both
    start and continue a run.
    """
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise UmmaeError(f"--resume: checkpoint '{path}' does not exist")
        return path
    if not out:
        raise UmmaeError("--resume auto needs --out DIR: the run directory to continue")
    found = list_step_checkpoints(out)
    return found[-1] if found else None


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file belongs to."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent
