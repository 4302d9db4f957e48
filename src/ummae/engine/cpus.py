"""How many CPUs this process may use, and the default split between data workers and threads.

A run that starts more busy threads than it has CPUs does not just share them: PyTorch's OpenMP
threads spin while they wait for each other, so on an oversubscribed machine every parallel
region waits for the slowest thread that the scheduler has put aside. Measured on the README
demo (docs/benchmarks.md, "Threads and workers"): a 2-core machine with a competing load ran it
several times slower with the old defaults (2 data workers on top of 2 intra-op threads) than
with the split below.

`usable_cpus()` counts what this process may actually run on: the CPUs of its affinity mask
(taskset, a batch scheduler's cpuset), capped by a cgroup CPU quota (containers, Kubernetes,
SLURM), shared by the processes `torchrun` started on this node. The defaults then give data
workers and intra-op threads together no more than that:

    CPU run:  1 CPU: no worker, 1 thread; 2-3 CPUs: 1 worker, the rest threads; more: a quarter
              of them workers (at most 8), the rest threads.
    CUDA run: the model runs on the GPU, so the CPUs go to loading: all but one are workers
              (at most 8), the rest threads.

An explicit choice wins: `--workers` / `data.num_workers` fixes the workers, `OMP_NUM_THREADS`
the threads (then `fit_threads` leaves torch's thread count alone). No torch here: the counting
is importable before torch is.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["usable_cpus", "auto_workers", "resolve_workers", "fit_threads", "run_plan"]

MAX_AUTO_WORKERS = 8


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in CPUs (e.g. 1.5), or None when there is none (or no cgroup to read)."""
    try:  # cgroup v2: "max 100000" (no limit) or "150000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for base in (root / "cpu", root / "cpu,cpuacct", root):  # cgroup v1: quota -1 = no limit
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota (rounded up: a
    quota of 1.5 CPUs keeps 2 threads busy part of the time), divided among the processes of
    this node under torchrun (LOCAL_WORLD_SIZE). At least 1."""
    cpus = _affinity_count()
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_world = 1
    return max(1, cpus // local_world)


def auto_workers(cpus: int, accelerator: bool) -> int:
    """The default number of DataLoader workers for `cpus` CPUs (see the module docstring)."""
    if accelerator:
        return max(0, min(MAX_AUTO_WORKERS, cpus - 1))
    if cpus <= 1:
        return 0
    return min(MAX_AUTO_WORKERS, max(1, cpus // 4))


def resolve_workers(configured: int | None, device_type: str, cpus: int | None = None) -> int:
    """`configured` (an explicit --workers / data.num_workers), or the default for this machine."""
    if configured is not None:
        return configured
    return auto_workers(usable_cpus() if cpus is None else cpus, accelerator=device_type != "cpu")


@contextlib.contextmanager
def fit_threads(workers: int, cpus: int | None = None) -> Iterator[int]:
    """Torch's intra-op threads = the usable CPUs left by `workers` (at least 1), for the block;
    the previous count after. With OMP_NUM_THREADS set (the user's choice) that count is used.
    Yields the thread count in use."""
    import torch

    previous = torch.get_num_threads()
    try:
        threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:  # unset (or not a number: torch ignores it too)
        threads = max(1, (usable_cpus() if cpus is None else cpus) - workers)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def run_plan(batch: int, accum: int, world_size: int, lr: float, workers: int) -> str:
    """The line a training run prints before its first step: the effective batch with the
    processes counted, the peak lr actually used, and how the CPUs are used per process."""
    import torch

    return (f"effective batch {batch * accum * world_size} ({batch} x {accum} accumulation step(s) x "
            f"{world_size} process(es)), peak lr {lr:.3g}; per process {workers} data worker(s) + "
            f"{torch.get_num_threads()} intra-op thread(s) on {usable_cpus()} usable CPU(s)")
