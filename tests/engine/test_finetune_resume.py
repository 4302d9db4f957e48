"""`ummae finetune` on long runs (#13 items 9 and 11): periodic checkpoints of the whole state,
`--resume auto` bit-identical after SIGKILL or SIGTERM (RandAugment, random erasing, mixup/cutmix,
RecursiveMix and drop path on; 0 and 2 DataLoader workers; 2 gloo processes), the requeue
pattern, one run per directory, leftovers of killed runs, absolute paths, nothing non-finite
written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny import run_cli_captured, sigkill_after_checkpoints
from ummae.engine.checkpoint import list_step_checkpoints, load_checkpoint, step_checkpoint_path
from ummae.engine.guard import state_is_finite
from ummae.engine.rundir import RunDirLock

STEPS_PER_EPOCH = 4  # 18 training images (6 per class), batch 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """3 colour classes of textured images (so crops, RandAugment and erasing all matter)."""
    root = tmp_path_factory.mktemp("ft-resume")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for name, rgb in {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 40, (40, 48, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return {"train": root / "train", "val": root / "val"}


def job(out: Path, checkpoint: Path, folders: dict, *extra: str, epochs: int = 2, workers: int = 0) -> list[str]:
    """The job script's command: the same line every time it is (re)submitted. Augmentation on
    (RandAugment, random erasing 0.25), mixup/cutmix on, drop path 0.1 (the recipe's defaults)."""
    return ["finetune", "--no-progress", "--checkpoint", str(checkpoint), "--data", str(folders["train"]),
            "--val-data", str(folders["val"]), "--out", str(out), "--resume", "auto", "--batch-size", "4",
            "--epochs", str(epochs), "--warmup-epochs", "1", "--workers", str(workers), "--save-every", "1",
            "--keep-last", "0", "--device", "cpu", *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("ummae: warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ummae", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def assert_same_run(reference: Path, resumed: Path, from_step: int) -> None:
    """Same epoch records (train loss, lr, validation) bit for bit, and the same weights after every
    step from `from_step` on and at the end (optimizer state included)."""
    assert records(resumed) == records(reference)
    steps = [int(p.stem[5:]) for p in list_step_checkpoints(reference)]
    assert steps and steps[-1] == records(reference)[-1]["step"]
    for step in [s for s in steps if s >= from_step]:
        a, b = load_checkpoint(step_checkpoint_path(reference, step)), load_checkpoint(step_checkpoint_path(resumed, step))
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (step, key)
    final_a, final_b = load_checkpoint(step_checkpoint_path(reference, steps[-1])), load_checkpoint(
        step_checkpoint_path(resumed, steps[-1]))
    for i, state in final_a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, final_b["optimizer"]["state"][i][name]), (i, name)
    for name in ("last.pt", "best.pt"):
        a, b = torch.load(reference / name, weights_only=True), torch.load(resumed / name, weights_only=True)
        assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items()), name


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("mixing, workers", [("mixup", 0), ("mixup", 2), ("recursive_mix", 0)])
def test_a_run_killed_with_sigkill_resumes_bit_identically(tmp_path, checkpoints, folders, mixing, workers,
                                                           monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the in-process runs on the victim's thread count (bits depend on it)
    extra = ("--recursive-mix",) if mixing == "recursive_mix" else ()
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    command = lambda out: job(out, checkpoints["swin"], folders, *extra, workers=workers)  # noqa: E731
    victim = _start(command(killed_dir))
    reference = run_cli_captured(command(reference_dir), reference_dir)
    assert reference.code == 0, reference.err
    sigkill_after_checkpoints(victim, killed_dir, 2)
    kept = list_step_checkpoints(killed_dir)
    resumed_at = int(kept[-1].stem[5:])
    assert 2 <= resumed_at < 2 * STEPS_PER_EPOCH, "killed mid-run"

    resumed = run_cli_captured(command(killed_dir), killed_dir)  # the same command
    assert resumed.code == 0, resumed.err
    assert f"resuming at step {resumed_at} of {2 * STEPS_PER_EPOCH}" in resumed.out
    assert_same_run(reference_dir, killed_dir, resumed_at)
    # negative control: the augmented, mixed stream really changes the weights at every step
    first, second = (load_checkpoint(step_checkpoint_path(reference_dir, s))["model"] for s in (1, 2))
    assert not all(torch.equal(v, second[k]) for k, v in first.items())
    if mixing == "recursive_mix":  # the history a resumed run needs is in the checkpoint
        assert load_checkpoint(kept[-1])["ranks"][0]["rmix"]["images"].shape[0] == 4


def test_sigterm_checkpoints_at_the_step_boundary_and_the_same_command_continues(tmp_path, checkpoints, folders):
    epochs = 6
    command = lambda out: job(out, checkpoints["swin"], folders, "--save-every", "0", "--workers", "1",  # noqa: E731
                              epochs=epochs)
    reference_dir, out = tmp_path / "reference", tmp_path / "run"
    victim = _start(command(out))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGTERM)  # the whole process group, DataLoader workers included
    _, err = victim.communicate(timeout=240)
    assert victim.returncode == 143, err
    line = one_error_line(err)
    assert "stopped by SIGTERM at step" in line and "--resume auto" in line
    stopped_at = int(line.split("at step ")[1].split(";")[0])
    assert STEPS_PER_EPOCH <= stopped_at < epochs * STEPS_PER_EPOCH
    assert load_checkpoint(step_checkpoint_path(out, stopped_at))["step"] == stopped_at
    with pytest.raises(ProcessLookupError):
        os.killpg(victim.pid, 0)  # no process of the run (workers included) is left

    resumed = run_cli_captured(command(out), out)
    assert resumed.code == 0, resumed.err
    reference = run_cli_captured(command(reference_dir), reference_dir)
    assert reference.code == 0, reference.err
    assert records(out) == records(reference_dir)
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(d / name, weights_only=True)["model"] for d in (reference_dir, out))
        assert all(torch.equal(v, b[k]) for k, v in a.items()), name


# ---------------------------------------------------------------- the requeue pattern


@pytest.fixture(scope="module")
def finished(tmp_path_factory, checkpoints, folders) -> Path:
    out = tmp_path_factory.mktemp("ft-requeue") / "run"
    result = run_cli_captured(job(out, checkpoints["swin"], folders, "--no-augment", "--save-every", "0"), out)
    assert result.code == 0, result.err  # --resume auto with nothing to resume: a fresh start
    assert [r["step"] for r in records(out)] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_finished_run_submitted_again_does_nothing_and_says_so(finished, tmp_path, checkpoints, folders):
    out = _copy(finished, tmp_path / "again")
    before = (out / "last.pt").read_bytes()
    result = run_cli_captured(job(out, checkpoints["swin"], folders, "--no-augment", "--save-every", "0"), out)
    assert result.code == 0, result.err
    assert "already finished" in result.out and "resumed from" in result.out
    assert (out / "last.pt").read_bytes() == before and records(out) == records(finished)


def test_extending_a_finished_run_continues_it(finished, tmp_path, checkpoints, folders):
    out = _copy(finished, tmp_path / "extended")
    result = run_cli_captured(job(out, checkpoints["swin"], folders, "--no-augment", "--save-every", "0",
                                  epochs=3), out)
    assert result.code == 0, result.err
    assert "resuming at step 8 of 12" in result.out
    assert [r["epoch"] for r in records(out)] == [1, 2, 3] and records(out)[:2] == records(finished)
    assert load_checkpoint(list_step_checkpoints(out)[-1])["step"] == 12


def test_a_changed_configuration_is_refused_naming_the_keys(finished, tmp_path, checkpoints, folders):
    out = _copy(finished, tmp_path / "changed")
    result = run_cli_captured(job(out, checkpoints["swin"], folders, "--no-augment", "--save-every", "0",
                                  "--blr", "1e-3", "--smoothing", "0.2"), out)
    assert result.code == 2
    line = one_error_line(result.err)
    assert "blr (0.0005 -> 0.001)" in line and "smoothing (0.1 -> 0.2)" in line
    assert records(out) == records(finished)
    # negative control: only resumable options changed
    ok = run_cli_captured(job(out, checkpoints["swin"], folders, "--no-augment", "--save-every", "3",
                              "--keep-last", "2", "--log-every", "7", "--workers", "1"), out)
    assert ok.code == 0, ok.err


def test_a_fresh_run_into_a_directory_holding_a_run_is_refused(finished, tmp_path, checkpoints, folders):
    out = _copy(finished, tmp_path / "occupied")
    fresh = [a for a in job(out, checkpoints["swin"], folders, "--no-augment") if a not in ("--resume", "auto")]
    result = run_cli_captured(fresh, out)
    assert result.code == 2 and "--resume auto" in one_error_line(result.err)
    assert records(out) == records(finished)


# ---------------------------------------------------------------- one run per directory, leftovers, paths


def test_a_second_run_into_a_directory_in_use_fails_at_once(tmp_path, checkpoints, folders):
    out = tmp_path / "busy"
    out.mkdir()
    args = job(out, checkpoints["swin"], folders, "--no-augment", "--max-steps", "1")
    with RunDirLock(out):  # another process's run
        result = run_cli_captured(args, out)
    assert result.code == 2
    assert "in use by another ummae run" in one_error_line(result.err) and f"pid {os.getpid()}" in result.err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert run_cli_captured(args, out).code == 0  # negative control: free again


def test_temporary_files_of_a_killed_run_are_removed_on_the_next_start(tmp_path, checkpoints, folders):
    out = tmp_path / "killed"
    (out / "checkpoints").mkdir(parents=True)
    orphans = [out / "checkpoints" / ".step-00000002.pt.x1y2.tmp", out / ".last.pt.abc.tmp", out / ".best.pt.d.tmp"]
    for path in orphans:
        path.write_bytes(b"half a checkpoint")
    result = run_cli_captured(job(out, checkpoints["swin"], folders, "--no-augment", "--max-steps", "1"), out)
    assert result.code == 0, result.err
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()


def test_paths_are_stored_absolute_so_resume_works_from_anywhere(tmp_path, checkpoints, folders, monkeypatch):
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(folders["train"], work / "train")
    shutil.copy(checkpoints["swin"], work / "encoder.pt")
    monkeypatch.chdir(work)
    result = run_cli_captured(["finetune", "--no-progress", "--checkpoint", "encoder.pt", "--data", "train",
                               "--val-fraction", "0.34", "--out", "run", "--batch-size", "4", "--no-augment",
                               "--workers", "0", "--max-steps", "2", "--save-every", "1"], work / "run")
    assert result.code == 0, result.err
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())["finetune"]
    assert (saved["checkpoint"], saved["data"], saved["out"]) == (
        str(work / "encoder.pt"), str(work / "train"), str(work / "run"))
    assert load_checkpoint(step_checkpoint_path(work / "run", 1))["finetune"]["data"] == str(work / "train")

    monkeypatch.chdir(elsewhere)  # the bare resume: the checkpoint's settings, its run directory
    again = run_cli_captured(["finetune", "--no-progress", "--resume", str(step_checkpoint_path(work / "run", 1)),
                              "--max-steps", "3", "--workers", "0"], work / "run")
    assert again.code == 0, again.err
    assert "resuming at step 1 of 3" in again.out
    assert load_checkpoint(list_step_checkpoints(work / "run")[-1])["step"] == 3
    assert not (elsewhere / "run").exists()


# ---------------------------------------------------------------- non-finite numbers


def test_an_lr_that_breaks_the_run_never_reaches_a_checkpoint(tmp_path, checkpoints, folders):
    out = tmp_path / "huge-lr"
    result = run_cli_captured(job(out, checkpoints["swin"], folders, "--no-augment", "--mixup", "0", "--cutmix", "0",
                                  "--blr", "1e12", "--epochs", "3"), out)
    assert result.code == 2, result.err
    line = one_error_line(result.err)
    assert "non-finite" in line or "loss became" in line
    assert "nothing non-finite was written" in line and "try a lower --blr" in line
    saved = list_step_checkpoints(out)
    for path in saved:
        state = load_checkpoint(path)
        assert state_is_finite(state["model"], state["optimizer"]), path
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            assert state_is_finite(torch.load(out / name, weights_only=True)["model"]), name


# ---------------------------------------------------------------- two processes (DDP)


def test_two_gloo_processes_stopped_by_sigterm_resume_bit_identically(tmp_path, checkpoints, folders):
    """The guarantee under torchrun: SIGTERM to the launcher (a scheduler's preemption) makes both
    ranks checkpoint at the same step boundary; the same command then replays the uninterrupted
    2-process run exactly (records, weights after every step, optimizer, last/best)."""
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "ummae", *job(out, checkpoints["swin"], folders, epochs=3)]

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen(command(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    reference_dir, out = tmp_path / "reference", tmp_path / "run"
    reference, victim = start(reference_dir), start(out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        if len(list((out / "checkpoints").glob("step-*.pt"))) >= 2:
            break
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGTERM)
    _, err = victim.communicate(timeout=240)
    lines = [line for line in err.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(lines) == 2, err[-3000:]  # both ranks, one line each
    stopped_at = int(lines[0].split("at step ")[1].split(";")[0])
    assert load_checkpoint(step_checkpoint_path(out, stopped_at))["world_size"] == 2
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]
    total = records(reference_dir)[-1]["step"]
    assert 2 <= stopped_at < total, "stopped mid-run"

    resumed = start(out)  # the same command
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_run(reference_dir, out, stopped_at)
