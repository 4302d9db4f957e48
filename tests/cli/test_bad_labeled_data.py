"""One bad-file policy: `knn`, `linprobe`, `finetune` and `visualize` skip unreadable images, count
and name them as `pretrain` does, and fail in one line when nothing can be read or a folder has
only one class. The images are the mixed folder of tests/engine/test_bad_data.py (`tiny.GOOD`,
`tiny.BAD`), in two class folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import BAD, GOOD, run_cli_captured, write_bad_images, write_good_images


@pytest.fixture(scope="module")
def mixed_labeled(tmp_path_factory) -> Path:
    """DIR/mixed: every GOOD and BAD file; DIR/plain: the GOOD files only (18 files, 14 readable)."""
    root = tmp_path_factory.mktemp("mixed_labeled")
    for name in ("mixed", "plain"):
        (root / name).mkdir()
        write_good_images(root / name)
    write_bad_images(root / "mixed")
    return root


@pytest.fixture(scope="module")
def all_bad_labeled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("all_bad_labeled")
    for name in ("a", "b"):
        (root / name).mkdir()
        write_bad_images(root / name)
    return root


@pytest.fixture(scope="module")
def one_class(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one_class")
    (root / "only").mkdir()
    write_good_images(root / "only")
    return root


def _bad_files(root: Path) -> set[str]:
    return {str(root / "mixed" / name) for name in BAD}


def _warnings_are_single_lines(err: str) -> None:
    """Each skipped file is one `ummae: warning:` line; no source line of ummae is echoed."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("ummae: warning: skipping unreadable image") for line in lines), err
    assert "warnings.warn" not in err and "Traceback" not in err


def _one_line_error(result, command: str) -> str:
    errors = [line for line in result.err.splitlines() if line.strip() and "warning" not in line]
    assert result.code == 2 and len(errors) == 1, result.err
    assert errors[0].startswith(f"ummae {command}: error:") and "Traceback" not in result.err
    return errors[0]


def test_knn_skips_counts_and_names_unreadable_images(tiny_run, mixed_labeled, tmp_path):
    """A real process (pytest would capture the warnings): what the user sees on stderr."""
    out = tmp_path / "knn.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-m", "ummae", "knn", "--checkpoint",
                             str(tiny_run.run_dir / "checkpoint.pt"), "--data", str(mixed_labeled), "--k", "1",
                             "--workers", "0", "--no-progress", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    result.out, result.err = result.stdout, result.stderr
    record = json.loads(out.read_text())
    assert set(record["skipped_images"]) == _bad_files(mixed_labeled)
    assert record["num_train"] + record["num_val"] == 2 * len(GOOD)  # every readable image, once
    assert "skipped          4 unreadable image(s)" in result.out
    _warnings_are_single_lines(result.err)


def test_linprobe_with_workers_lists_unreadable_images_next_to_the_head(tiny_run, mixed_labeled, tmp_path):
    out = tmp_path / "probe"
    result = run_cli_captured(["linprobe", "--checkpoint", str(tiny_run.run_dir / "checkpoint.pt"), "--data",
                               str(mixed_labeled), "--epochs", "1", "--batch-size", "4", "--workers", "2",
                               "--no-progress", "--out", str(out)], tmp_path)
    assert result.code == 0, result.err
    listing = out / "skipped_images.txt"
    assert set(listing.read_text().splitlines()) == _bad_files(mixed_labeled)
    assert f"4 unreadable image(s), listed in {listing}" in result.out
    assert "Traceback" not in result.err


def test_finetune_replaces_unreadable_training_images_and_lists_them(checkpoints, mixed_labeled, tmp_path):
    out = tmp_path / "run"
    # 18 files, batch 6: one epoch draws every index, so every bad file is met.
    result = run_cli_captured(["finetune", "--checkpoint", str(checkpoints["swin"]), "--data", str(mixed_labeled),
                               "--val-data", str(mixed_labeled), "--epochs", "1", "--batch-size", "6",
                               "--num-workers", "0", "--no-progress", "--no-augment", "--out", str(out)], out)
    assert result.code == 0, result.err
    listing = out / "skipped_images.txt"
    assert set(listing.read_text().splitlines()) == _bad_files(mixed_labeled)
    assert f"4 unreadable image(s), listed in {listing}" in result.out
    assert "Traceback" not in result.err


@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune"])
def test_a_folder_where_nothing_can_be_read_is_a_one_line_error(command, checkpoints, all_bad_labeled, tmp_path):
    args = [command, "--checkpoint", str(checkpoints["swin"]), "--data", str(all_bad_labeled), "--no-progress"]
    if command == "finetune":
        args += ["--num-workers", "0", "--batch-size", "2", "--epochs", "1", "--out", str(tmp_path / "run")]
    else:
        args += ["--workers", "0"]
    line = _one_line_error(run_cli_captured(args, tmp_path), command)
    assert "could be read" in line


@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune"])
def test_a_folder_with_one_class_is_refused(command, checkpoints, one_class, tmp_path):
    args = [command, "--checkpoint", str(checkpoints["swin"]), "--data", str(one_class), "--no-progress"]
    args += ["--num-workers" if command == "finetune" else "--workers", "0"]
    if command == "finetune":
        args += ["--out", str(tmp_path / "run")]
    line = _one_line_error(run_cli_captured(args, tmp_path), command)
    assert "at least 2 class folders" in line and "'only'" in line
    assert not (tmp_path / "run").exists()


def test_visualize_skips_an_unreadable_image_and_names_it(tiny_run, mixed_labeled, tmp_path):
    good, bad = mixed_labeled / "mixed" / "rgb.jpg", mixed_labeled / "mixed" / "text.jpg"
    out = tmp_path / "recon.png"
    result = run_cli_captured(["visualize", "--checkpoint", str(tiny_run.run_dir / "checkpoint.pt"), str(good),
                               str(bad), "--masks", "2", "--out", str(out)], tmp_path)
    assert result.code == 0, result.err
    assert "1 image(s) x 2 mask(s) -> 2 rows" in result.out
    assert f"skipped          1 unreadable image(s): {bad}" in result.out
    assert "Traceback" not in result.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_visualize_with_no_readable_image_is_a_one_line_error(tiny_run, mixed_labeled, tmp_path):
    out = tmp_path / "recon.png"
    result = run_cli_captured(["visualize", "--checkpoint", str(tiny_run.run_dir / "checkpoint.pt"),
                               *(str(mixed_labeled / "mixed" / name) for name in BAD), "--out", str(out)], tmp_path)
    assert "none of the 4 image(s) could be read" in _one_line_error(result, "visualize")
    assert not out.exists()


def test_finetune_with_no_readable_validation_image_is_a_one_line_error(checkpoints, mixed_labeled, tmp_path):
    val = tmp_path / "val"
    for name in ("mixed", "plain"):  # the training classes, every file unreadable
        (val / name).mkdir(parents=True)
        write_bad_images(val / name)
    args = ["finetune", "--checkpoint", str(checkpoints["swin"]), "--data", str(mixed_labeled), "--val-data",
            str(val), "--epochs", "1", "--batch-size", "6", "--workers", "0", "--no-progress", "--no-augment",
            "--out", str(tmp_path / "run")]
    line = _one_line_error(run_cli_captured(args, tmp_path), "finetune")
    assert "none of the validation images could be read" in line and str(val) in line
