"""`ummae shard-index`: writes the missing and stale index files of shards other tools wrote, says
so in one summary line, and fails in one line (exit 2, no traceback) on bad input."""

from __future__ import annotations

import errno
import io
import tarfile
from pathlib import Path

import pytest

from tiny import run_cli_captured
from ummae.data import TarShards, shard_index


def _other_tools_shards(root: Path, count: int = 3) -> Path:
    """`count` shards as Python's tarfile (or `tar`, WebDataset) writes them: no index files."""
    root.mkdir()
    for k in range(count):
        with tarfile.open(root / f"part-{k:05d}.tar", "w") as tar:
            for i in range(4):
                info = tarfile.TarInfo(f"{k:02d}{i:04d}.jpg")
                info.size = 10 + i
                tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    return root


def _index_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.ummae-index"))


def test_it_writes_what_is_missing_or_stale_and_says_so_in_one_line(tmp_path):
    shards = _other_tools_shards(tmp_path / "s")
    pattern = str(shards / "part-{00000..00002}.tar")
    first = run_cli_captured(["shard-index", "--data", pattern, "--no-progress"], tmp_path)
    assert first.code == 0 and first.err == "", first.err
    assert first.out == "ummae shard-index: 3 shard(s): wrote 3 index(es), 0 already up to date\n"
    assert _index_files(shards) == [f"part-{k:05d}.tar.ummae-index" for k in range(3)]
    assert TarShards(pattern).indexed == 3
    again = run_cli_captured(["shard-index", "--data", str(shards), "--no-progress"], tmp_path)
    assert again.out == "ummae shard-index: 3 shard(s): wrote 0 index(es), 3 already up to date\n"
    # one shard rewritten by its tool: only its index is stale, only it is rewritten
    with tarfile.open(shards / "part-00001.tar", "w") as tar:
        info = tarfile.TarInfo("other.jpg")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"12345"))
    stale = run_cli_captured(["shard-index", "--data", str(shards), "--no-progress"], tmp_path)
    assert stale.out == "ummae shard-index: 3 shard(s): wrote 1 index(es), 2 already up to date\n"
    assert TarShards(shards).indexed == 3 and len(TarShards(shards)) == 9
    forced = run_cli_captured(["shard-index", "--data", str(shards), "--force", "--no-progress"], tmp_path)
    assert forced.out.startswith("ummae shard-index: 3 shard(s): wrote 3 index(es), 0 already")


def test_a_damaged_shard_is_warned_about_and_left_without_index(tmp_path):
    shards = _other_tools_shards(tmp_path / "s")
    raw = (shards / "part-00002.tar").read_bytes()
    (shards / "part-00002.tar").write_bytes(raw[:1024] + b"\x07" * 512)  # a garbage second header
    with pytest.warns(UserWarning, match=r"no index for .*part-00002.tar: the shard is damaged: unreadable after "
                                         r"1 images \(invalid header\); its tar headers are read at every start"):
        result = run_cli_captured(["shard-index", "--data", str(shards), "--no-progress"], tmp_path)
    assert result.code == 0
    assert result.out.endswith("wrote 2 index(es), 0 already up to date, 1 not indexable (warned above)\n")
    assert _index_files(shards) == ["part-00000.tar.ummae-index", "part-00001.tar.ummae-index"]


def _one_line_error(result, expected: str) -> None:
    assert result.code == 2, (result.out, result.err)
    assert result.err.startswith("ummae shard-index: error: ") and expected in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


@pytest.mark.parametrize("data, expected", [
    ("no/such/dir", "--data: 'no/such/dir' does not exist"),
    ("images", "no .tar shards in directory 'images'"),
    ("s/part-{00000..00004}.tar", "2 of 5 shards do not exist, e.g. 's/part-00003.tar'"),
    ("notes.bin", "'notes.bin' is neither a directory, a .tar shard nor a text list of shards"),
    ("empty.txt", "shard list 'empty.txt' names no shards"),
])
def test_bad_data_is_a_one_line_error(tmp_path, monkeypatch, data, expected):
    _other_tools_shards(tmp_path / "s")
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.bin").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    monkeypatch.chdir(tmp_path)
    _one_line_error(run_cli_captured(["shard-index", "--data", data, "--no-progress"], tmp_path), expected)


def test_a_folder_it_cannot_write_into_is_a_one_line_error(tmp_path, monkeypatch):
    shards = _other_tools_shards(tmp_path / "s")

    def read_only(src, dst):  # a read-only mount, as the kernel refuses the rename
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(shard_index.os, "replace", read_only)
    result = run_cli_captured(["shard-index", "--data", str(shards), "--no-progress"], tmp_path)
    _one_line_error(result, f"cannot write the index of shard '{shards / 'part-00000.tar'}': Read-only file system")
    assert _index_files(shards) == [] and not [p for p in shards.iterdir() if p.name.startswith(".")]


def test_a_missing_option_is_argparses_one_line(capsys):
    from ummae.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["shard-index"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "ummae shard-index: error: the following arguments are required: --data\n"
