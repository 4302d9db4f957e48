"""engine/cpus.py: the CPUs a process may use (affinity, cgroup quota, torchrun) and the default
split between data workers and intra-op threads, on fake affinity masks and cgroup files."""

from __future__ import annotations

import os

import pytest
import torch

from ummae.engine import cpus


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake machine: `machine(n)` gives the process an affinity mask of n CPUs; cgroup files
    go in the returned folder (empty: no quota)."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_cpus(n: int):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
        return tmp_path

    return set_cpus


def test_affinity_without_quota(machine):
    root = machine(6)
    assert cpus.usable_cpus(root) == 6


def test_cgroup_v2_quota_caps_affinity(machine):
    root = machine(16)
    (root / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 threads busy part of the time
    assert cpus.usable_cpus(root) == 2
    (root / "cpu.max").write_text("max 100000\n")  # no limit
    assert cpus.usable_cpus(root) == 16


def test_cgroup_v2_quota_above_affinity_changes_nothing(machine):
    root = machine(4)
    (root / "cpu.max").write_text("800000 100000\n")
    assert cpus.usable_cpus(root) == 4


def test_cgroup_v1_quota(machine):
    root = machine(32)
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.usable_cpus(root) == 3
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cpus.usable_cpus(root) == 32


def test_torchrun_processes_share_the_node(machine, monkeypatch):
    root = machine(8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpus.usable_cpus(root) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more processes than CPUs: still one each
    assert cpus.usable_cpus(root) == 1


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 64])
@pytest.mark.parametrize("accelerator", [False, True])
def test_workers_and_threads_never_oversubscribe(n, accelerator):
    workers = cpus.auto_workers(n, accelerator)
    threads = max(1, n - workers)
    assert workers >= 0 and workers + threads <= max(n, 1)
    assert workers <= cpus.MAX_AUTO_WORKERS


def test_two_cpus_one_worker_one_thread():
    assert cpus.auto_workers(1, accelerator=False) == 0
    assert cpus.auto_workers(2, accelerator=False) == 1  # measured faster than 0 workers + 2 threads
    assert cpus.auto_workers(16, accelerator=True) == 8


def test_explicit_workers_win():
    assert cpus.resolve_workers(5, "cpu", cpus=2) == 5
    assert cpus.resolve_workers(0, "cuda", cpus=64) == 0
    assert cpus.resolve_workers(None, "cpu", cpus=2) == 1


def test_fit_threads_sets_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with cpus.fit_threads(workers=1, cpus=3) as threads:
        assert threads == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with cpus.fit_threads(workers=4, cpus=2) as threads:  # explicit workers beyond the CPUs: still 1 thread
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cpus.fit_threads(workers=0, cpus=8) as threads:
            assert threads == 1 and torch.get_num_threads() == 1  # not 8
    finally:
        torch.set_num_threads(before)
