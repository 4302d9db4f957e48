"""The index file next to each tar shard (`ummae.data.shard_index`): `ummae shards` writes one per
shard; `TarShards` reading them is the same dataset as scanning the tar headers (names, offsets,
sizes, bytes, seeded samples); a stale, corrupt or unreadable index is warned about once and the
shard scanned; an index wrong in a way the load-time checks cannot see still never yields another
member's bytes; a missing index is a silent scan; the file is written atomically."""

from __future__ import annotations

import errno
import io
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ummae.data import TarShards, pretrain_transform, write_shards
from ummae.data import shard_index
from ummae.data.sampling import SeededSamples
from ummae.data.shard_index import IndexProblem, ShardIndex, index_path, read_index, write_index
from ummae.data.shards import _index_shard, index_shard
from ummae.errors import UmmaeError

N_IMAGES = 7


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 shards of 3 + 3 + 1 PNGs, written by `write_shards`, with their index files."""
    folder = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    out = tmp_path_factory.mktemp("shards")
    write_shards(folder, out, shard_size=3, progress=False)
    return out


def _copy(shards: Path, to: Path, indexes: bool = True) -> Path:
    to.mkdir()
    for p in shards.iterdir():
        if indexes or p.suffix == ".tar":
            shutil.copy(p, to / p.name)
    return to


def _no_warnings(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make()


def _same_dataset(a: TarShards, b: TarShards) -> None:
    assert len(a) == len(b) > 0
    # the same shard file names and members (the folders differ: copies)
    assert [a.paths[i].rsplit("/", 2)[1:] for i in range(len(a))] == [b.paths[i].rsplit("/", 2)[1:] for i in range(len(b))]
    assert np.array_equal(a._offset, b._offset) and np.array_equal(a._size, b._size)
    assert [a.read_bytes(i) for i in range(len(a))] == [b.read_bytes(i) for i in range(len(b))]


def test_ummae_shards_writes_an_index_that_gives_the_dataset_the_scan_gives(shards, tmp_path):
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        [f"train-{k:06d}.tar" for k in range(3)] + [f"train-{k:06d}.tar.ummae-index" for k in range(3)])
    indexed = _no_warnings(lambda: TarShards(shards, pretrain_transform(32)))
    scanned = _no_warnings(lambda: TarShards(_copy(shards, tmp_path / "bare", indexes=False), pretrain_transform(32)))
    assert (indexed.indexed, scanned.indexed) == (3, 0)
    assert indexed._head.min() >= 512 and not scanned._head.any()  # index entries: every read is checked
    # same members, offsets, sizes and bytes, so the same seeded crops (paths differ in folder only)
    assert [indexed.paths[i].rsplit("/", 1)[1] for i in range(N_IMAGES)] == \
        [scanned.paths[i].rsplit("/", 1)[1] for i in range(N_IMAGES)]
    assert np.array_equal(indexed._offset, scanned._offset) and np.array_equal(indexed._size, scanned._size)
    assert [indexed.read_bytes(i) for i in range(N_IMAGES)] == [scanned.read_bytes(i) for i in range(N_IMAGES)]
    a, b = SeededSamples(indexed, seed=5), SeededSamples(scanned, seed=5)
    for i in range(N_IMAGES):
        assert torch.equal(a[(1, i)]["image"], b[(1, i)]["image"]), i
    # the file holds what the header scan returns, heads included
    for k in range(3):
        shard = str(shards / f"train-{k:06d}.tar")
        index, (members, problem) = read_index(shard), _index_shard(shard)
        assert problem is None and len(index) == len(members) == (3 if k < 2 else 1)
        assert [(index.name(i), int(index.offsets[i]), int(index.sizes[i]), int(index.heads[i]))
                for i in range(len(index))] == members


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_and_non_ascii_names_of_every_dialect_are_indexed_and_checked(tmp_path, fmt):
    # pax `path` records and GNU long names: the ustar header holds a cut or `?`-replaced name,
    # and the check of every read must still accept the member and refuse its neighbour.
    names = ["k1.jpg", "d" * 120 + "/k2.jpg", "sub/k3.png"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["é.png", "a" * 150 + ".jpg", "a" * 150 + ".png"]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 10 + i, 1.5  # fractional mtime: a pax header per member (pax format)
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    assert index_shard(str(shard)) is None
    ds = _no_warnings(lambda: TarShards(shard))
    assert ds.indexed == 1 and [ds.paths[i].split("s.tar/", 1)[1] for i in range(len(ds))] == names
    assert [ds.read_bytes(i) for i in range(len(ds))] == [bytes([i]) * (10 + i) for i in range(len(names))]
    if fmt != tarfile.USTAR_FORMAT:  # two names alike in their first 100 bytes: swapped, both refused
        index = read_index(str(shard))
        swapped = [(index.name(i), int(index.offsets[i]), int(index.sizes[i]), int(index.heads[i]))
                   for i in range(len(index))]
        swapped[-2], swapped[-1] = (swapped[-1][0], *swapped[-2][1:]), (swapped[-2][0], *swapped[-1][1:])
        write_index(shard, ShardIndex.from_members(swapped))
        ds = _no_warnings(lambda: TarShards(shard))
        for i in (len(names) - 2, len(names) - 1):
            with pytest.raises(UmmaeError, match="does not match the shard"):
                ds.read_bytes(i)


def _rewrite(shard: Path, members: list[tuple[str, bytes]], mtime: int) -> None:
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("change", ["other members, other size", "other names, same size", "same members, later"])
def test_a_stale_index_is_warned_about_once_and_the_shard_scanned(tmp_path, change):
    shard = tmp_path / "s.tar"
    old = [("a.jpg", b"1" * 10), ("b.jpg", b"2" * 20), ("c.jpg", b"3" * 30)]
    _rewrite(shard, old, mtime=1000)
    assert index_shard(str(shard)) is None
    size = shard.stat().st_size
    new = {"other members, other size": ([("x.jpg", b"9" * 20000)], 1000),
           "other names, same size": ([("y.jpg", b"1" * 10), ("z.jpg", b"2" * 20), ("w.jpg", b"3" * 30)], 1000),
           "same members, later": (old, 2000)}[change]
    _rewrite(shard, *new)
    assert (shard.stat().st_size == size) == (change != "other members, other size")
    with pytest.warns(UserWarning, match=r"s.tar': not using its index file \(stale: .*ummae shard-index --data") as caught:
        ds = TarShards(shard)
    assert len(caught) == 1 and ds.indexed == 0
    assert [ds.read_bytes(i) for i in range(len(ds))] == [data for _, data in new[0]]


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        del raw[len(raw) // 2:]
    elif how == "empty":
        raw = bytearray()
    elif how == "garbage":
        raw = bytearray(np.random.default_rng(0).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif how == "wrong magic":
        raw[:8] = b"NOTANIDX"
    elif how == "offsets shifted by 512 in place":
        offsets = np.frombuffer(bytes(raw[72:72 + 8 * 3]), "<i8") + 512
        raw[72:72 + 8 * 3] = offsets.astype("<i8").tobytes()
    elif how == "one byte flipped":
        raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "wrong magic", "offsets shifted by 512 in place",
                                 "one byte flipped"])
def test_a_corrupt_index_is_warned_about_and_the_shard_scanned(shards, tmp_path, how):
    copy = _copy(shards, tmp_path / "c")
    _corrupt(Path(index_path(copy / "train-000000.tar")), how)
    with pytest.warns(UserWarning, match=r"train-000000.tar': not using its index file \(corrupt: ") as caught:
        ds = TarShards(copy)
    assert len(caught) == 1 and ds.indexed == 2
    _same_dataset(ds, TarShards(shards))


def _entries(index: ShardIndex) -> list[tuple[str, int, int, int]]:
    return [(index.name(i), int(index.offsets[i]), int(index.sizes[i]), int(index.heads[i])) for i in range(len(index))]


@pytest.mark.parametrize("how", ["negative size", "past the end", "overlapping", "head not a block"])
def test_an_index_that_cannot_describe_a_tar_is_corrupt(shards, tmp_path, how):
    copy = _copy(shards, tmp_path / "c")
    shard = copy / "train-000000.tar"
    entries = _entries(read_index(shard))
    name, offset, size, head = entries[1]
    entries[1] = {"negative size": (name, offset, -1, head), "past the end": (name, offset, 10 ** 9, head),
                  "overlapping": (name, entries[0][1], size, head), "head not a block": (name, offset, size, 100)}[how]
    write_index(shard, ShardIndex.from_members(entries))  # a consistent file: magic, lengths and CRC agree
    with pytest.raises(IndexProblem, match="corrupt: "):
        read_index(shard)
    with pytest.warns(UserWarning, match="not using its index file"):
        _same_dataset(TarShards(copy), TarShards(shards))


@pytest.mark.parametrize("how", ["offsets shifted by 512", "names swapped"])
def test_a_wrong_index_that_passes_the_load_checks_never_yields_wrong_bytes(shards, tmp_path, how):
    """Written by `write_index` itself, so magic, lengths, CRC and fingerprint all agree; only the
    check of every read (the member's own tar header, read with its data) can tell."""
    copy = _copy(shards, tmp_path / "c")
    shard = copy / "train-000000.tar"
    entries = _entries(read_index(shard))
    if how == "offsets shifted by 512":
        entries = [(name, offset + 512, size, head) for name, offset, size, head in entries]
    else:
        entries[0], entries[1] = (entries[1][0], *entries[0][1:]), (entries[0][0], *entries[1][1:])
    write_index(shard, ShardIndex.from_members(entries))
    ds = _no_warnings(lambda: TarShards(copy, transform=None))
    assert ds.indexed == 3
    wrong = range(3) if how == "offsets shifted by 512" else range(2)
    for i in wrong:
        with pytest.raises(UmmaeError, match=r"does not match the shard \(.*\); rewrite it with: ummae shard-index"):
            ds.read_bytes(i)
    intact = TarShards(shards, transform=None)
    for i in set(range(N_IMAGES)) - set(wrong):
        assert ds.read_bytes(i) == intact.read_bytes(i)
    # through the dataset: skipped and named like an unreadable image, the rest decodes unchanged
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        images = [ds.load(i) for i in range(N_IMAGES)]
    assert ds.skipped == {intact.paths[i].replace(str(shards), str(copy)) for i in wrong}
    assert all(np.array_equal(np.asarray(img), np.asarray(intact[i])) for i, (img, skipped) in enumerate(images)
               if not skipped)


def test_a_missing_index_is_a_silent_scan_and_an_unreadable_one_a_warning(shards, tmp_path):
    copy = _copy(shards, tmp_path / "c")
    Path(index_path(copy / "train-000001.tar")).unlink()
    ds = _no_warnings(lambda: TarShards(copy))
    assert ds.indexed == 2
    _same_dataset(ds, TarShards(shards))
    Path(index_path(copy / "train-000001.tar")).mkdir()  # there, and cannot be read as a file
    with pytest.warns(UserWarning, match=r"train-000001.tar': not using its index file \(unreadable: "):
        assert TarShards(copy).indexed == 2


def test_the_index_is_written_atomically(shards, tmp_path, monkeypatch):
    copy = _copy(shards, tmp_path / "c")
    shard = copy / "train-000000.tar"
    before = Path(index_path(shard)).read_bytes()
    real_open = open

    class FullDisk:  # takes the first 100 bytes, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(shard_index, "open", lambda p, mode="r": FullDisk(real_open(p, mode)) if "w" in mode
                        else real_open(p, mode), raising=False)
    with pytest.raises(UmmaeError, match=r"cannot write the index of shard '.*train-000000.tar': No space left"):
        index_shard(str(shard))
    assert Path(index_path(shard)).read_bytes() == before  # the old index, whole
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []  # no partial file
    Path(index_path(shard)).unlink()
    with pytest.raises(UmmaeError):
        index_shard(str(shard))
    assert not Path(index_path(shard)).exists() and not [p for p in copy.iterdir() if p.name.startswith(".")]
    # `ummae shards`: the shards are complete without their indexes; a warning says so
    monkeypatch.undo()
    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    monkeypatch.setattr(shard_index, "open", lambda p, mode="r": FullDisk(real_open(p, mode)) if "w" in mode
                        else real_open(p, mode), raising=False)
    with pytest.warns(UserWarning, match="cannot write the index of shard .*retry with: ummae shard-index"):
        written, _ = write_shards(folder, tmp_path / "out", progress=False)
    assert len(written) == 1 and not list((tmp_path / "out").glob("*.ummae-index"))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert len(_no_warnings(lambda: TarShards(tmp_path / "out"))) == 1


def test_the_writer_refuses_what_the_reader_would_call_corrupt(shards, tmp_path):
    copy = _copy(shards, tmp_path / "c")
    entries = _entries(read_index(copy / "train-000000.tar"))
    for head in (0, shard_index.MAX_HEAD + 512):  # no header known; a claim of more than 1 MiB of them
        with pytest.raises(ValueError, match="cannot hold"):
            write_index(copy / "train-000000.tar", ShardIndex.from_members([(*entries[0][:3], head)]))
    assert read_index(copy / "train-000000.tar") is not None  # the index there was left alone


def test_a_damaged_shard_gets_no_index(shards, tmp_path):
    shard = tmp_path / "cut.tar"
    raw = (shards / "train-000000.tar").read_bytes()
    shard.write_bytes(raw[:len(raw) // 2 + 100])  # inside a member's header or data
    assert "damaged" in index_shard(str(shard)) and not Path(index_path(shard)).exists()
