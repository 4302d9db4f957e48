"""DDP through torchrun on CPU (gloo): 2 processes train like 1 process with the same effective batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import TINY_HIERA_SETS, TINY_SETS

STEPS = 4
# The tiny Swin (UM-MAE), UM-MAE on timm's Swin V2, and timm's Hiera (MAE, masked by Hiera itself).
MODELS = {"swin": (), "swinv2": ("--preset", "ummae_swinv2_demo"), "hiera": ("--preset", "mae_hiera_demo", *(a for s in TINY_HIERA_SETS for a in ("--set", s)))}


def tiny(out: Path, batch: int, *extra: str) -> list[str]:
    args = ["pretrain", "--no-progress", "--out", str(out), "--batch-size", str(batch),
            "--max-steps", str(STEPS), "--set", "train.log_every=1", "--device", "cpu",
            # the lr from MAE's rule (the demo's absolute lr would not show the processes counted):
            # 0.064 x 4 / 256 = 1e-3, batch 4 in one process or 2 x 2 processes
            "--set", "optim.lr=none", "--set", "optim.blr=0.064"]
    for item in TINY_SETS:
        args += ["--set", item]
    return args + list(extra)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=list(MODELS))
def runs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(f"ddp-{request.param}")
    model = MODELS[request.param]
    single = run([sys.executable, "-m", "ummae", *tiny(root / "single", 4, *model)])
    assert single.returncode == 0, single.stderr
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ummae", *tiny(root / "ddp", 2, *model)])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return root, single, ddp


def test_two_gloo_processes_match_one_process_with_the_same_effective_batch(runs):
    root, _, _ = runs
    single, ddp = losses(root / "single"), losses(root / "ddp")
    assert len(single) == len(ddp) == STEPS
    # Same samples, crops and masks; only the gradient sum is split across processes.
    for a, b in zip(single, ddp):
        assert math.isclose(a, b, rel_tol=1e-5), (single, ddp)
    w1 = torch.load(root / "single" / "checkpoint.pt", weights_only=True)["model"]
    w2 = torch.load(root / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    # Adam divides by sqrt(v): on weights with near-zero gradients, summation-order differences
    # of ~1e-7 become visible; 5e-5 is 5% of one step at lr 1e-3, far below a different run.
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=5e-5)


def test_only_rank_zero_writes_and_the_lr_scales_with_the_world_size(runs):
    root, single, ddp = runs
    state = torch.load(root / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2
    single_lr = [json.loads(l)["lr"] for l in (root / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp_lr = [json.loads(l)["lr"] for l in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert ddp_lr == pytest.approx(single_lr)  # batch 2 x 2 processes = batch 4
    assert ddp.stdout.count("ummae pretrain: done") == 1  # one summary, from rank 0
    assert "processes        2 (DDP)" in ddp.stdout
    # The start line and the closing summary count the processes: 2 x 2 = 4, lr as trained.
    assert "effective batch 4 (2 x 1 accumulation step(s) x 2 process(es)), peak lr 0.001;" in ddp.stdout
    assert "effective batch 4 (4 x 1 accumulation step(s) x 1 process(es)), peak lr 0.001;" in single.stdout
    for out in (ddp.stdout, single.stdout):
        assert "effective batch 4, lr 0.001)" in out
    assert ddp_lr[-1] == pytest.approx(0.0) and max(ddp_lr) == pytest.approx(1e-3)  # the peak: 0.064 x 2 x 2 / 256


def test_emae_two_gloo_processes_match_one_process(tmp_path):
    """EMAE (4 uniform parts per image, masks drawn in the workers): same losses and weights."""
    emae = ("--set", "method=emae")
    single = run([sys.executable, "-m", "ummae", *tiny(tmp_path / "single", 4, *emae)])
    assert single.returncode == 0, single.stderr
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ummae", *tiny(tmp_path / "ddp", 2, *emae)])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=1e-5), (a, b)
    w1 = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=5e-5)



# Each rank runs `ummae pretrain` as the CLI does, then counts its gloo threads before exiting.
_RANK_SCRIPT = """
import os, sys
import ummae.engine.distributed as distributed
from ummae.cli import main

if sys.argv[1] == "no-collect":  # the control: the process group left to interpreter shutdown
    distributed.gc = type("NoCollect", (), {"collect": staticmethod(lambda: 0)})
code = main(sys.argv[2:])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {os.environ['RANK']} gloo threads {sum('gloo' in n for n in names)}", flush=True)
if sys.argv[1] == "no-collect":
    os._exit(code)  # skip the interpreter shutdown where the control's rank could abort
sys.exit(code)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads thread names from /proc")
def test_a_finished_rank_frees_its_gloo_group_before_the_interpreter_exits(tmp_path):
    """A group left to interpreter shutdown aborts a finished rank at random (SIGABRT, "terminate
    called without an active exception"): after the run, no gloo thread is left."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    counts = {}
    for how in ("no-collect", "ours"):
        out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(script), how, *tiny(tmp_path / how, 2, "--max-steps", "1")])
        assert out.returncode == 0, out.stderr[-3000:]
        counts[how] = sorted(int(line.split()[-1]) for line in out.stdout.splitlines() if "gloo threads" in line)
    assert len(counts["ours"]) == 2 and min(counts["no-collect"]) > 0, counts  # the control has them
    assert counts["ours"] == [0, 0], counts
