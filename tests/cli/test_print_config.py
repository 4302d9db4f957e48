"""Seeing the configuration before running it (issue #25, item 5): `ummae presets NAME` and
`--print-config` on `pretrain` and `finetune`; and `ummae presets | head` without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from ummae.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"

def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_presets_name_prints_the_whole_configuration_usable_as_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["presets", "ummae_pvt_demo"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)
    assert cfg["preset"] == "ummae_pvt_demo" and cfg["model"]["arch"].startswith("pvt")
    assert {"model", "masking", "data", "optim", "train"} <= set(cfg)
    # The printed text is a --config file that resolves to the same configuration.
    (tmp_path / "c.yaml").write_text(text)
    assert main(["pretrain", "--config", "c.yaml", "--print-config"]) == 0
    again = yaml.safe_load(capsys.readouterr().out)
    assert again["model"] == cfg["model"] and again["masking"] == cfg["masking"]
    assert _files(tmp_path) == [tmp_path / "c.yaml"]


def test_presets_unknown_name_is_one_line(capsys):
    assert main(["presets", "dmeo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset 'dmeo'" in err[0]


def test_pretrain_print_config_applies_every_layer_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 7\noptim:\n  weight_decay: 0.01\n")
    before = _files(tmp_path)
    code = main(["pretrain", "--preset", "mae_vit_demo", "--config", "c.yaml", "--set", "optim.weight_decay=0.2",
                 "--batch-size", "3", "--out", "would_be_here", "--print-config"])
    out = capsys.readouterr().out
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["preset"] == "mae_vit_demo" and cfg["model"]["arch"].startswith("vit")  # preset
    assert cfg["train"]["epochs"] == 7  # --config
    assert cfg["optim"]["weight_decay"] == 0.2  # --set wins over --config
    assert cfg["train"]["batch_size"] == 3  # the option
    assert cfg["train"]["out"].endswith("would_be_here")
    assert _files(tmp_path) == before  # no run folder, no runs/, no lock
    # --print-config still checks what it prints: a bad value is the usual one-line error.
    assert main(["pretrain", "--preset", "mae_vit_demo", "--set", "optim.blr=-1", "--print-config"]) == 2


def test_finetune_print_config_fills_the_recipe_and_creates_nothing(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "a").mkdir(parents=True)
    before = _files(tmp_path)
    code = main(["finetune", "--checkpoint", str(checkpoints["swin"]), "--data", "data", "--epochs", "3",
                 "--out", "ft", "--print-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    cfg = yaml.safe_load(captured.out)
    assert cfg["epochs"] == 3 and cfg["checkpoint"] == str(checkpoints["swin"])
    assert cfg["blr"] is not None and cfg["warmup_epochs"] is not None  # the recipe's defaults filled in
    assert _files(tmp_path) == before


def _into_a_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess:
    """Run `python ARGV` with stdout a pipe whose reader is gone before the child writes (the
    child needs a tenth of a second to start; the read end is closed at once): every write
    fails with EPIPE, deterministically, unlike `| head`, which races the writer."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    child.stdout.close()
    err = child.stderr.read().decode()
    child.wait(timeout=120)
    return subprocess.CompletedProcess(argv, child.returncode, "", err)


def test_presets_into_a_closed_pipe_is_quiet():
    """`ummae presets | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    done = _into_a_closed_pipe(["-m", "ummae", "presets"])
    assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 141  # 128 + SIGPIPE, as a shell reports it


def test_a_closed_pipe_does_break_a_plain_writer():
    """Negative control: the same pipe makes a plain print fail, so the test above tests something."""
    done = _into_a_closed_pipe(["-c", "print('x' * 100)"])
    assert "BrokenPipeError" in done.stderr
