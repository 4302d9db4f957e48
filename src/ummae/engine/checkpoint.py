"""Checkpoints of a run: its checkpoint folder (`step-*.pt`, the last K kept), `--resume auto`.

Under `--strategy fsdp` a periodic checkpoint is a folder `step-*.dcp` of shards instead
(`engine.sharded_checkpoint`); listing, pruning and `--resume auto` treat both kinds alike.

The file format itself (atomic write, weights-only read) is `ummae.checkpoint_file`, re-exported
here: the models read checkpoints too, and live below the engine.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint_file import FORMAT_VERSION, load_checkpoint, save_checkpoint
from ..errors import UmmaeError

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT_VERSION"]


# ---------------------------------------------------------------------------------------------
# a run's checkpoint folder: run_dir/checkpoints/step-00001000.pt, the last K kept

CHECKPOINT_DIR = "checkpoints"
SHARDED_SUFFIX = ".dcp"  # a folder of shards (engine.sharded_checkpoint)


def step_checkpoint_path(run_dir: str | Path, step: int, sharded: bool = False) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}{SHARDED_SUFFIX if sharded else '.pt'}"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.suffix == SHARDED_SUFFIX and path.is_dir()


def list_step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's periodic checkpoints (files and sharded folders), oldest first (temporary files
    and folders of a crashed write ignored: their names start with a dot)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*.pt") if p.stem[5:].isdigit()]
    found += [p for p in folder.glob(f"step-*{SHARDED_SUFFIX}") if p.stem[5:].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: (int(p.stem[5:]), p.suffix))


def prune_step_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` periodic checkpoints (0 = keep all)."""
    if keep_last <= 0:
        return
    import shutil

    for old in list_step_checkpoints(run_dir)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
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
        if not (path.is_file() or is_sharded_checkpoint(path)):
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
