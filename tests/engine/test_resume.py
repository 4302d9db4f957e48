"""Exact resume (also after SIGKILL), periodic checkpoints, --init-weights, architecture checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from tiny import TINY_HIERA_SETS, TINY_SETS, run_cli_captured, sigkill_after_checkpoints

STEPS = 8
# The tiny Swin (UM-MAE) and timm's Hiera (MAE, masked by Hiera itself).
MODELS = {"swin": (), "swinv2": ("--preset", "ummae_swinv2_demo"), "hiera": ("--preset", "mae_hiera_demo", *(a for s in TINY_HIERA_SETS for a in ("--set", s))),
          # EMAE: K parts per image drawn in the workers; its consistency term starts at epoch 1
          # (= step 5 of 8 here), so resuming before and after the switch is covered.
          "emae": ("--set", "method=emae", "--set", "emae.consistency_start_epoch=1"),
          # EMAE on timm's Hiera: random parts of its mask units, the same switch at epoch 1.
          "hiera_emae": ("--preset", "emae_hiera_demo", *(a for s in TINY_HIERA_SETS for a in ("--set", s)),
                         "--set", "emae.consistency_start_epoch=1")}


def run_args(out: Path, *extra: str, model: str = "swin") -> list[str]:
    args = ["pretrain", "--no-progress", "--out", str(out), "--batch-size", "2", "--max-steps", str(STEPS),
            "--save-every", "2", "--keep-last", "0"]
    for item in TINY_SETS:
        args += ["--set", item]
    return args + list(MODELS[model]) + list(extra)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "each step logged once, in order"
    return {r["step"]: r["loss"] for r in records}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("model", list(MODELS))
def test_resuming_from_any_checkpoint_replays_the_run_exactly(tmp_path, model):
    full = tmp_path / "full"
    assert run_cli_captured(run_args(full, model=model), full).code == 0
    reference = losses(full)
    assert sorted(reference) == list(range(1, STEPS + 1))

    for ckpt_step in (2, 4, 6):
        part = tmp_path / f"from{ckpt_step}"
        (part / "checkpoints").mkdir(parents=True)
        shutil.copy(full / "checkpoints" / f"step-{ckpt_step:08d}.pt", part / "checkpoints")
        # The metrics of the interrupted run up to its checkpoint, plus lines it wrote after.
        (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text())
        result = run_cli_captured(["pretrain", "--no-progress", "--out", str(part), "--resume", "auto"], part)
        assert result.code == 0, result.err
        assert "resumed from" in result.out
        assert losses(part) == reference  # bit-identical floats, and no duplicated steps
        for key, value in final_weights(full).items():
            assert torch.equal(value, final_weights(part)[key]), key


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # same arithmetic in every process of the comparison
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ummae", *args], env=_subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _cli(run_args(reference_dir))
    victim = _cli(run_args(killed_dir, "--set", "train.log_every=1"))
    # Kill it mid-run: after its second periodic checkpoint, between two later steps.
    sigkill_after_checkpoints(victim, killed_dir, 2)
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    assert not (killed_dir / "checkpoint.pt").exists(), "killed before the end"

    resumed = _cli(["pretrain", "--no-progress", "--out", str(killed_dir), "--resume", "auto"])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert losses(killed_dir) == losses(reference_dir)
    for key, value in final_weights(reference_dir).items():
        assert torch.equal(value, final_weights(killed_dir)[key]), key


def test_keep_last_prunes_periodic_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert run_cli_captured(run_args(out, "--save-every", "1", "--keep-last", "2"), out).code == 0
    names = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert names == [f"step-{STEPS - 1:08d}.pt", f"step-{STEPS:08d}.pt"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == STEPS
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"


def test_resume_auto_without_a_checkpoint_starts_afresh(tmp_path):
    out = tmp_path / "run"
    result = run_cli_captured(run_args(out, "--resume", "auto"), out)
    assert result.code == 0, result.err
    assert sorted(losses(out)) == list(range(1, STEPS + 1))


def test_resume_refuses_to_change_the_architecture(tmp_path):
    out = tmp_path / "run"
    assert run_cli_captured(run_args(out), out).code == 0
    result = run_cli_captured(["pretrain", "--out", str(out), "--resume", "auto",
                               "--set", "model.embed_dim=16"], out)
    assert result.code == 2
    assert "model.embed_dim" in result.err and "another architecture" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_resume_with_a_preset_is_refused(tmp_path):
    out = tmp_path / "run"
    assert run_cli_captured(run_args(out), out).code == 0
    result = run_cli_captured(["pretrain", "--out", str(out), "--resume", "auto", "--preset", "demo"], out)
    assert result.code == 2 and "--resume" in result.err


def test_resume_of_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_cli_captured(["pretrain", "--resume", str(tmp_path / "nope.pt")], tmp_path)
    assert result.code == 2 and "nope.pt" in result.err and "Traceback" not in result.err


def test_init_weights_starts_a_new_run_from_the_weights(tmp_path):
    first = tmp_path / "first"
    assert run_cli_captured(run_args(first), first).code == 0
    second = tmp_path / "second"
    result = run_cli_captured(run_args(second, "--init-weights", str(first / "checkpoint.pt")), second)
    assert result.code == 0, result.err
    scratch = losses(first)
    warm = losses(second)
    assert sorted(warm) == list(range(1, STEPS + 1)), "a new run counts its own steps"
    assert warm[1] < scratch[1], "the first loss benefits from the pre-trained weights"
    state = torch.load(second / "checkpoint.pt", weights_only=True)
    assert state["config"]["train"]["init_weights"] == str(first / "checkpoint.pt")


def test_init_weights_of_another_architecture_is_refused(tmp_path):
    first = tmp_path / "first"
    assert run_cli_captured(run_args(first), first).code == 0
    other = tmp_path / "other"
    result = run_cli_captured(run_args(other, "--init-weights", str(first / "checkpoint.pt"),
                                       "--set", "model.decoder_dim=32"), other)
    assert result.code == 2 and "another architecture" in result.err
    assert "Traceback" not in result.err
