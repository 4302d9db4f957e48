"""A mistake on the command line is reported before torch is imported (issue #24, item 1).

Importing torch, timm and torchvision takes seconds (more on a loaded machine); a typo should
not pay them. Every case below runs `ummae.cli.main` in one fresh interpreter and records, for
each, the exit status, the error line and whether torch was in `sys.modules` when the error
came: an import-time check, not a timing (docs/benchmarks.md has the timings). The cases are
scripts/error_table.py's, which also writes them into docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from error_table import INPUT_CASES as CASES, make_sandbox  # noqa: E402 - the one list of cases

# Run in the fresh interpreter: every case in turn, then one JSON line of what happened.
_DRIVER = """
import contextlib, io, json, sys
from ummae.cli import main
cases = json.loads(sys.argv[1])
report = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse, --help
            code = e.code
    report.append({"code": code, "err": err.getvalue(), "torch": "torch" in sys.modules,
                   "timm": "timm" in sys.modules, "torchvision": "torchvision" in sys.modules})
print(json.dumps(report))
"""


def _run(argvs: list[list[str]], cwd: Path) -> list[dict]:
    src = Path(__file__).resolve().parents[2] / "src"
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    root = make_sandbox(tmp_path_factory.mktemp("failfast"))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    reports = _run([argv for _, argv, _ in CASES], root)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing created
    return reports


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_the_error_comes_in_one_line_before_torch_is_imported(reports, index):
    name, argv, expected = CASES[index]
    r = reports[index]
    lines = r["err"].strip().splitlines()
    assert r["code"] == 2 and len(lines) == 1, r["err"]
    assert lines[0].startswith(f"ummae {argv[0]}: error: {expected}"), lines[0]
    # Cases run in order in one interpreter: the first to import torch is the one that fails here.
    assert not (r["torch"] or r["timm"] or r["torchvision"]), f"{name} imported torch/timm/torchvision"


def test_help_and_the_presets_listing_import_no_torch(tmp_path):
    argvs = [["--help"], ["pretrain", "--help"], ["presets"], ["presets", "ummae_swin_tiny_256"]]
    for r in _run(argvs, tmp_path):
        assert r["code"] == 0 and not r["torch"] and not r["timm"], r


def test_the_check_sees_torch_when_a_command_imports_it(tmp_path):
    """Negative control: a command that does need the models (--print-config checks the
    configuration with the backbone's own rules) is seen importing torch."""
    r, = _run([["pretrain", "--print-config"]], tmp_path)
    assert r["code"] == 0 and r["torch"], r
