"""`ummae knn`, `ummae linprobe`, `ummae visualize` end to end on a tiny checkpoint and image folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ummae.cli import main
from ummae.engine.checkpoint import load_checkpoint
from ummae.visualize import HEADER_HEIGHT, MIN_PANEL_WIDTH, PANEL_GAP, PANEL_TITLES

FAST = ["--workers", "0", "--no-progress"]
KNN_KEYS = {"command", "features", "checkpoint", "init_random", "seed", "arch", "method", "img_size", "num_train",
            "num_val", "num_classes", "classes", "feature_dim", "skipped_images", "temperature", "results"}
LINPROBE_KEYS = {"command", "features", "checkpoint", "init_random", "seed", "arch", "method", "img_size", "num_train",
                 "num_val", "num_classes", "classes", "feature_dim", "skipped_images", "epochs", "warmup_epochs", "blr", "lr",
                 "batch_size", "final_top1", "final_top5", "best_top1", "best_epoch", "history", "head"}


@pytest.fixture(scope="session")
def labeled(tmp_path_factory):
    """DIR/<class>/*.png: 3 classes that differ visibly (red, green, blue with dark stripes), 5 each."""
    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 190, 40), "striped_blue": (40, 40, 200)}
    for name, colour in colours.items():
        (root / name).mkdir()
        for i in range(5):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255)
            if name.startswith("striped"):
                pixels[::8] *= 0.2  # a dark horizontal line every 8 rows
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def checkpoint(tiny_run):
    return str(tiny_run.run_dir / "checkpoint.pt")


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(f"ummae {command}: error:")
    return lines[0]


# ------------------------------------------------------------------------------- knn

def test_knn_prints_accuracy_for_every_k_and_writes_json(checkpoint, labeled, tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = main(["knn", "--checkpoint", checkpoint, "--data", str(labeled), "--k", "1", "3", "--json",
                 str(out), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "12 train / 3 val images, 3 classes" in captured.out
    assert captured.out.count("top-1") == 2
    record = json.loads(out.read_text())
    assert set(record) == KNN_KEYS
    assert record["command"] == "knn" and record["init_random"] is False and record["arch"] == "swin"
    assert record["features"] == "pretrained"
    assert record["classes"] == ["green", "red", "striped_blue"] and record["temperature"] == 0.07
    assert [r["k"] for r in record["results"]] == [1, 3]
    for r in record["results"]:
        assert 0.0 <= r["top1"] <= 100.0 and r["top5"] is None  # 3 classes: no top-5
        assert f"{r['top1']:6.2f}%" in captured.out


def test_knn_and_linprobe_progress_writes_no_carriage_returns_into_a_log(checkpoint, labeled, capsys):
    """Not a terminal (captured): plain lines or nothing, never tqdm's redrawn bar (engine.progress)."""
    for command in (["knn", "--k", "1"], ["linprobe", "--epochs", "1"]):
        code = main([*command, "--checkpoint", checkpoint, "--data", str(labeled), "--workers", "0"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "\r" not in captured.err + captured.out, command


def test_knn_init_random_baseline_with_a_separate_val_folder(checkpoint, labeled, tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = main(["knn", "--checkpoint", checkpoint, "--data", str(labeled), "--val-data", str(labeled),
                 "--init-random", "--seed", "3", "--k", "1", "--json", str(out), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random init, seed 3" in captured.out
    record = json.loads(out.read_text())
    assert record["init_random"] is True and record["num_train"] == 15 and record["num_val"] == 15
    assert record["features"] == "random_init"
    # Every validation image is also a training image: at similarity 1, it is its own nearest neighbour.
    assert record["results"][0]["top1"] == 100.0


# ------------------------------------------------------------------------------- linprobe

def test_linprobe_reports_every_epoch_saves_the_head_and_writes_json(checkpoint, labeled, tmp_path, capsys):
    out, js = tmp_path / "probe", tmp_path / "probe.json"
    code = main(["linprobe", "--checkpoint", checkpoint, "--data", str(labeled), "--epochs", "4",
                 "--warmup-epochs", "1", "--batch-size", "8", "--out", str(out), "--json", str(js), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [line.split()[1] for line in captured.out.splitlines() if line.strip().startswith("epoch")] == \
        ["1/4", "2/4", "3/4", "4/4"]
    assert "best top-1" in captured.out
    record = json.loads(js.read_text())
    assert set(record) == LINPROBE_KEYS
    assert record["lr"] == pytest.approx(0.1 * 8 / 256) and record["batch_size"] == 8
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
    assert record["best_top1"] == max(h["top1"] for h in record["history"])
    assert record["final_top5"] is None and record["head"] == str(out / "linprobe_head.pt")
    head = load_checkpoint(out / "linprobe_head.pt")
    assert set(head["model"]) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
                                  "fc.weight", "fc.bias"}
    assert head["model"]["fc.weight"].shape == (3, record["feature_dim"])
    assert head["classes"] == record["classes"] and head["num_classes"] == 3


def test_linprobe_init_random(checkpoint, labeled, capsys):
    code = main(["linprobe", "--checkpoint", checkpoint, "--data", str(labeled), "--epochs", "1",
                 "--init-random", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random init, seed 0" in captured.out and "epoch 1/1" in captured.out


# ------------------------------------------------------------------------------- visualize

def test_visualize_draws_one_row_per_image_and_mask(checkpoint, labeled, tmp_path, capsys):
    images = [labeled / "red" / "0.png", labeled / "striped_blue" / "1.png"]
    out = tmp_path / "pictures" / "recon.png"
    code = main(["visualize", "--checkpoint", checkpoint, *map(str, images), "--masks", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out and "6 rows" in captured.out
    side = 64 * math.ceil(MIN_PANEL_WIDTH / 64)  # pre-training size 64, panels upscaled to >= 96 px
    width, height = Image.open(out).size
    assert width == len(PANEL_TITLES) * (side + PANEL_GAP) + PANEL_GAP
    assert height == HEADER_HEIGHT + 6 * (side + PANEL_GAP) + PANEL_GAP
    # Same seed, same picture; the three draws of one image differ from each other.
    again = tmp_path / "again.png"
    assert main(["visualize", "--checkpoint", checkpoint, *map(str, images), "--out", str(again)]) == 0
    first, second = np.asarray(Image.open(out)), np.asarray(Image.open(again))
    assert np.array_equal(first, second)
    top = HEADER_HEIGHT + PANEL_GAP
    masked_column = slice(2 * PANEL_GAP + side, 2 * PANEL_GAP + 2 * side)
    rows = [first[top + r * (side + PANEL_GAP): top + r * (side + PANEL_GAP) + side, masked_column] for r in range(3)]
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[1], rows[2])


def test_visualize_format_follows_the_extension(checkpoint, labeled, tmp_path, capsys):
    image = str(labeled / "red" / "0.png")
    for name, magic in (("recon.jpg", b"\xff\xd8\xff"), ("recon.JPEG", b"\xff\xd8\xff"), ("recon.webp", b"RIFF")):
        assert main(["visualize", "--checkpoint", checkpoint, image, "--masks", "1", "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes()[:len(magic)] == magic, name
    capsys.readouterr()
    out = tmp_path / "recon.txt"  # negative control: not a picture format
    code = main(["visualize", "--checkpoint", checkpoint, image, "--out", str(out)])
    line = one_line_error(capsys.readouterr().err, "visualize")
    assert code == 2 and "recon.txt" in line and ".jpg" in line and not out.exists()


# ------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("command", ["knn", "linprobe", "visualize"])
def test_missing_checkpoint_is_a_one_line_error(command, labeled, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    args = [command, "--checkpoint", str(missing)]
    if command == "visualize":
        args += [str(labeled / "red" / "0.png"), "--out", str(tmp_path / "x.png")]
    else:
        args += ["--data", str(labeled), *FAST]
    code = main(args)
    line = one_line_error(capsys.readouterr().err, command)
    assert code == 2 and str(missing) in line


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_missing_data_folder_is_a_one_line_error(command, checkpoint, tmp_path, capsys):
    code = main([command, "--checkpoint", checkpoint, "--data", str(tmp_path / "nothing"), *FAST])
    line = one_line_error(capsys.readouterr().err, command)
    assert code == 2 and "nothing" in line


def test_bad_k_is_refused_before_any_work(checkpoint, labeled, capsys):
    code = main(["knn", "--checkpoint", checkpoint, "--data", str(labeled), "--k", "0", *FAST])
    assert code == 2 and "--k" in one_line_error(capsys.readouterr().err, "knn")


@pytest.mark.parametrize("command", ["knn", "linprobe", "visualize"])
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_knn_linprobe_and_visualize_on_a_hiera_checkpoint(checkpoints, labeled, tmp_path, capsys):
    ckpt = str(checkpoints["hiera"])
    js = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", ckpt, "--data", str(labeled), "--k", "1", "--json", str(js), *FAST]) == 0
    record = json.loads(js.read_text())
    assert record["arch"] == "hiera" and record["method"] == "mae" and record["feature_dim"] == 64
    js = tmp_path / "probe.json"
    assert main(["linprobe", "--checkpoint", ckpt, "--data", str(labeled), "--epochs", "2", "--json", str(js),
                 *FAST]) == 0
    assert [h["epoch"] for h in json.loads(js.read_text())["history"]] == [1, 2]
    out = tmp_path / "recon.png"
    code = main(["visualize", "--checkpoint", ckpt, str(labeled / "red" / "0.png"), "--masks", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 rows" in captured.out and Image.open(out).size[0] > 0
