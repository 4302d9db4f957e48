"""scripts/bench_fsdp.py without running a model: the doubling search for the largest batch and
the summary table (the runs themselves are measurements, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_fsdp.py"


@pytest.fixture()
def bench_fsdp():
    spec = importlib.util.spec_from_file_location("bench_fsdp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(model, variant, ranks, batch, peak, step):
    return {"model": model, "variant": variant, "ranks": ranks, "batch_per_rank": batch, "params": 1000,
            "peak_growth_max_bytes": peak, "step_time_s": step,
            "per_rank": [{"after_steps_growth_bytes": 12000}]}


def test_largest_batch_doubles_until_out_of_memory(bench_fsdp, monkeypatch):
    tried = []

    def run_one(model, variant, ranks, batch, steps, device, threads):
        tried.append(batch)
        if batch > 32:
            return {"error": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
        return _run(model, variant, ranks, batch, batch, 1.0)

    monkeypatch.setattr(bench_fsdp, "run_one", run_one)
    found = bench_fsdp.largest_batch("vit_l", "ddp+ckpt", 1, 3, "cuda", 4)
    assert tried == [8, 16, 32, 64]
    assert (found["largest_fitting_batch"], found["first_failing_batch"], found["failure_is_out_of_memory"]) == \
        (32, 64, True)


def test_a_failure_other_than_memory_is_not_taken_for_the_limit(bench_fsdp, monkeypatch):
    monkeypatch.setattr(bench_fsdp, "run_one", lambda *a: {"error": "RuntimeError: NCCL error"})
    found = bench_fsdp.largest_batch("vit_l", "ddp", 1, 3, "cuda", 4)
    assert found["largest_fitting_batch"] is None and found["failure_is_out_of_memory"] is False


def test_summary_separates_state_from_activations(bench_fsdp):
    mib = 2**20
    runs = [_run("vit_l", "ddp", 1, 1, 20000 + 100 * mib, 2.0), _run("vit_l", "ddp", 1, 3, 20000 + 300 * mib, 6.0),
            _run("vit_l", "fsdp", 1, 1, 30000 + 100 * mib, 3.0), _run("vit_l", "fsdp", 1, 3, 30000 + 300 * mib, 6.0),
            {"model": "vit_l", "variant": "fsdp+ckpt", "ranks": 2, "batch_per_rank": 1, "error": "x"}]
    table = bench_fsdp.summarize(runs).splitlines()
    ddp, fsdp = (next(line for line in table if line.startswith(f"| {v} |")) for v in ("ddp", "fsdp"))
    # 100 MiB per image; the intercept is 20000 / 30000 bytes over 1000 parameters
    assert ddp == "| ddp | 1 | 100 | 300 | 20.0 | 100 | 12.0 | 1.00 | 1.00 |"
    assert fsdp == "| fsdp | 1 | 100 | 300 | 30.0 | 100 | 12.0 | 1.50 | 1.00 |"
    assert not any(line.startswith("| fsdp+ckpt") for line in table)
