"""Checkpoints: round trip, atomic replacement on a failed write, refusal of code and junk."""

from __future__ import annotations

import builtins
import io
import os
import pickle

import numpy as np
import pytest
import torch

import ummae.checkpoint_file as checkpoint_module
from ummae.engine.checkpoint import load_checkpoint, save_checkpoint
from ummae.errors import UmmaeError


def sample_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"encoder.w": torch.randn(4, 3, generator=g), "decoder.b": torch.arange(5),
                  "half": torch.randn(2, generator=g).to(torch.bfloat16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
        "step": 7,
        "epoch": 2,
        "config": {"train": {"out": None, "device": "cpu", "flag": True}, "model": {"depths": [1, 2]}},
    }


def assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------- round trip


def test_save_then_load_round_trips_tensors_and_plain_values(tmp_path):
    path = tmp_path / "sub" / "dir" / "ck.pt"  # parents are created
    state = sample_state()
    assert save_checkpoint(path, state) == path
    loaded = load_checkpoint(path)
    assert isinstance(loaded.pop("format_version"), int)
    assert_same(state, loaded)
    assert sorted(os.listdir(path.parent)) == ["ck.pt"]  # no temp file left behind


def test_saved_checkpoint_loads_with_plain_weights_only_torch_load(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", sample_state())
    raw = torch.load(path, weights_only=True)
    assert torch.equal(raw["model"]["encoder.w"], sample_state()["model"]["encoder.w"])


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_checkpoints_get_the_permissions_of_other_outputs(tmp_path, umask):
    """mkstemp's 0600 would hide checkpoints from teammates who may read everything else."""
    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "ck.pt", sample_state())
        save_checkpoint(path, sample_state())  # replaced atomically: the new file has them too
        other = tmp_path / "config.yaml"
        other.write_text("x: 1\n")
    finally:
        os.umask(previous)
    mode = path.stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == other.stat().st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "config.yaml"]  # no temporary file left


# ---------------------------------------------------------------- atomic write


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, sample_state())
    before = path.read_bytes()

    def disk_full_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full_save)
    with pytest.raises(UmmaeError) as info:
        save_checkpoint(path, {"model": {"w": torch.ones(10)}})
    monkeypatch.undo()

    message = str(info.value)
    assert str(path) in message and "No space left on device" in message
    assert len(message.splitlines()) == 1
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert_same(load_checkpoint(path), {"format_version": 1, **sample_state()})


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, sample_state())
    before = path.read_bytes()

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {}})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


class _DiskFullFile(io.FileIO):
    """A real file on a disk that fills up after `limit` bytes: writes then fail with ENOSPC."""

    limit = 4096

    def write(self, data):
        if self.tell() + len(memoryview(data).cast("B")) > self.limit:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_disk_filling_up_inside_torch_save_is_a_user_error(tmp_path, monkeypatch):
    """The disk fills up while torch.save itself is writing (the real failure, not a mock of
    torch.save): the previous checkpoint must survive and the error must be an `UmmaeError`
    naming the path (the CLI turns only those into one line instead of a traceback).

    torch's zip writer turns the OSError from `write` into a RuntimeError ("[enforce fail at
    inline_container.cc] unexpected pos ..."), which `save_checkpoint` re-raises unchanged.
    """
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    before = path.read_bytes()

    monkeypatch.setattr(checkpoint_module.os, "fdopen",
                        lambda fd, mode="r", *a, **k: io.BufferedWriter(_DiskFullFile(fd, "wb")))
    with pytest.raises(UmmaeError) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(64, 64)}})  # 16 KiB of weights
    monkeypatch.undo()
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


# ---------------------------------------------------------------- refusing code


class _RunsCode:
    """Unpickling this runs `code` (what a tampered checkpoint would do)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def _payload(marker) -> _RunsCode:
    return _RunsCode(f"open({str(marker)!r}, 'w').write('pwned')")


def test_the_malicious_payload_really_runs_code_when_unpickled(tmp_path):
    """Guard for the next test: its payload is live, so 'no marker' there means 'refused'."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps({"model": _payload(marker)}))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"model": {"w": torch.ones(2), "x": _payload(marker)}, "step": 1}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)
    with pytest.raises(UmmaeError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    assert not marker.exists()


# ---------------------------------------------------------------- not a checkpoint


def test_missing_file_is_a_user_error(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(UmmaeError, match="does not exist") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UmmaeError):
        load_checkpoint(tmp_path)


def _truncated_checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.randn(32, 32, generator=torch.Generator().manual_seed(0))}}, buf)
    data = buf.getvalue()
    return data[: len(data) // 2]


JUNK = {
    "zero bytes": b"",
    "random bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "text": b"hello world\n",
    "a single pickle STOP byte": b".",
    "truncated checkpoint": _truncated_checkpoint(),
}


@pytest.mark.parametrize("content", list(JUNK.values()), ids=list(JUNK))
def test_unreadable_file_is_a_user_error_naming_it(tmp_path, content):
    """Anything that is not a checkpoint must end in an `UmmaeError` naming the file.

    Today a zero-byte file raises IndexError (torch raises a message-less EOFError and the
    message formatting does `str(e).splitlines()[0]` on ''), and short junk such as b"." or
    b"hello world\\n" escapes from torch's weights-only unpickler as IndexError / KeyError.
    """
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(UmmaeError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("obj", [{"optimizer": {}, "step": 3}, [torch.ones(2)], torch.ones(2)],
                         ids=["dict without model", "list", "tensor"])
def test_torch_file_that_is_not_an_ummae_checkpoint_is_refused(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(UmmaeError, match="'model'") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
