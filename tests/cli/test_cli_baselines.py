"""`ummae knn` / `ummae linprobe` with `--raw-pixels` and with few labels (`--labels-per-class`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import ummae.data.labeled as labeled_module
from ummae.cli import main
from ummae.engine.checkpoint import load_checkpoint

FAST = ["--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """DIR/<class>/*.png: red, green and blue noisy squares, 5 of each (4 train / 1 val by default)."""
    root = tmp_path_factory.mktemp("baselines")
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 200)}.items():
        (root / name).mkdir()
        for i in range(5):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (16, 16, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def loads(monkeypatch):
    """Counts the images decoded by the labeled folders (each decode is one call of `load_rgb`)."""
    calls = []
    original = labeled_module.load_rgb

    def counting(path, *args, **kwargs):
        calls.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(labeled_module, "load_rgb", counting)
    return calls


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return str(tiny_run.run_dir / "checkpoint.pt")


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(f"ummae {command}: error:")
    return lines[0]


# ------------------------------------------------------------------------------- raw pixels

def test_knn_on_raw_pixels_needs_no_checkpoint(folder, tmp_path, capsys):
    js = tmp_path / "knn.json"
    code = main(["knn", "--raw-pixels", "--img-size", "8", "--data", str(folder), "--k", "1", "3",
                 "--json", str(js), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "raw pixels" in captured.out and "192-d features; 12 train / 3 val images" in captured.out
    record = json.loads(js.read_text())
    assert record["features"] == "raw_pixels" and record["feature_dim"] == 3 * 8 * 8
    assert record["checkpoint"] is None and record["arch"] is None and record["init_random"] is False
    assert [r["k"] for r in record["results"]] == [1, 3]
    assert record["results"][0]["top1"] == 100.0  # three plainly different colours: pixels suffice


def test_linprobe_on_raw_pixels_saves_a_head_that_says_so(folder, tmp_path, capsys):
    out, js = tmp_path / "probe", tmp_path / "probe.json"
    code = main(["linprobe", "--raw-pixels", "--img-size", "8", "--data", str(folder), "--epochs", "3",
                 "--batch-size", "4", "--out", str(out), "--json", str(js), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(js.read_text())
    assert record["features"] == "raw_pixels" and len(record["history"]) == 3 and record["batch_size"] == 4
    head = load_checkpoint(out / "linprobe_head.pt")
    assert head["features"] == "raw_pixels" and head["backbone_checkpoint"] is None
    assert head["model"]["fc.weight"].shape == (3, 192)


# ------------------------------------------------------------------------------- few labels

def test_knn_few_labels_reports_every_draw_and_their_range_from_one_feature_pass(folder, checkpoint, loads,
                                                                                  tmp_path, capsys):
    js = tmp_path / "few.json"
    code = main(["knn", "--checkpoint", checkpoint, "--data", str(folder), "--val-data", str(folder), "--k", "1",
                 "--labels-per-class", "2", "--draws", "3", "--json", str(js), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(loads) == 15 + 15  # every training and validation image decoded once, not once per draw
    record = json.loads(js.read_text())
    assert record["features"] == "pretrained" and record["num_train"] == 15
    assert record["labels_per_class"] == 2 and record["num_draws"] == 3 and record["num_train_per_draw"] == 6
    assert [d["draw"] for d in record["draws"]] == [0, 1, 2]
    assert all(d["num_train"] == 6 for d in record["draws"])
    top1 = [d["results"][0]["top1"] for d in record["draws"]]
    summary = record["results"][0]
    assert summary["k"] == 1 and summary["top1"] == pytest.approx(sum(top1) / 3)
    assert summary["top1_min"] == min(top1) and summary["top1_max"] == max(top1) and summary["top5"] is None
    assert captured.out.count("  draw ") == 3 and "mean" in captured.out and "few labels" in captured.out

    # The same seed gives the same draws; the draws are drawn again, not cached.
    again = tmp_path / "again.json"
    assert main(["knn", "--checkpoint", checkpoint, "--data", str(folder), "--val-data", str(folder), "--k", "1",
                 "--labels-per-class", "2", "--draws", "3", "--json", str(again), *FAST]) == 0
    assert json.loads(again.read_text())["draws"] == record["draws"]


def test_linprobe_few_labels_clips_the_batch_to_the_subset_and_summarizes_the_draws(folder, loads, tmp_path,
                                                                                     capsys):
    js = tmp_path / "few.json"
    code = main(["linprobe", "--raw-pixels", "--img-size", "8", "--data", str(folder), "--epochs", "2",
                 "--labels-per-class", "3", "--draws", "2", "--json", str(js), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(loads) == 15  # one pass over the 12 training and 3 validation images
    assert "--batch-size 256 clipped to the 9 training images" in captured.out
    record = json.loads(js.read_text())
    assert record["batch_size"] == 9 and record["lr"] == pytest.approx(0.1 * 9 / 256)
    assert [d["num_train"] for d in record["draws"]] == [9, 9]
    assert all(len(d["history"]) == 2 and d["batch_size"] == 9 for d in record["draws"])
    finals = [d["final_top1"] for d in record["draws"]]
    assert record["final_top1"] == pytest.approx(sum(finals) / 2)
    assert (record["final_top1_min"], record["final_top1_max"]) == (min(finals), max(finals))
    assert record["history"] is None and record["head"] is None and record["best_epoch"] is None


# ------------------------------------------------------------------------------- errors

ERRORS = [
    (["--checkpoint", "CKPT", "--raw-pixels", "--img-size", "8"], "exclude each other"),
    (["--raw-pixels"], "--raw-pixels needs --img-size"),
    ([], "give --checkpoint"),
    (["--raw-pixels", "--img-size", "8", "--init-random"], "exclude each other"),
    (["--raw-pixels", "--img-size", "8", "--draws", "3"], "--draws needs --labels-per-class"),
    (["--raw-pixels", "--img-size", "8", "--labels-per-class", "0"], "--labels-per-class must be >= 1"),
    (["--raw-pixels", "--img-size", "8", "--labels-per-class", "2", "--draws", "0"], "--draws must be >= 1"),
]


@pytest.mark.parametrize("command", ["knn", "linprobe"])
@pytest.mark.parametrize("args, message", ERRORS)
def test_bad_option_combinations_are_one_line_errors_before_any_image_is_read(command, args, message, folder,
                                                                               checkpoint, loads, capsys):
    args = [checkpoint if a == "CKPT" else a for a in args]
    code = main([command, *args, "--data", str(folder), *FAST])
    line = one_line_error(capsys.readouterr().err, command)
    assert code == 2 and message in line and loads == []


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_more_labels_per_class_than_the_smallest_class_has_is_refused_naming_it(command, folder, capsys):
    code = main([command, "--raw-pixels", "--img-size", "8", "--data", str(folder), "--labels-per-class", "5",
                 *FAST])
    line = one_line_error(capsys.readouterr().err, command)
    assert code == 2 and "5 labels per class" in line and "has only 4 training image" in line
    assert "'blue'" in line  # the first of the (equally) smallest classes


def test_linprobe_refuses_out_with_few_labels(folder, tmp_path, loads, capsys):
    code = main(["linprobe", "--raw-pixels", "--img-size", "8", "--data", str(folder), "--labels-per-class", "2",
                 "--out", str(tmp_path / "head"), *FAST])
    line = one_line_error(capsys.readouterr().err, "linprobe")
    assert code == 2 and "--out" in line and loads == [] and not (tmp_path / "head").exists()


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_help_mentions_the_baselines_and_few_labels(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for option in ("--raw-pixels", "--labels-per-class", "--draws"):
        assert option in text
