"""The index file next to a tar shard: its image members' names, offsets and sizes, so that start-up
reads one small file per shard instead of every member's tar header.

`train-000000.tar` gets `train-000000.tar.ummae-index` (`index_path`). `ummae shards` writes one
for every shard it writes, `ummae shard-index --data SHARDS` for shards written by anything else.
`TarShards` uses an index only if it is fresh; a missing one costs nothing but the header scan
(`ummae.data.shards`), a stale or damaged one a warning and the same scan. This module knows the
file format only; what a tar header holds is `ummae.data.shards`' business.

Format (version 1), little-endian, no pickle anywhere, so a file from elsewhere is only ever
parsed as numbers and bytes:

    offset  bytes  field
    0       8      magic b"UMMAEIDX"
    8       4      version (uint32), 1
    12      4      n, the number of image members (uint32)
    16      8      the shard's size in bytes when indexed (uint64)
    24      8      length of the names blob in bytes (uint64)
    32      32     fingerprint of the shard (sha256, see `fingerprint`)
    64      4      CRC-32 of bytes 0-63 and of everything after byte 72 (uint32)
    68      4      zero (reserved)
    72      8n     data offsets (int64): where member i's bytes start in the shard
            8n     sizes (int64): member i's size in bytes
            4n     heads (uint32): bytes of tar header blocks right before member i's data (512
                   for a plain ustar header; more with a pax record or GNU long name before it)
            4n     name ends (uint32): member i's name is names[end(i-1):end(i)], end(-1) = 0
            L      names: the member names, UTF-8, concatenated

The file is exactly `72 + 24n + L` bytes; 1.28M ImageNet-style members (`000000123.jpg`) take
about 48 MB. Every check `read_index` makes is listed in its docstring.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["INDEX_SUFFIX", "IndexProblem", "ShardIndex", "fingerprint", "index_path", "read_index",
           "write_index"]

INDEX_SUFFIX = ".ummae-index"  # not `.idx`: DALI's wds2idx writes text indexes under that name
MAGIC = b"UMMAEIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ32sII")  # magic, version, n, shard size, names length, fingerprint, crc, 0
_ENTRY_BYTES = 8 + 8 + 4 + 4  # offset, size, head, name end
# Member header chains hashed into the fingerprint: the first, the last and three spread between.
FINGERPRINT_MEMBERS = 5
# The most tar header bytes before one member's data an index may claim (a pax record with a
# long path is a few KiB): each read reads them, so a damaged index must not claim gigabytes.
MAX_HEAD = 1 << 20


def index_path(shard: str | os.PathLike) -> str:
    """Where the index of `shard` lives: next to it, `<shard>.ummae-index`."""
    return os.fspath(shard) + INDEX_SUFFIX


class IndexProblem(Exception):
    """An index that cannot be used: stale (the shard changed since), corrupt or unreadable. The
    message says which and why, in a few words (`"stale: ..."`, `"corrupt: ..."`)."""


@dataclass
class ShardIndex:
    """The image members of one shard, in tar order: arrays of one length n.

    offsets: int64 [n], where member i's data starts in the shard.
    sizes: int64 [n], its size in bytes.
    heads: int64 [n], the bytes of tar header blocks right before the data: member i's headers
        are `shard[offsets[i] - heads[i] : offsets[i]]`, which `TarShards.read_bytes` reads with
        the data and checks against the entry. 0 means "not known" (never in an index file).
    name_ends: int64 [n], member i's name is `names[name_ends[i-1]:name_ends[i]]` (from 0 for i=0).
    names: the names, UTF-8 (undecodable bytes kept as they were), concatenated.
    """

    offsets: np.ndarray
    sizes: np.ndarray
    heads: np.ndarray
    name_ends: np.ndarray
    names: bytes

    @classmethod
    def from_members(cls, members: list[tuple[str, int, int, int]]) -> ShardIndex:
        """From `[(member name, data offset, size, head), ...]`, as the header scan lists them."""
        encoded = [name.encode("utf-8", "surrogateescape") for name, _, _, _ in members]
        return cls(offsets=np.array([m[1] for m in members], dtype=np.int64),
                   sizes=np.array([m[2] for m in members], dtype=np.int64),
                   heads=np.array([m[3] for m in members], dtype=np.int64),
                   name_ends=np.cumsum([len(e) for e in encoded], dtype=np.int64),
                   names=b"".join(encoded))

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, i: int) -> str:
        start = int(self.name_ends[i - 1]) if i > 0 else 0
        return self.names[start:int(self.name_ends[i])].decode("utf-8", "surrogateescape")


def fingerprint(fd: int, shard_size: int, index: ShardIndex) -> bytes:
    """sha256 of the shard's size and of the tar header blocks of a few of the indexed members
    (`FINGERPRINT_MEMBERS`, first and last included) and of the shard's first 512 bytes.

    Why these bytes: an index is right for a shard exactly when the member headers sit where it
    says, with the names and sizes it says; the header blocks hold the name, size and mtime
    (`ummae shards` writes the time of writing), so a shard rewritten with other members, or the
    same ones at another time, or shifted, changes them. The size catches a shard cut short or
    appended to. It costs a handful of 512-byte reads per shard whatever the image sizes, where
    hashing the shard's first and last KiB would mostly hash image bytes, and a tar written by
    Python's tarfile (so by WebDataset) ends in 1 to 11 KiB of zeros, whatever its members. The
    modification time is not used: a copy (cp, rsync, an object store) changes it and leaves the
    index right. What this misses (a member in between renamed, headers at the same places) the
    check of every read catches (`TarShards.read_bytes`).
    """
    digest = hashlib.sha256(str(shard_size).encode())
    n = len(index)
    picked = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_MEMBERS)).round().astype(np.int64)) if n else []
    digest.update(os.pread(fd, 512, 0))
    for i in picked:
        head = int(index.heads[i])
        digest.update(os.pread(fd, head, int(index.offsets[i]) - head))
    return digest.digest()


def write_index(shard: str | os.PathLike, index: ShardIndex) -> str:
    """Write `index` (of `shard`, as it is now) to `index_path(shard)`; returns that path.

    Atomic: written under a temporary name in the same folder, then renamed over the target, so
    a reader sees the old file or the new one, never a part; the temporary file is removed when
    writing fails (OSError is raised). Raises ValueError for an index the format cannot hold.
    """
    n = len(index)
    heads_ok = not n or 0 < int(index.heads.min()) <= int(index.heads.max()) <= MAX_HEAD
    if n >= 2 ** 32 or len(index.names) >= 2 ** 32 or not heads_ok:
        raise ValueError(f"the index format cannot hold these {n} members ({len(index.names)} name bytes, "
                         f"or a member with no tar header or over {MAX_HEAD} bytes of them)")
    target = index_path(shard)
    with open(shard, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mark = fingerprint(f.fileno(), size, index)
    body = b"".join([index.offsets.astype("<i8").tobytes(), index.sizes.astype("<i8").tobytes(),
                     index.heads.astype("<u4").tobytes(), index.name_ends.astype("<u4").tobytes(), index.names])
    head = _HEADER.pack(MAGIC, VERSION, n, size, len(index.names), mark, 0, 0)
    crc = zlib.crc32(body, zlib.crc32(head[:64]))
    head = _HEADER.pack(MAGIC, VERSION, n, size, len(index.names), mark, crc, 0)
    folder, name = os.path.split(target)
    partial = os.path.join(folder, f".{name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            out.write(head)
            out.write(body)
        os.replace(partial, target)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    return target


def read_index(shard: str | os.PathLike) -> ShardIndex | None:
    """The index of `shard` if there is one and it is fresh; None if there is none.

    Raises IndexProblem, saying why, when the file cannot be used:
      unreadable  it cannot be opened or read (permissions, an I/O error);
      corrupt     shorter or longer than its header says, wrong magic or version, a CRC-32
                  mismatch (a damaged or half-overwritten file), or entries that cannot be a
                  tar's: a size < 0, a head not a multiple of 512 from 512 to `MAX_HEAD`, a member that starts
                  before the previous one ends or ends past the shard, name ends not increasing;
      stale       the shard's size, or its fingerprint (`fingerprint`), is not the one indexed.
    """
    path = index_path(shard)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise IndexProblem(f"unreadable: {err.strerror or err}") from None
    if len(raw) < _HEADER.size:
        raise IndexProblem(f"corrupt: {len(raw)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, n, size, names_length, mark, crc, _ = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise IndexProblem("corrupt: not an ummae shard index (wrong magic bytes)")
    if version != VERSION:
        raise IndexProblem(f"corrupt: format version {version}, this ummae reads version {VERSION}")
    expected = _HEADER.size + _ENTRY_BYTES * n + names_length
    if len(raw) != expected:
        raise IndexProblem(f"corrupt: {len(raw)} bytes where its header says {expected} (truncated?)")
    if zlib.crc32(memoryview(raw)[_HEADER.size:], zlib.crc32(raw[:64])) != crc:
        raise IndexProblem("corrupt: CRC-32 mismatch")
    start = _HEADER.size
    offsets = np.frombuffer(raw, "<i8", n, start).astype(np.int64)
    sizes = np.frombuffer(raw, "<i8", n, start + 8 * n).astype(np.int64)
    heads = np.frombuffer(raw, "<u4", n, start + 16 * n).astype(np.int64)
    name_ends = np.frombuffer(raw, "<u4", n, start + 20 * n).astype(np.int64)
    index = ShardIndex(offsets, sizes, heads, name_ends, raw[start + _ENTRY_BYTES * n:])
    problem = _inconsistency(index, size)
    if problem:
        raise IndexProblem(f"corrupt: {problem}")
    try:
        fd = os.open(shard, os.O_RDONLY)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise IndexProblem(f"stale: the shard is {actual} bytes, the index is of one of {size}")
            if fingerprint(fd, size, index) != mark:
                raise IndexProblem("stale: the shard's member headers are not those indexed")
        finally:
            os.close(fd)
    except OSError as err:
        raise IndexProblem(f"unreadable: the shard: {err.strerror or err}") from None
    return index


def _inconsistency(index: ShardIndex, shard_size: int) -> str | None:
    """What makes `index` impossible for a tar of `shard_size` bytes, or None (vectorized: a few
    microseconds for thousands of members)."""
    offsets, sizes, heads, ends = index.offsets, index.sizes, index.heads, index.name_ends
    if not len(offsets):
        return None
    if (sizes < 0).any():
        return "a negative size"
    if (heads < 512).any() or (heads % 512).any() or (heads > MAX_HEAD).any():
        return f"a header length that is not a multiple of 512 between 512 and {MAX_HEAD}"
    starts, stops = offsets - heads, offsets + sizes
    if starts[0] < 0 or (starts[1:] < stops[:-1]).any():
        return "members that overlap or are out of order"
    if stops[-1] > shard_size:
        return f"a member ending at byte {int(stops[-1])}, past the shard's end ({shard_size})"
    if (np.diff(ends, prepend=0) < 1).any() or ends[-1] != len(index.names):
        return "member names that do not add up"
    return None
