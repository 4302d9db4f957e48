"""Long runs on shared clusters: the requeue pattern (`--resume auto` from the first run on),
extending a finished run, one run per directory, leftovers of killed runs, paths from any
working directory, SIGTERM/SIGINT, and nothing non-finite ever written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import ummae.engine.pretrain as pretrain_module
from tiny import TINY_SETS, run_cli_captured
from ummae.engine.checkpoint import load_checkpoint, step_checkpoint_path
from ummae.engine.guard import state_is_finite
from ummae.engine.optim import build_scheduler
from ummae.engine.rundir import RunDirLock

STEPS = 8


def job(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """The job script's command: the same line every time it is (re)submitted."""
    args = ["pretrain", "--no-progress", "--preset", "demo", "--out", str(out), "--resume", "auto",
            "--batch-size", "2", "--max-steps", str(steps), "--save-every", "2", "--keep-last", "0"]
    for item in TINY_SETS:
        args += ["--set", item]
    return args + list(extra)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    recs = records(run_dir)
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), "each step logged once, in order"
    return {r["step"]: r["loss"] for r in recs}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("ummae: warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run of the job command."""
    out = tmp_path_factory.mktemp("requeue") / "reference"
    result = run_cli_captured(job(out), out)
    assert result.code == 0, result.err
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    return out


# ---------------------------------------------------------------- the requeue pattern


def test_the_same_command_resumes_bit_identically(reference, tmp_path):
    out = tmp_path / "requeued"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(step_checkpoint_path(reference, 4), out / "checkpoints")  # killed after step 4's checkpoint
    (out / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text())  # and some lines after it
    result = run_cli_captured(job(out), out)
    assert result.code == 0, result.err
    assert "resuming at step 4 of 8" in result.out and "resumed from" in result.out
    assert losses(out) == losses(reference)
    for key, value in weights(reference / "checkpoint.pt").items():
        assert torch.equal(value, weights(out / "checkpoint.pt")[key]), key


def test_a_changed_configuration_is_refused_naming_the_keys(reference, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(reference, out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = run_cli_captured(job(out, "--batch-size", "4", "--set", "optim.weight_decay=0.1"), out)
    assert result.code == 2
    line = one_error_line(result.err)
    assert "train.batch_size (2 -> 4)" in line and "optim.weight_decay (0.05 -> 0.1)" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # negative control: the same command with only resumable keys changed is accepted
    ok = run_cli_captured(job(out, "--save-every", "3", "--keep-last", "5", "--set", "train.log_every=2"), out)
    assert ok.code == 0, ok.err


def test_extending_a_finished_run_continues_on_the_new_schedule(reference, tmp_path):
    out = tmp_path / "extended"
    shutil.copytree(reference, out)
    result = run_cli_captured(job(out, steps=12), out)
    assert result.code == 0, result.err
    recs = records(out)
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert {r["step"]: r["loss"] for r in recs[:STEPS]} == losses(reference)  # history kept
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 12
    # steps 9..12 follow the lr schedule of a 12-step run (not the finished 8-step one, at its minimum)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    warmup = load_checkpoint(out / "checkpoint.pt")["steps_per_epoch"]  # demo: 1 warm-up epoch
    sched = build_scheduler(opt, 12, warmup, 0.0)
    expected = []
    for u in range(1, 13):
        sched.step_update(u)
        expected.append(opt.param_groups[0]["lr"])
    assert [r["lr"] for r in recs[STEPS:]] == pytest.approx(expected[STEPS:], rel=1e-12)
    assert recs[STEPS]["lr"] > recs[STEPS - 1]["lr"]


def test_a_finished_run_submitted_again_does_nothing_and_says_so(reference, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    ckpt_bytes = (out / "checkpoint.pt").read_bytes()
    result = run_cli_captured(job(out), out)
    assert result.code == 0, result.err
    assert "already finished" in result.out
    assert f"final loss       {losses(reference)[STEPS]:.4f}" in result.out and "nan" not in result.out
    assert (out / "checkpoint.pt").read_bytes() == ckpt_bytes
    assert losses(out) == losses(reference)


def test_a_fresh_run_into_a_directory_holding_a_run_is_refused(reference, tmp_path):
    out = tmp_path / "occupied"
    shutil.copytree(reference, out)
    fresh = [a for a in job(out) if a not in ("--resume", "auto")]
    result = run_cli_captured(fresh, out)
    assert result.code == 2
    assert "--resume auto" in one_error_line(result.err)
    assert losses(out) == losses(reference)  # nothing appended, nothing pruned
    assert len(list((out / "checkpoints").glob("step-*.pt"))) == STEPS // 2


# ---------------------------------------------------------------- one run per directory, leftovers


def test_a_second_run_into_a_directory_in_use_fails_at_once(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with RunDirLock(out):  # another process's run (flock conflicts between open files, in one process too)
        result = run_cli_captured(job(out), out)
    assert result.code == 2
    assert "in use by another ummae run" in one_error_line(result.err) and f"pid {os.getpid()}" in result.err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert run_cli_captured(job(out, steps=2), out).code == 0  # negative control: free again


def test_a_killed_runs_lock_and_temporary_files_do_not_block_the_next_start(tmp_path):
    out = tmp_path / "killed"
    (out / "checkpoints").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ummae.engine.rundir import RunDirLock; "
                               f"lock = RunDirLock({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert run_cli_captured(job(out, steps=2), out).code == 2  # held by a live process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / ".lock").exists()  # the file stays behind, its lock does not
    orphans = [out / "checkpoints" / ".step-00000002.pt.x1y2.tmp", out / ".checkpoint.pt.tmp"]
    for path in orphans:
        path.write_bytes(b"half a checkpoint")
    result = run_cli_captured(job(out, steps=2), out)
    assert result.code == 0, result.err
    assert not any(p.exists() for p in orphans)
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()


# ---------------------------------------------------------------- paths


def test_paths_are_stored_absolute_so_resume_and_config_work_from_anywhere(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "photos").mkdir(parents=True)
    elsewhere.mkdir()
    for i in range(8):
        Image.new("RGB", (80, 72), (i * 30, 100, 200 - i * 20)).save(work / "photos" / f"{i}.png")
    monkeypatch.chdir(work)
    args = job(Path("run"), "--data", "photos", steps=4)
    assert run_cli_captured(args, work / "run").code == 0
    saved = json.loads(json.dumps(load_checkpoint(work / "run" / "checkpoint.pt")["config"]))
    assert saved["data"]["path"] == str(work / "photos") and saved["train"]["out"] == str(work / "run")

    monkeypatch.chdir(elsewhere)
    again = run_cli_captured(["pretrain", "--no-progress", "--resume", str(work / "run" / "checkpoint.pt"),
                              "--max-steps", "5"], work / "run")
    assert again.code == 0, again.err
    copy = run_cli_captured(["pretrain", "--no-progress", "--config", str(work / "run" / "config.yaml"),
                             "--out", "copy", "--max-steps", "1"], elsewhere / "copy")
    assert copy.code == 0, copy.err


# ---------------------------------------------------------------- non-finite numbers


def _all_checkpoints_finite(out: Path) -> list[int]:
    steps = []
    for path in sorted((out / "checkpoints").glob("step-*.pt")):
        state = load_checkpoint(path)
        assert state_is_finite(state["model"], state["optimizer"]), path
        steps.append(state["step"])
    return steps


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_an_lr_that_overflows_the_update_never_reaches_a_checkpoint(tmp_path, policy):
    """lr 1e6: the loss is finite at step 3, its gradients are not; before, step 3 was saved with
    non-finite weights and the run stopped at step 4 saying the checkpoints were untouched."""
    out = tmp_path / policy
    result = run_cli_captured(job(out, "--set", "optim.lr=1e6", "--set", f"train.on_nonfinite={policy}",
                                  "--save-every", "1"), out)
    if policy == "stop":
        assert result.code == 2
        line = one_error_line(result.err)
        assert "step 3" in line and "non-finite" in line and "nothing non-finite was written" in line
        assert _all_checkpoints_finite(out) == [1, 2]
        assert not (out / "checkpoint.pt").exists()
    else:  # every update from step 3 on is skipped on the device: the run ends with step 2's weights
        assert result.code == 0, result.err
        assert f"skipped steps    {STEPS - 2} with a non-finite loss" in result.out
        assert _all_checkpoints_finite(out) == list(range(1, STEPS + 1))
        final, second = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(step_checkpoint_path(out, 2))
        assert all(torch.equal(final["model"][k], v) for k, v in second["model"].items())


def test_an_update_that_makes_the_weights_non_finite_stops_even_with_skip(tmp_path, monkeypatch):
    real = pretrain_module.build_optimizer

    def poisoning_optimizer(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step
        calls = []

        def poisoned_step(*a, **k):
            out = step(*a, **k)
            calls.append(1)
            if len(calls) == 2:  # finite gradients, but this update overflows one weight
                optimizer.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
            return out

        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(pretrain_module, "build_optimizer", poisoning_optimizer)
    out = tmp_path / "weights"
    result = run_cli_captured(job(out, "--set", "train.on_nonfinite=skip", "--save-every", "1",
                                  "--set", "train.log_every=3"), out)
    assert result.code == 2
    line = one_error_line(result.err)
    assert "the update made the weights non-finite" in line and "at step 2 " in line
    assert _all_checkpoints_finite(out) == [1]  # the check point of step 2 caught it before saving
    assert [r["step"] for r in records(out)] == []  # stopped at step 2, before its log line (every 3)


# ---------------------------------------------------------------- signals


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ummae", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_the_step_boundary_and_the_same_command_continues(tmp_path, signum):
    steps = 40
    command = lambda out: job(out, "--save-every", "0", "--set", "data.num_workers=1",  # noqa: E731
                              "--set", "data.demo_length=16", steps=steps)
    ref_dir, out = tmp_path / "reference", tmp_path / "run"
    reference = _start(command(ref_dir))
    victim = _start(command(out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    os.killpg(victim.pid, signum)  # the whole process group, DataLoader worker included, as SLURM / Ctrl-C do
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signum, err
    line = one_error_line(err)
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step" in line and "--resume auto" in line
    stopped_at = int(line.split("at step ")[1].split(";")[0])
    assert 3 <= stopped_at < steps
    assert load_checkpoint(step_checkpoint_path(out, stopped_at))["step"] == stopped_at
    with pytest.raises(ProcessLookupError):
        os.killpg(victim.pid, 0)  # no process of the run (worker included) is left

    resumed = _start(command(out))
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    assert losses(out) == losses(ref_dir)
    for key, value in weights(ref_dir / "checkpoint.pt").items():
        assert torch.equal(value, weights(out / "checkpoint.pt")[key]), key


def test_an_ignored_override_is_named_with_what_wins(capsys):
    from ummae.resolve import resolve_config

    cfg = resolve_config("demo", sets=["optim.blr=1e6"])
    err = capsys.readouterr().err
    assert cfg.peak_lr() == 1e-3
    assert "--set optim.blr=1e6 is ignored" in err and "optim.lr=0.001" in err and "optim.lr=none" in err
    resolve_config("demo", sets=["optim.blr=1e6", "optim.lr=none"])  # negative control: no warning
    resolve_config("demo", sets=["model.embed_dim=8"])
    assert capsys.readouterr().err == ""
    resolve_config("ummae_pvt_demo", sets=["model.embed_dim=8"])
    assert "model.embed_dims" in capsys.readouterr().err


def test_a_model_configuration_error_is_found_before_the_run_directory_exists(tmp_path):
    out = tmp_path / "never"
    result = run_cli_captured(["pretrain", "--no-progress", "--out", str(out), "--set", "data.img_size=96"], out)
    assert result.code == 2
    assert "image size 96x96" in one_error_line(result.err)  # found by building the model on the meta device
    assert not out.exists()
