"""Configuration errors are found before the run directory exists (#13 item 8): one line, exit 2,
nothing written. Pre-training builds the model on the meta device before creating the directory (the
encoders check image size, stride, unit and window arithmetic as they are built); fine-tuning runs a
batch-1 forward at the fine-tuning size. A Swin window that does not divide a stage's token grid is
not an error: the grid is padded to whole windows inside each block, so such a run trains."""

from __future__ import annotations

import pytest

from tiny import TINY_SETS, run_cli_captured

# (preset, --set items, what the line says): every one of these used to be, or could be, found late
PRETRAIN_CASES = [
    ("ummae_swin_demo", ["data.img_size=96"], "image size 96x96"),
    ("ummae_swin_demo", ["data.img_size=160"], "does not fit an encoder of stride 32"),
    ("ummae_pvt_demo", ["data.img_size=96"], "does not fit an encoder of stride 32"),
    ("emae_swin_demo", ["data.img_size=160"], "does not fit an encoder of stride 32"),
    ("mae_vit_demo", ["model.patch_size=8"], "stride 8"),
    ("ummae_vit_demo", ["masking.unit_size=32"], "mask unit 32"),
    ("mae_vit_demo", ["data.img_size=100"], "not divisible by masking.unit_size"),
    ("mae_hiera_demo", ["model.patch_size=8"], "hiera: masking.unit_size must be 8 x model.patch_size"),
    ("emae_hiera_demo", ["data.img_size=96"], "emae.num_parts 4 does not divide"),
]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("ummae: warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("preset, sets, expected", PRETRAIN_CASES)
def test_pretrain_configuration_errors_leave_no_run_directory(tmp_path, preset, sets, expected):
    out = tmp_path / "never"
    args = ["pretrain", "--no-progress", "--preset", preset, "--out", str(out), "--max-steps", "1", "--batch-size", "2",
            "--set", "data.demo_length=4", "--set", "data.num_workers=0"]
    for item in sets:
        args += ["--set", item]
    result = run_cli_captured(args, out)
    assert result.code == 2
    assert expected in _one_line(result.err)
    assert not out.exists()


def test_a_swin_window_that_does_not_divide_the_grid_trains(tmp_path):
    """Window 4 on the compact grid of a 96 px tiny Swin: stage grids 12 (3 windows) and 6 (padded
    to 8, two windows), not an error; and a run directory is made only for a run that trains."""
    out = tmp_path / "run"
    args = ["pretrain", "--no-progress", "--out", str(out), "--batch-size", "2", "--max-steps", "1"]
    for item in [*TINY_SETS, "data.img_size=96", "train.vis_images=0"]:
        args += ["--set", item]
    result = run_cli_captured(args, out)
    assert result.code == 0, result.err
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.parametrize("arch, size, expected", [
    ("vit", 36, "not divisible by the patch size 8"),
    ("hiera", 40, "pos_embed"),
])
def test_finetune_size_errors_leave_no_run_directory(tmp_path, checkpoints, arch, size, expected):
    from PIL import Image

    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 100, 50)).save(data / cls / f"{i}.png")
    out = tmp_path / "never"
    result = run_cli_captured(["finetune", "--no-progress", "--checkpoint", str(checkpoints[arch]), "--data", str(data),
                               "--val-fraction", "0.25", "--out", str(out), "--batch-size", "2", "--workers", "0",
                               "--img-size", str(size)], out)
    assert result.code == 2
    assert expected in _one_line(result.err)
    assert not out.exists()
