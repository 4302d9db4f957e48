"""FSDP2 (`--strategy fsdp`) on CPU with gloo: the same run as DDP, exact resume, resume across
strategy and world size, gradient checkpointing.

The reference is the one-process run with the same effective batch (the DDP code path; that two
DDP processes match it is tests/engine/test_distributed.py). Every FSDP run here is 2 processes
under torchrun, with gradient accumulation (no reduce on the first micro-batch) and clipping (the
global norm of the sharded gradients), so both of those are compared too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ummae.engine.sharding as sharding
from tiny import TINY_MODELS, TINY_SETS, run_cli_captured
from ummae.engine.checkpoint import list_step_checkpoints, step_checkpoint_path

STEPS = 6
_COMMON = [s for s in TINY_SETS if not s.startswith("model.")]


def args(out: Path, batch: int, arch: str = "swin", *extra: str) -> list[str]:
    """One step = 8 images: `batch` x 2 micro-batches x processes (8 demo crops: 1 step per epoch
    at 1 process and batch 4, or 2 processes and batch 2)."""
    preset, model_sets = TINY_MODELS[arch]
    cmd = ["pretrain", "--no-progress", "--preset", preset, "--out", str(out), "--batch-size", str(batch),
           "--accum-steps", "2", "--max-steps", str(STEPS), "--save-every", "2", "--keep-last", "0",
           "--device", "cpu", "--set", "optim.clip_grad=0.5"]
    for item in [*_COMMON, *model_sets]:
        cmd += ["--set", item]
    return cmd + list(extra)


def torchrun(cli_args: list[str], **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "ummae", *cli_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: torchrun starts its ranks in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_close_runs(a: Path, b: Path) -> None:
    """Losses within 1e-5 relative, final weights as close as test_distributed asks of DDP."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert math.isclose(la[step], lb[step], rel_tol=1e-5), (la, lb)
    wa, wb = state(a / "checkpoint.pt")["model"], state(b / "checkpoint.pt")["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=5e-5)


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    """The one-process reference and the 2-process FSDP run of the tiny Swin (UM-MAE)."""
    root = tmp_path_factory.mktemp("fsdp-swin")
    fsdp = torchrun(args(root / "fsdp", 2, "swin", "--strategy", "fsdp"))
    one = run_cli_captured(args(root / "one", 4, "swin"), root / "one")  # meanwhile, in this process
    assert one.code == 0, one.err
    out = finished(fsdp)
    assert "processes        2 (FSDP)" in out and out.count("ummae pretrain: done") == 1
    return root


def test_fsdp_trains_like_ddp_swin(swin):
    assert_close_runs(swin / "one", swin / "fsdp")
    saved = state(swin / "fsdp" / "checkpoint.pt")
    # the consolidated checkpoint has the DDP format: every other command reads it unchanged
    reference = state(swin / "one" / "checkpoint.pt")
    assert saved["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    assert saved["world_size"] == 2 and saved["config"]["train"]["strategy"] == "fsdp"


def test_fsdp_with_grad_checkpointing_trains_like_ddp_vit(tmp_path):
    """timm's ViT blocks (checkpointed by timm's checkpoint_seq) under FSDP, against the plain run."""
    fsdp = torchrun(args(tmp_path / "fsdp", 2, "vit", "--strategy", "fsdp", "--grad-checkpointing"))
    one = run_cli_captured(args(tmp_path / "one", 4, "vit"), tmp_path / "one")
    assert one.code == 0, one.err
    finished(fsdp)
    assert_close_runs(tmp_path / "one", tmp_path / "fsdp")


def test_a_fsdp_run_killed_with_sigkill_resumes_bit_identically(swin, tmp_path):
    out = tmp_path / "killed"
    victim = torchrun(args(out, 2, "swin", "--strategy", "fsdp", "--resume", "auto"))
    deadline = time.monotonic() + 240
    while not list((out / "checkpoints").glob("step-*")) and victim.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for pid in [victim.pid, *descendants(victim.pid)]:  # torchrun and both ranks (in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    victim.communicate()
    assert not (out / "checkpoint.pt").exists(), "killed before the end"
    finished(torchrun(args(out, 2, "swin", "--strategy", "fsdp", "--resume", "auto")))
    assert losses(out) == losses(swin / "fsdp")
    done, reference = state(out / "checkpoint.pt"), state(swin / "fsdp" / "checkpoint.pt")
    for key, value in reference["model"].items():
        assert torch.equal(value, done["model"][key]), key
    for index, moments in reference["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, done["optimizer"]["state"][index][name]), (index, name)


def _groups(state: dict) -> list[dict]:
    """The hyper-parameters (betas come back from a state dict as a list instead of a tuple)."""
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["optimizer"]["param_groups"]]


def _same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert _groups(a) == _groups(b)
    for index, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


def test_a_sharded_checkpoint_resumes_under_ddp_on_one_process_and_back(swin, tmp_path):
    """2 FSDP processes (a folder of shards) -> 1 DDP process -> 2 FSDP processes: the state
    (weights, AdamW moments, step) goes through sharding and back bit for bit. Each leg resumes
    a step-2 checkpoint with --max-steps 2 into a new directory, so its only work is to load the
    state and write it again (the consolidated checkpoint.pt)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    source = step_checkpoint_path(swin / "fsdp", 2, sharded=True)
    assert sorted(p.name for p in source.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    one = run_cli_captured(args(tmp_path / "one", 2, "swin", "--resume", str(source), "--max-steps", "2"),
                           tmp_path / "one")
    assert one.code == 0, one.err
    on_one = state(tmp_path / "one" / "checkpoint.pt")
    dcp_to_torch_save(source, tmp_path / "source.pt")  # torch's own reading of the shards
    for key, value in torch.load(tmp_path / "source.pt", weights_only=True)["model"].items():
        assert torch.equal(value, on_one["model"][key]), key
    finished(torchrun(args(tmp_path / "two", 2, "swin", "--strategy", "fsdp", "--resume",
                           str(tmp_path / "one" / "checkpoint.pt"), "--max-steps", "2")))
    _same_state(on_one, state(tmp_path / "two" / "checkpoint.pt"))
    assert list_step_checkpoints(tmp_path / "two") == [step_checkpoint_path(tmp_path / "two", 2, sharded=True)]


def test_a_killed_sharded_write_leaves_nothing_that_loads(swin, tmp_path):
    """A kill in the middle of writing the shards leaves `.step-N.dcp.tmp`: never listed, never
    resumed from, removed by the next run."""
    out = tmp_path / "run"
    shutil.copytree(swin / "fsdp" / "checkpoints", out / "checkpoints")
    half = out / "checkpoints" / ".step-00000008.dcp.tmp"
    shutil.copytree(step_checkpoint_path(swin / "fsdp", 6, sharded=True), half)
    (half / "__1_0.distcp").unlink()
    assert list_step_checkpoints(out)[-1].name == "step-00000006.dcp"
    result = run_cli_captured(args(out, 2, "swin", "--strategy", "fsdp", "--resume", "auto"), out)
    assert result.code == 0, result.err
    assert "already finished" in result.out and not half.exists()


# ---------------------------------------------------------------- one process, in this process

def one_process(out: Path, *extra: str) -> dict[int, float]:
    result = run_cli_captured(args(out, 4, "swin", "--strategy", "fsdp", *extra), out)
    assert result.code == 0, result.err
    return losses(out)


def test_grad_checkpointing_gives_the_same_losses_and_is_really_on(tmp_path, monkeypatch):
    plain = one_process(tmp_path / "plain")
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    checkpointed = one_process(tmp_path / "checkpointed", "--grad-checkpointing")
    assert calls, "the blocks were not checkpointed"  # the negative control of the equality below
    assert checkpointed == plain


def test_every_block_is_its_own_fsdp_unit():
    """Swin stages' blocks, the decoder's blocks: one unit each (plus the root)."""
    from ummae.models import build_pretrain_model
    from ummae.resolve import resolve_config

    preset, model_sets = TINY_MODELS["swin"]
    cfg = resolve_config(preset, None, [*_COMMON, *model_sets, "model.depths=[2,2]", "model.num_heads=[1,1]"], {})
    blocks = sharding.transformer_blocks(build_pretrain_model(cfg))
    assert [type(b).__name__ for b in blocks] == ["SwinBlock"] * 4 + ["Block"]


def test_fp16_with_fsdp_is_a_one_line_error(tmp_path):
    result = run_cli_captured(args(tmp_path / "x", 4, "swin", "--strategy", "fsdp", "--precision", "fp16"),
                              tmp_path / "x")
    assert result.code == 2 and "fp16" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "x").exists()
