"""scripts/bench_loop.py (docs/bench/loop_cpu.json) end to end on a tiny set: every storage
(folder, shards, re-encoded shards) trains, and the JSON holds what docs/benchmarks.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_loop.py"


def test_the_whole_loop_bench_on_a_tiny_set(tmp_path):
    out = tmp_path / "loop.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "w"), "--presets", "ummae_swin_demo",
                           "--images", "6", "--steps", "2", "--workers", "0", "--batch-size", "2",
                           "--size", "400x300", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["synthetic"]["ummae_swin_demo"] > 0
    runs = {r["storage"]: r for r in report["runs"]}
    assert set(runs) == {"folder", "shards", "reencoded"}
    for run in runs.values():
        assert "error" not in run, run
        assert run["images_per_s"] > 0 and run["loop_over_synthetic"] > 0 and run["cpu_s_per_image"] > 0
    # 400x300 photos are larger than the demo preset's 128 px crops need: re-encoded smaller
    assert report["disk_bytes"]["reencoded:ummae_swin_demo"] < report["disk_bytes"]["shards"]
