"""One rule for every output path of every command (issue #24, item 2).

Every command that writes, against every way an output can be unwritable (scripts/error_table.py
holds both lists and how each case is simulated): one line that names the option and the path,
exit status 2, and nothing left behind in the folder. The checks (`ummae.cli.checks`) come before
any work, so each case takes milliseconds, in-process.
"""

from __future__ import annotations

import errno
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from error_table import OUTPUT_CASES, WRITERS, make_sandbox, output_argv, run_case, simulated_disks  # noqa: E402

from ummae.cli.checks import check_output  # noqa: E402
from ummae.errors import UmmaeError  # noqa: E402


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    root = make_sandbox(tmp_path_factory.mktemp("outputs"))
    yield root
    (root / "denied").chmod(0o700)


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
@pytest.mark.parametrize("writer", WRITERS, ids=[f"{w[0]} {w[1]}" for w in WRITERS])
def test_an_unwritable_output_is_one_line_naming_option_and_path(sandbox, writer, case):
    command, option, *_ = writer
    out, argv = output_argv(writer, case)
    before = _files(sandbox)
    code, err = run_case(argv, sandbox)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"ummae {command}: error: {option}: ") and f"'{out}'" in lines[0], lines[0]
    assert case[2] in lines[0], lines[0]
    assert _files(sandbox) == before  # no probe, temporary file or half-made folder left


def test_the_simulated_disks_refuse_writes_and_only_there(tmp_path):
    """Negative control: the simulation really refuses (so the cases above test something) and a
    writable folder passes the same check."""
    root = make_sandbox(tmp_path / "s")
    with simulated_disks(root):
        with pytest.raises(OSError) as e:
            os.open(root / "ro" / "f", os.O_WRONLY | os.O_CREAT)
        assert e.value.errno == errno.EROFS
        fd = os.open(root / "full" / "f", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        os.close(fd)
        assert e.value.errno == errno.ENOSPC
        check_output("--out", str(root / "adir" / "x.json"), "file")  # passes
        check_output("--out", str(root / "new" / "deeper"), "dir")  # passes, creates nothing
        with pytest.raises(UmmaeError, match="no space left"):
            check_output("--out", str(root / "full" / "x.json"), "file")
    assert not (root / "new").exists()
    assert [p.name for p in (root / "full").iterdir()] == ["f"]  # the probe went away, f is mine


def test_a_disk_that_fills_while_shards_are_written_leaves_no_shard(tmp_path, monkeypatch):
    """The checks cannot foresee a disk filling mid-way: the writer itself removes what it wrote."""
    from ummae.cli import main

    data = tmp_path / "images"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(data / f"{i}.png")
    calls = {"n": 0}
    real = tarfile.TarFile.addfile

    def addfile(self, *args, **kwargs):  # the second shard's first member hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    out = tmp_path / "shards"
    assert main(["shards", "--data", str(data), "--out", str(out), "--shard-size", "1", "--no-progress"]) == 2
    assert calls["n"] == 2  # the first shard was written whole before the failure
    assert list(out.glob("*.tar")) == []
