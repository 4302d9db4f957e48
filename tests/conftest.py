"""Session-wide fixtures; the tiny-run helpers themselves live in `tiny.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import (TINY_BATCH, TINY_MODELS, TINY_SETS, TINY_STEPS, CliResult,  # noqa: F401
                  run_cli_captured, tiny_checkpoint, tiny_pretrain_args)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine run many times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_args():
    """`tiny_args(out, *extra)` -> the argument list of a tiny `ummae pretrain` run."""
    return tiny_pretrain_args


@pytest.fixture(scope="session")
def tiny_sets() -> list[str]:
    return list(TINY_SETS)


@pytest.fixture
def tiny_config():
    """The resolved tiny configuration (what the tiny CLI runs use), built fresh per test."""
    from ummae.resolve import resolve_config

    return resolve_config(sets=list(TINY_SETS),
                          flags={"train.batch_size": TINY_BATCH, "train.max_steps": TINY_STEPS})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> CliResult:
    """One tiny run on the demo data (seed 0), shared by every test that only reads its outputs."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    result = run_cli_captured(tiny_pretrain_args(run_dir), run_dir)
    assert result.code == 0, result.err
    return result


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(args, run_dir)` -> `CliResult` (code, out, err, run_dir) of an in-process CLI call."""
    return run_cli_captured


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One-step pre-training checkpoints of tiny Swin, PVT and ViT backbones: {arch: path}."""
    root = tmp_path_factory.getbasetemp() / "finetune-checkpoints"
    root.mkdir(exist_ok=True)
    return {arch: tiny_checkpoint(root, arch) for arch in TINY_MODELS}
