"""scripts/digits_tables.py on the shared runner: its --report rebuilds the committed digits tables."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "docs" / "bench" / "digits" / "tables"


def test_help():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "digits_tables.py"), "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "--quick" in r.stdout


def test_report_from_committed_records(tmp_path):
    out = tmp_path / "tables"
    shutil.copytree(RECORDS, out)
    for curve in (out / "finetune").glob("*.jsonl"):  # committed flat; the report reads runs/<name>/
        (out / "runs" / curve.stem).mkdir(parents=True)
        shutil.copy(curve, out / "runs" / curve.stem / "metrics.jsonl")
    (tmp_path / "data" / "train").mkdir(parents=True)  # present: no data set is made
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "digits_tables.py"), "--data", str(tmp_path / "data"),
                        "--out", str(out), "--report"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    committed = json.loads((RECORDS / "results.json").read_text())
    assert results["rows"] == committed["rows"]
    assert results["finetune_long"]["ummae_swin"]["final_top1"] == committed["finetune_long"]["ummae_swin"]["final_top1"]
    assert (out / "finetune_curves.png").exists()
