"""The `ummae` command line: summary, user data folders, one-line errors, help and presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ummae.cli import main
from ummae.resolve import resolve_config
from ummae.models import build_pretrain_model
from ummae.presets import PRESETS

PRETRAIN_OPTIONS = ("--data", "--out", "--epochs", "--max-steps", "--batch-size", "--accum-steps",
                    "--seed", "--device", "--preset", "--config", "--set")


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def make_image_tree(root, n: int = 12, size=(96, 80)) -> list:
    """`n` noise images (PNG and JPEG, width x height = `size`) spread over nested folders."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        folder = root / f"class{i % 3}" / ("deeper" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- pretrain: success


def test_summary_names_the_run_directory_and_checkpoint(tiny_run):
    assert tiny_run.code == 0
    assert str(tiny_run.run_dir) in tiny_run.out
    assert str(tiny_run.run_dir / "checkpoint.pt") in tiny_run.out
    assert "3 steps" in tiny_run.out
    final = json.loads((tiny_run.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert f"final loss       {final:.4f}" in tiny_run.out
    assert "Traceback" not in tiny_run.err


def test_pretrain_on_a_folder_of_images(tmp_path, tiny_args, capsys):
    data = tmp_path / "images"
    make_image_tree(data)
    out = tmp_path / "run"
    code = main(tiny_args(out, "--data", str(data)))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["epoch"] for r in records] == [pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4), 1.0]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert resolve_config(config_file=out / "config.yaml").data.path == str(data)
    assert (out / "checkpoint.pt").is_file() and (out / "reconstructions.png").is_file()
    assert str(out) in captured.out


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_data_directory_without_images_is_a_one_line_error(tmp_path, tiny_args, capsys, kind):
    data = tmp_path / "data"
    if kind == "empty":
        (data / "sub").mkdir(parents=True)
        (data / "sub" / "notes.txt").write_text("no images here")
    code = main(tiny_args(tmp_path / "run", "--data", str(data)))
    captured = capsys.readouterr()
    assert code == 2
    line = one_line_error(captured.err)
    assert line.startswith("ummae pretrain: error:")
    assert str(data) in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- pretrain: bad values


BAD_VALUES = [
    (["--batch-size", "0"], ["--batch-size"]),
    (["--accum-steps", "0"], ["--accum-steps"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--max-steps", "-1"], ["--max-steps"]),
    (["--seed", "-3"], ["--seed"]),
    (["--preset", "nope"], ["--preset", "nope"]),
    (["--set", "nosuch.key=1"], ["nosuch", "--set"]),
    (["--set", "model.nosuch=1"], ["model.nosuch"]),
    (["--set", "train.epochs"], ["--set"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--config", "/nonexistent/dir/config.yaml"], ["--config", "/nonexistent/dir/config.yaml"]),
]


@pytest.mark.parametrize("extra, names", BAD_VALUES, ids=[" ".join(e) for e, _ in BAD_VALUES])
def test_bad_value_exits_2_with_one_line_naming_the_option(tmp_path, tiny_args, capsys, extra, names):
    out = tmp_path / "run"
    code = main(tiny_args(out, *extra))
    captured = capsys.readouterr()
    assert code == 2
    line = one_line_error(captured.err)
    assert line.startswith("ummae pretrain: error:")
    for name in names:
        assert name in line
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize("extra, option", [(["--batch-size", "four"], "--batch-size"),
                                           (["--epochs", "2.5"], "--epochs"),
                                           (["--frobnicate"], "--frobnicate")])
def test_argparse_errors_are_one_line_and_exit_2(tmp_path, tiny_args, capsys, extra, option):
    with pytest.raises(SystemExit) as info:
        main(tiny_args(tmp_path / "run", *extra))
    assert info.value.code == 2
    assert option in one_line_error(capsys.readouterr().err)


def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path, tiny_args, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(tiny_args(tmp_path / "run", "--device", "cuda:0"))
    assert code == 2
    assert "--device" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- help


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: ummae" in out
    assert "pretrain" in out and "presets" in out


def test_pretrain_help_mentions_every_named_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in PRETRAIN_OPTIONS + ("--no-progress",):
        assert option in out, option
    # ... and every option the parser has, so a new flag cannot ship undocumented.
    from ummae.cli import build_parser

    pretrain_parser = build_parser()._subparsers._group_actions[0].choices["pretrain"]
    for action in pretrain_parser._actions:
        for flag in action.option_strings:
            assert flag in out, flag
        if action.option_strings and action.help is not None:
            assert action.help.strip(), action.option_strings


def test_version(capsys):
    from ummae import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


# ---------------------------------------------------------------- presets


def test_presets_lists_every_preset_with_size_input_and_masking(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["preset", "method", "encoder", "params"]
    for name in PRESETS:
        cfg = resolve_config(preset=name)
        with torch.device("meta"):
            params = sum(p.numel() for p in build_pretrain_model(cfg).encoder.parameters())
        rows = [line for line in lines if line.startswith(name + " ")]
        assert len(rows) == 1, name
        row = rows[0]
        assert f"{params / 1e6:.1f}M" in row
        assert f"{cfg.data.img_size}px" in row
        assert row.split()[1] == cfg.method
        assert f"{cfg.masking.unit_size}px units" in row
        if cfg.method == "ummae":
            assert f"uniform 75% + SM {cfg.masking.secondary_ratio:g}" in row
        elif cfg.method == "emae":
            assert f"{cfg.emae.num_parts} disjoint {cfg.emae.parts} parts" in row
        else:
            assert f"random {cfg.masking.mask_ratio:.0%}" in row
        assert str(cfg.effective_batch) in row
        assert PRESETS[name][0] in out  # the description
    assert "27.5M" in out  # Swin-T
