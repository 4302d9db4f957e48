"""SIGTERM and SIGINT under DDP (#13 item 2): torchrun's launcher forwards the signal to both gloo
ranks, which agree on the step at the next check point, write one checkpoint and exit (128 +
signal, with the line); the same command with `--resume auto` then continues bit-identically to an
uninterrupted 2-process run.

torchrun starts every rank in a session of its own, so a Ctrl-C at the terminal (SIGINT to the
launcher's whole process group) reaches the ranks once, through the launcher, exactly like a
SIGTERM sent to the launcher alone. The launcher itself then exits 1 after printing torch's own
`SignalException` traceback (torchrun's behaviour, not ummae's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny import TINY_SETS
from ummae.engine.checkpoint import load_checkpoint, step_checkpoint_path

STEPS = 30


def _command(out: Path) -> list[str]:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ummae",
            "pretrain", "--no-progress", "--out", str(out), "--batch-size", "2", "--max-steps", str(STEPS),
            "--device", "cpu", "--save-every", "0", "--resume", "auto"]
    for item in [*TINY_SETS, "data.demo_length=16"]:
        args += ["--set", item]
    return args


def _start(out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(_command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signum, whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_to_torchrun_checkpoints_both_ranks_and_the_same_command_continues(tmp_path, signum, whole_group):
    reference_dir, out = tmp_path / "reference", tmp_path / "run"
    reference = _start(reference_dir)
    victim = _start(out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    if whole_group:  # Ctrl-C at a terminal: SIGINT to the launcher's process group
        os.killpg(victim.pid, signum)
    else:  # a scheduler signalling the job step: the launcher only
        os.kill(victim.pid, signum)
    _, err = victim.communicate(timeout=240)
    assert victim.returncode == 1, err[-3000:]  # torchrun's own status after a signal
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if f"stopped by {name} at step" in line]
    assert len(lines) == 2 and "Traceback" not in "".join(lines), err[-3000:]  # one line per rank
    stopped_at = int(lines[0].split("at step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS
    path = step_checkpoint_path(out, stopped_at)
    assert all(f"checkpoint '{path}' written" in line for line in lines), lines
    state = load_checkpoint(path)
    assert state["step"] == stopped_at and state["world_size"] == 2
    with pytest.raises(ProcessLookupError):
        os.killpg(victim.pid, 0)  # no rank outlived the launcher

    resumed = _start(out)  # the same command
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    _, ref_err = reference.communicate(timeout=240)
    assert reference.returncode == 0, ref_err[-3000:]
    assert _losses(out) == _losses(reference_dir)
    final, expected = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference_dir / "checkpoint.pt")
    assert final["step"] == STEPS
    for key, value in expected["model"].items():
        assert torch.equal(value, final["model"][key]), key
