"""The smaller consistency rules of #13 item 12: `--max-steps` caps `--epochs` (it never extends a
run), and one spelling per option across commands (`--workers`; `--num-workers` is a hidden alias)."""

from __future__ import annotations

import pytest
import yaml

from tiny import TINY_BATCH, run_cli_captured, tiny_pretrain_args
from ummae.cli import build_parser
from ummae.engine.checkpoint import load_checkpoint

COMMANDS_WITH_WORKERS = ("pretrain", "finetune", "knn", "linprobe")


def _subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("max_steps, expected", [(10, 2), (1, 1)])
def test_max_steps_caps_the_epochs_and_never_extends_them(tmp_path, max_steps, expected):
    # demo_length 8 at batch 4: one epoch is 2 optimizer steps.
    out = tmp_path / "run"
    result = run_cli_captured(tiny_pretrain_args(out, "--epochs", "1", "--max-steps", str(max_steps)), out)
    assert result.code == 0, result.err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == expected
    assert f"{expected} steps" in result.out and TINY_BATCH == 4


@pytest.mark.parametrize("command", COMMANDS_WITH_WORKERS)
def test_every_command_spells_the_loader_processes_workers(command, capsys):
    parser = _subparser(command)
    required = {"pretrain": [], "finetune": ["--checkpoint", "c", "--data", "d"],
                "knn": ["--checkpoint", "c", "--data", "d"], "linprobe": ["--checkpoint", "c", "--data", "d"]}[command]
    assert parser.parse_args([*required, "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = capsys.readouterr().out
    assert "--workers" in help_text and "--num-workers" not in help_text  # the alias is hidden
    if command != "pretrain":  # the old finetune spelling still works (pretrain never had it)
        assert parser.parse_args([*required, "--num-workers", "2"]).workers == 2
        assert parser.parse_args(required).workers is None  # the alias does not override the default (auto)


def test_pretrain_workers_sets_data_num_workers(tmp_path):
    out = tmp_path / "run"
    # tiny_pretrain_args sets data.num_workers=0 with --set; the flag wins, as every named flag does.
    result = run_cli_captured(tiny_pretrain_args(out, "--workers", "1", "--max-steps", "1"), out)
    assert result.code == 0, result.err
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["num_workers"] == 1
