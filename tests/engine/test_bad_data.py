"""Bad data and bad numbers on real tiny runs: odd image modes load, broken files are skipped
and reported (also across DataLoader workers), an empty or missing folder fails before anything
is written, and a non-finite loss is skipped or stops the run without touching good checkpoints."""

from __future__ import annotations

import gc
import math
import multiprocessing
from pathlib import Path

import pytest
import torch
from PIL import Image

import ummae.engine.loop as loop_module
import ummae.engine.pretrain as pretrain_module
from tiny import BAD, GOOD, TINY_BATCH, run_cli_captured, tiny_pretrain_args, write_bad_images, write_good_images
from ummae.data.sampling import EpochSampler
from ummae.engine.checkpoint import load_checkpoint, step_checkpoint_path

SEED = 0


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    write_good_images(root)
    write_bad_images(root)
    return root


@pytest.fixture(scope="module")
def all_bad_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allbad")
    write_bad_images(root)
    return root


def _modes_are_what_the_test_claims(root: Path) -> None:
    modes = {}
    for name in GOOD:
        with Image.open(root / name) as im:
            modes[name] = im.mode
    assert modes["gray.png"] == "L" and modes["cmyk.jpg"] == "CMYK" and modes["rgba.png"] == "RGBA"
    assert modes["palette_alpha.png"] == "P" and modes["sixteen_bit.png"].startswith("I")
    with Image.open(root / "large.jpg") as im:
        assert im.size == (3000, 2000)


def _steps_touching_every_file(num_files: int) -> int:
    """Optimizer steps (whole epochs, at least 2) after which every index has been drawn."""
    per_epoch = num_files // TINY_BATCH
    sampler, seen, epoch = EpochSampler(num_files, SEED), set(), 0
    while epoch < 2 or len(seen) < num_files:
        sampler.set_epoch(epoch)
        seen |= {i for _, i in list(sampler)[: per_epoch * TINY_BATCH]}
        epoch += 1
        assert epoch < 50
    return epoch * per_epoch


def _error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.strip()]


# ---------------------------------------------------------------- bad files are skipped and reported


@pytest.mark.parametrize("workers", [2, 0])
def test_bad_files_are_skipped_counted_and_reported(mixed_data, tmp_path, workers):
    _modes_are_what_the_test_claims(mixed_data)
    steps = _steps_touching_every_file(len(GOOD) + len(BAD))
    out = tmp_path / "run"
    result = run_cli_captured(tiny_pretrain_args(out, "--data", str(mixed_data), "--seed", str(SEED),
                                                 "--set", f"data.num_workers={workers}",
                                                 "--max-steps", str(steps)), out)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    assert f"{steps} steps" in result.out
    listed = {Path(line).resolve() for line in (out / "skipped_images.txt").read_text().splitlines()}
    assert listed == {(mixed_data / name).resolve() for name in BAD}
    assert "4 unreadable image(s)" in result.out
    assert str(out / "skipped_images.txt") in result.out
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == steps
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ---------------------------------------------------------------- errors before anything starts


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_empty_or_missing_data_directory_fails_before_the_run_directory_exists(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    out = tmp_path / "run"
    result = run_cli_captured(tiny_pretrain_args(out, "--data", str(data)), out)
    assert result.code == 2
    lines = _error_lines(result.err)
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    assert lines[0].startswith("ummae pretrain: error:") and str(data) in lines[0]
    assert not out.exists()
    assert result.out == ""


def _run_on_all_bad(data: Path, out: Path, workers: int):
    return run_cli_captured(tiny_pretrain_args(out, "--data", str(data), "--batch-size", "2",
                                               "--set", f"data.num_workers={workers}"), out)


@pytest.fixture(scope="module")
def all_bad_run_with_workers(all_bad_data, tmp_path_factory):
    """One failing run with 2 DataLoader workers, and the worker processes still alive after it."""
    before = set(multiprocessing.active_children())
    result = _run_on_all_bad(all_bad_data, tmp_path_factory.mktemp("allbad_run") / "run", workers=2)
    left = [p.pid for p in set(multiprocessing.active_children()) - before]
    gc.collect()  # reap whatever the run left behind here, not in some later test
    return result, left


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_of_only_bad_images_is_a_one_line_error(all_bad_data, tmp_path, request, workers):
    if workers:
        result, _ = request.getfixturevalue("all_bad_run_with_workers")
    else:
        result = _run_on_all_bad(all_bad_data, tmp_path / "run", workers=0)
    assert result.code == 2
    assert "Traceback" not in result.err
    lines = _error_lines(result.err)
    assert len(lines) == 1, result.err
    assert lines[0].startswith("ummae pretrain: error:")
    assert "could be read" in lines[0] and str(all_bad_data) in lines[0]
    assert not (result.run_dir / "checkpoint.pt").exists()


def test_a_failed_run_leaves_no_dataloader_worker_processes(all_bad_run_with_workers):
    """A run that fails inside the loop must shut its DataLoader workers down before returning;
    left to the garbage collector, the shutdown stalls for ~5 s per worker."""
    _, left = all_bad_run_with_workers
    assert left == [], f"worker processes {left} still alive after pretrain() returned"


# ---------------------------------------------------------------- non-finite loss


def _nan_at_forward_call(monkeypatch, bad_call: int) -> None:
    """Make the model's loss NaN at exactly forward call `bad_call` (1-based; one call per step)."""
    real = pretrain_module.build_pretrain_model

    def poisoned_model(cfg):
        model = real(cfg)
        forward = model.forward
        calls = []

        def poisoned(imgs, *args, **kwargs):
            loss, pred, masks = forward(imgs, *args, **kwargs)
            calls.append(1)
            if len(calls) == bad_call:
                loss = loss * float("nan")
            return loss, pred, masks

        model.forward = poisoned
        return model

    monkeypatch.setattr(pretrain_module, "build_pretrain_model", poisoned_model)


def _all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return not (isinstance(obj, float) and not math.isfinite(obj))


def test_nonfinite_loss_with_skip_drops_that_step_and_finishes(tmp_path, monkeypatch):
    _nan_at_forward_call(monkeypatch, bad_call=2)
    out = tmp_path / "run"
    result = run_cli_captured(tiny_pretrain_args(out, "--max-steps", "4", "--set", "train.on_nonfinite=skip"), out)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    assert "skipped steps    1 with a non-finite loss" in result.out
    assert "4 steps" in result.out
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4
    assert _all_finite(state["model"]) and _all_finite(state["optimizer"])


def test_nonfinite_loss_stops_and_keeps_the_last_periodic_checkpoint(tmp_path, monkeypatch):
    saved: dict[Path, bytes] = {}
    real_save = loop_module.save_checkpoint  # what StepCheckpoints writes with

    def recording_save(path, state):
        written = real_save(path, state)
        saved[Path(written)] = Path(written).read_bytes()
        return written

    monkeypatch.setattr(loop_module, "save_checkpoint", recording_save)
    _nan_at_forward_call(monkeypatch, bad_call=3)
    out = tmp_path / "run"
    result = run_cli_captured(tiny_pretrain_args(out, "--max-steps", "4", "--save-every", "1"), out)
    assert result.code == 2
    lines = _error_lines(result.err)
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    assert "step 3" in lines[0] and "nan" in lines[0].lower()

    last_good = step_checkpoint_path(out, 2)
    assert sorted(saved) == [step_checkpoint_path(out, 1), last_good]
    for path, content in saved.items():
        assert path.read_bytes() == content, path  # byte-identical after the failure
    state = load_checkpoint(last_good)
    assert state["step"] == 2
    assert _all_finite(state["model"]) and _all_finite(state["optimizer"])
    assert not (out / "checkpoint.pt").exists()
    assert not step_checkpoint_path(out, 3).exists()
