"""scripts/bench_shards.py --startup (docs/bench/shard_index_cpu.json) runs end to end on a tiny set:
both ways build the same table, and the JSON holds the figures docs/benchmarks.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_shards.py"


def test_startup_bench_on_a_tiny_set(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "d"), "--startup", "--startup-shards", "2",
                    "--startup-members", "50", "--rounds", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    result = json.loads(out.read_text())
    assert result["members"] == 100 and result["shards"] == 2
    assert set(result["cpu_s_median"]) == {"scan/warm", "scan/cold", "index/warm", "index/cold"}
    assert result["index_bytes_total"] == 2 * (72 + 50 * 24 + 50 * len("000000000.jpg"))
