"""One run per run directory: a lock file, and the leftovers of a killed run cleared away.

`run_dir/.lock` is locked with `flock` by the process that writes the run (rank 0 of a DDP
run; the other ranks write nothing). The kernel releases the lock when that process ends, however
it ends (SIGKILL included), so a killed run never leaves it stale: the file stays, the lock does
not (a clean end deletes it). A second process that tries to write the same directory fails at once with one line naming
the holder (pid and host, from the file). `flock` is local to one host (and unreliable on some
network file systems); two hosts writing one directory are not detected.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import weakref
from pathlib import Path

from ..errors import ConfigError, UmmaeError
from .checkpoint import CHECKPOINT_DIR, list_step_checkpoints

__all__ = ["RunDirLock", "remove_orphaned_temporaries", "take_run_dir"]


class RunDirLock:
    """Exclusive lock of a run directory for the life of this object (or until `release`)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UmmaeError(f"run directory '{run_dir}' is in use by another ummae run ({holder}); wait "
                                 f"for it to end or choose another --out") from None
            # The holder deletes the file when it ends cleanly: if ours was deleted between our open
            # and our flock, we locked an orphan; start over with the new file.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd: int | None = fd
        _HELD.add(self)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked (see __init__); a kill leaves the file, unlocked
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: "weakref.WeakSet[RunDirLock]" = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    """A forked child (a DataLoader worker) lets go of the run's lock: a flock belongs to the open
    file, which fork shares, so workers outliving a SIGKILLed run (they notice their parent's death
    only after a few seconds) would keep the directory locked. The parent still holds it."""
    for lock in list(_HELD):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def remove_orphaned_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted.

    Call only while holding the run's lock: then no write is in progress.
    """
    run_dir = Path(run_dir)
    # checkpoints/.step-*.pt.*.tmp; .checkpoint.pt.tmp (pretrain), .best.pt.*.tmp / .last.pt.*.tmp (finetune)
    found = list((run_dir / CHECKPOINT_DIR).glob(".step-*.pt.*.tmp")) + list(run_dir.glob(".*.pt*.tmp"))
    for path in found:
        path.unlink(missing_ok=True)
    folders = [p for p in (run_dir / CHECKPOINT_DIR).glob(".step-*.dcp.tmp") if p.is_dir()]  # FSDP's shards
    for path in folders:
        shutil.rmtree(path, ignore_errors=True)
    found += folders
    return found


def take_run_dir(stack: contextlib.ExitStack, run_dir: Path, resuming: bool) -> None:
    """Make `run_dir` this run's (pretrain and finetune; rank 0 only, the other DDP ranks do not
    lock): hold its lock until `stack` closes, remove what killed writes left, and refuse a fresh
    run into a directory that already holds one's step checkpoints (it would prune them as its own)."""
    stack.enter_context(RunDirLock(run_dir))
    remove_orphaned_temporaries(run_dir)
    if not resuming and list_step_checkpoints(run_dir):
        last = list_step_checkpoints(run_dir)[-1].stem[5:].lstrip("0") or 0
        raise ConfigError(f"--out '{run_dir}' already holds a run (checkpoints up to step {last}); continue it "
                          f"with --resume auto or choose another --out")
