"""A mistake on the command line is reported before torch is imported (issue #24, item 1).

Importing torch, timm and torchvision takes seconds (more on a loaded machine); a typo should
not pay them. Every case below runs `ummae.cli.main` in one fresh interpreter and records, for
each, the exit status, the error line and whether torch was in `sys.modules` when the error
came: an import-time check, not a timing (docs/benchmarks.md has the timings).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# (name, argv, the start of the error line after "ummae COMMAND: error: ")
CASES = [
    ("pretrain missing --data", ["pretrain", "--data", "no/such/dir"], "--data: 'no/such/dir' does not exist"),
    ("pretrain preset typo", ["pretrain", "--preset", "dmeo"], "unknown preset 'dmeo'"),
    ("pretrain unknown --set key", ["pretrain", "--set", "optim.bl=1e-4"], "unknown config key 'optim.bl'"),
    ("pretrain ill-typed --set", ["pretrain", "--set", "train.epochs=ten"], "train.epochs must be an integer"),
    ("pretrain bad value", ["pretrain", "--set", "optim.blr=-1"], "optim.blr must be > 0"),
    ("pretrain missing --config", ["pretrain", "--config", "no.yaml"], "--config: 'no.yaml' does not exist"),
    ("pretrain bad YAML --config", ["pretrain", "--config", "bad.yaml"], "--config: 'bad.yaml' is not valid YAML"),
    ("pretrain missing --init-weights", ["pretrain", "--init-weights", "no.pt"], "--init-weights: 'no.pt' does not exist"),
    ("pretrain --out is a file", ["pretrain", "--out", "file.txt"], "--out: 'file.txt' is a file, not a folder"),
    ("finetune missing --checkpoint", ["finetune", "--checkpoint", "no.pt", "--data", "images"],
     "--checkpoint: 'no.pt' does not exist"),
    ("finetune missing --data", ["finetune", "--checkpoint", "ckpt.pt", "--data", "no/dir"],
     "--data: 'no/dir' does not exist"),
    ("finetune --val-data and --val-fraction", ["finetune", "--checkpoint", "ckpt.pt", "--data", "images",
                                                "--val-data", "images", "--val-fraction", "0.2"],
     "give either --val-data or --val-fraction"),
    ("knn missing --data", ["knn", "--checkpoint", "ckpt.pt", "--data", "no/dir"], "--data: 'no/dir' does not exist"),
    ("knn bad --k", ["knn", "--checkpoint", "ckpt.pt", "--data", "images", "--k", "0"], "--k must be positive"),
    ("linprobe missing --checkpoint", ["linprobe", "--checkpoint", "no.pt", "--data", "images"],
     "--checkpoint: 'no.pt' does not exist"),
    ("linprobe bad --epochs", ["linprobe", "--checkpoint", "ckpt.pt", "--data", "images", "--epochs", "0"],
     "need --epochs >= 1"),
    ("export missing --checkpoint", ["export", "--checkpoint", "no.pt", "--out", "x.safetensors"],
     "--checkpoint: 'no.pt' does not exist"),
    ("convert missing file", ["convert", "no.pth", "--preset", "ummae_swin_tiny_256", "--out", "x.pt"],
     "OFFICIAL.pth: 'no.pth' does not exist"),
    ("convert preset typo", ["convert", "ckpt.pt", "--preset", "ummae_swin_tiny", "--out", "x.pt"],
     "unknown preset 'ummae_swin_tiny'"),
    ("convert bad --set value", ["convert", "ckpt.pt", "--preset", "ummae_swin_tiny_256", "--set",
                                 "model.merge=foo", "--out", "x.pt"], "model.merge must be linear or conv"),
    ("shards missing --data", ["shards", "--data", "no/dir", "--out", "shards"], "--data: 'no/dir' does not exist"),
    ("shards bad --shard-size", ["shards", "--data", "images", "--out", "shards", "--shard-size", "0"],
     "--shard-size must be at least 1"),
    ("visualize missing --checkpoint", ["visualize", "img.png", "--checkpoint", "no.pt", "--out", "r.png"],
     "--checkpoint: 'no.pt' does not exist"),
    ("visualize bad --masks", ["visualize", "img.png", "--checkpoint", "ckpt.pt", "--out", "r.png", "--masks", "0"],
     "--masks must be >= 1"),
    ("bench preset typo", ["bench", "dmeo"], "unknown preset 'dmeo'"),
    ("bench unknown --set key", ["bench", "demo", "--set", "model.depth=2"], "unknown config key 'model.depth'"),
]

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


def _sandbox(root: Path) -> Path:
    """The files the cases name: a labeled folder, stand-ins for a checkpoint and an image."""
    (root / "images" / "a").mkdir(parents=True)
    for name in ("ckpt.pt", "img.png", "file.txt"):
        (root / name).write_bytes(b"not what it claims to be")
    (root / "bad.yaml").write_text("train: [1, 2\n")
    return root


def _run(argvs: list[list[str]], cwd: Path) -> list[dict]:
    src = Path(__file__).resolve().parents[2] / "src"
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    root = _sandbox(tmp_path_factory.mktemp("failfast"))
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
