"""docs/reliability.md's table of error messages is what the commands print now (issue #24, item 3)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import error_table  # noqa: E402


def test_the_documented_table_is_up_to_date():
    written = error_table.written_table(error_table.DOC.read_text())
    assert written is not None, "docs/reliability.md lost its error-table block"
    # A fresh interpreter: the commands run in-process, and a test that registered a backbone of
    # its own (tests/test_extending.py) would add its option to the "known keys" lines here.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(error_table.ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    fresh = subprocess.run([sys.executable, str(Path(error_table.__file__))], capture_output=True, text=True,
                           check=True, env=env).stdout.rstrip("\n")
    assert written == fresh, "run `PYTHONPATH=src python scripts/error_table.py --write`"
    # Every row is an error: exit 2 and a line naming the command (a case that stopped failing
    # would show up here with exit 0 before it could drift into the docs).
    rows = [r for r in fresh.splitlines() if r.startswith("| ") and not r.startswith("| mistake")]
    assert len(rows) == len(error_table.INPUT_CASES) + len(error_table.CHECKPOINT_CASES) + \
        len(error_table.WRITERS) * len(error_table.OUTPUT_CASES)
    assert all(" | 2 | `ummae " in r for r in rows), [r for r in rows if " | 2 | " not in r]
    # The broken-checkpoint cases say what the file is (they are checked nowhere else).
    for name, argv, expected in error_table.CHECKPOINT_CASES:
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        assert f"`ummae {argv[0]}: error: {expected}" in row, row
