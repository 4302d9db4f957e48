"""scripts/gpu_checks.py --smoke: the GPU script's code paths, on a CPU with demo presets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_checks.py"


@pytest.fixture(scope="module")
def gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_grid_eager_and_compiled_with_mfu_and_matmul(gpu_checks, tmp_path):
    out = tmp_path / "smoke.json"
    gpu_checks.SMOKE_GRID = gpu_checks.SMOKE_GRID[:1]  # one pair: UM-MAE Swin vs SimMIM
    code = gpu_checks.main(["--smoke", "--out", str(out), "--parts", "matmul,grid,profile"])
    report = json.loads(out.read_text())
    assert code == 0, {k: v for k, v in report.items() if isinstance(v, dict) and "error" in v}
    assert report["smoke"] and report["matmul"]["flops_per_s"] > 0
    rows = report["grid"]
    assert {(r["mode"], r["preset"]) for r in rows} == {
        (m, p) for m in ("eager", "compile") for p in ("ummae_swin_demo", "simmim_swin_demo")}
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 10 and r["train_flops_per_step"] > 0
    assert "swin.position_bias" in report["profile"]["components"]


def test_cuda_run_without_a_gpu_is_refused(gpu_checks, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_checks.torch.cuda, "is_available", lambda: False)
    assert gpu_checks.main(["--out", str(tmp_path / "x.json")]) == 2


def test_smoke_loader_runs_both_decode_modes_next_to_the_synthetic_step(gpu_checks, tmp_path):
    out = tmp_path / "loader.json"
    code = gpu_checks.main(["--smoke", "--out", str(out), "--parts", "loader"])
    report = json.loads(out.read_text())
    assert code == 0, report.get("loader")
    loader = report["loader"]
    assert loader["synthetic_step_images_per_s"] > 0
    assert [(r["jpeg_size"], r["decode"]) for r in loader["runs"]] == [
        ([500, 375], "fast"), ([500, 375], "gpu"), ([500, 375], "device decode alone (decode_batch)")]
    for r in loader["runs"][:2]:
        assert r["full_loop_images_per_s"] > 0 and r["cpu_decoded"] == 0  # RGB JPEGs: all decoded in the loop
    assert loader["runs"][2]["images_per_s"] > 0
