"""Images stored in tar shards (the WebDataset format), read by random access through an index.

Large data sets live in tar shards because millions of small files are slow on network file
systems. A shard is a plain (uncompressed) tar whose members are grouped into samples by key, as
WebDataset writes them: `000123.jpg`, `000123.cls`, `000123.json`, ... Pre-training needs only
the image, so every member whose field (the part of the name after the key's first dot) is an
image extension (`jpg`, `png`, ...) is one sample; labels and other members are ignored.

Why an index instead of WebDataset's streaming reader: ummae seeds every crop and mask by
`(seed, epoch, index)` and orders each epoch by a seeded permutation of indices
(`ummae.data.sampling`), which is what makes resume exact and runs world-size invariant. A
streamed shard has no index. So at start-up each process builds a table of
`(shard, data offset, size)` of every image member, and `dataset[i]` reads exactly member i
with one positional read. The table comes from the index file next to each shard
(`train-000000.tar.ummae-index`, `ummae.data.shard_index`: names, offsets and sizes as arrays,
one read per shard), which `ummae shards` writes and `ummae shard-index` writes for shards from
other tools; without one, from the shard's tar headers (512 bytes per member, the image bytes
skipped with a seek), which for ImageNet-1K's 1.28M images costs every process of a run seconds
of CPU and, on a cold network file system, a round trip per member. An index is used only when
fresh (the shard's size and a fingerprint of some member headers match); a stale or damaged one
is warned about and the headers are read instead, and since no index check can see every
change, each read of an indexed member also reads its tar header and checks it is that member
(`TarShards.read_bytes`): a wrong index never yields another image's bytes. The epoch then samples shards exactly like a folder: every image once per epoch across all
ranks and DataLoader workers, the same crops and masks for any number of processes, bit-identical
losses after a resume. The price: each read is a random access, which local disks and network
file systems (NFS, Lustre, GPFS, or an object store mounted with a FUSE client such as
mountpoint-s3 or gcsfuse) serve well, but a `pipe:` or `http://` stream cannot. Such shards are
therefore fetched once, through WebDataset's own URL/pipe support (`webdataset.gopen`: `pipe:`,
`http(s)://` via curl, `gs://`, ...), into a local cache (`$UMMAE_SHARD_CACHE`, default
`~/.cache/ummae/shards`), and read from there: the first epoch waits for the download, every
later run and epoch reads the local copy.

The shard list is given as a brace pattern (`train-{000000..000127}.tar`), a directory holding
`.tar` files, one `.tar` file, or a text file listing shard paths (or patterns), one a line.
Brace expansion and shard writing use the `webdataset` package (`pip install 'ummae[shards]'`),
so the shards ummae writes are read by WebDataset, timm and OpenCLIP as well.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ummae.data.folder import IMAGE_EXTENSIONS, ImageFolderUnlabeled
from ummae.data.shard_index import IndexProblem, ShardIndex, read_index, write_index
from ummae.errors import ConfigError, UmmaeError

__all__ = ["TarShards", "fetch_shard", "find_shards", "image_field", "index_shard", "index_shards",
           "is_shard_spec", "require_webdataset", "shard_cache_dir"]

# Open shard files per process: enough for a few shards' worth of locality, well under ulimits.
MAX_OPEN_SHARDS = 64


def require_webdataset():
    """The `webdataset` module, or a one-line UmmaeError saying how to install it."""
    try:
        import webdataset
    except ImportError as err:
        raise UmmaeError("tar shards need the webdataset package: pip install 'ummae[shards]' "
                         "(or pip install webdataset)") from err
    return webdataset


def image_field(member_name: str) -> str | None:
    """The WebDataset field of a tar member if it is an image (`a/000123.jpg` -> 'jpg'), else None.

    A sample's key is the member's base name up to its first dot, the field is the rest, so
    `000123.seg.png` (field `seg.png`, e.g. a segmentation map) is not an image sample.
    """
    base = member_name.rsplit("/", 1)[-1]
    if base.startswith(".") or "." not in base:
        return None
    field = base.split(".", 1)[1].lower()
    return field if f".{field}" in IMAGE_EXTENSIONS else None


def _is_url(entry: str) -> bool:
    return "://" in entry or entry.startswith("pipe:")


def is_shard_spec(path: str | os.PathLike) -> bool:
    """Whether `--data path` names tar shards (brace pattern, .tar file, list file, or a directory
    with .tar files at its top level) rather than a folder of images."""
    text = str(path)
    if "{" in text or text.endswith(".tar") or _is_url(text):
        return True
    p = Path(text)
    if p.is_file():
        return p.suffix.lower() not in IMAGE_EXTENSIONS
    return p.is_dir() and any(child.suffix == ".tar" and child.is_file() for child in p.iterdir())


def find_shards(spec: str | os.PathLike) -> list[str]:
    """The shard files `spec` names, in order; raises ConfigError/UmmaeError on a bad spec.

    `spec`: a brace pattern, a `.tar` file, a directory (its top-level `*.tar`, sorted), a text
    file listing shards (paths, brace patterns or URLs, one a line; `#` comments and blank lines
    are skipped; relative paths are relative to the list file), or a URL / `pipe:` command (with
    or without braces). URL and pipe shards are fetched into the local cache (`fetch_shard`).
    """
    text = str(spec)
    if _is_url(text):
        return [fetch_shard(url) for url in (_expand(text) if "{" in text else [text])]
    p = Path(text)
    if "{" in text:
        shards = _expand(text)
    elif p.is_dir():
        shards = sorted(str(c) for c in p.iterdir() if c.suffix == ".tar" and c.is_file())
        if not shards:
            raise UmmaeError(f"no .tar shards in directory '{p}'")
    elif text.endswith(".tar"):
        shards = [text]
    elif p.is_file():
        shards = _read_list_file(p)
    else:
        raise UmmaeError(f"data path '{p}' does not exist")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise UmmaeError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. '{missing[0]}'")
    return shards


def shard_cache_dir() -> Path:
    """Where shards named by a URL or `pipe:` command are kept: `$UMMAE_SHARD_CACHE`, else
    `~/.cache/ummae/shards`."""
    return Path(os.environ.get("UMMAE_SHARD_CACHE") or Path.home() / ".cache" / "ummae" / "shards")


def fetch_shard(url: str) -> str:
    """A local copy of the shard at `url` (`pipe:CMD`, `http(s)://...`, or any scheme WebDataset's
    `gopen` knows), fetched on first use into `shard_cache_dir()` and reused afterwards.

    Random access needs a file (see the module docstring). The copy is named by a hash of the
    URL and written to a temporary name first, then renamed, so several processes fetching the
    same shard at once (ranks of one node) each end with a complete file, and a killed fetch
    leaves no partial shard behind. Raises UmmaeError in one line when the fetch fails.
    """
    wds = require_webdataset()
    cache = shard_cache_dir()
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-64:]
    target = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{tail}"
    if target.is_file():
        return str(target)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with wds.gopen(url, "rb") as source, open(partial, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
        os.replace(partial, target)
    except Exception as err:  # gopen signals bad schemes, failed commands and HTTP errors variously
        partial.unlink(missing_ok=True)
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UmmaeError(f"cannot fetch shard '{url}' into {cache}: {reason}") from None
    return str(target)


def _expand(pattern: str) -> list[str]:
    wds = require_webdataset()
    return list(wds.shardlists.expand_urls(pattern))


def _read_list_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"'{path}' is neither a directory, a .tar shard nor a text list of shards "
                          f"({type(err).__name__})") from None
    shards: list[str] = []
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        if _is_url(line):
            shards += [fetch_shard(url) for url in (_expand(line) if "{" in line else [line])]
            continue
        entry = line if os.path.isabs(line) else str(path.parent / line)
        shards += _expand(entry) if "{" in entry else [entry]
    if not shards:
        raise UmmaeError(f"shard list '{path}' names no shards")
    return shards


def _index_shard(shard: str) -> tuple[list[tuple[str, int, int, int]], str | None]:
    """`([(member name, data offset, size, head), ...] of the image members, problem or None)`.

    `head`: the bytes of the member's tar header blocks, right before its data (512, or more when
    a pax record or GNU long name precedes its ustar header).

    Reads only the 512-byte tar headers, skipping over the data. A shard cut short keeps the
    members whose headers were read; a member whose data is cut is still listed, and fails (is
    skipped and counted) when read. A header that cannot be parsed ends the shard: tar has no way
    to find the next member without it.

    ustar headers, with the pax records (`path`, `size`) and GNU long names that WebDataset and
    Python's tarfile add, are parsed here (`_scan_headers`), several times faster than `tarfile`,
    which builds a TarInfo object per member; a shard with any other header (global pax headers,
    sparse files, base-256 sizes) is indexed by `tarfile`.
    """
    scanned = _scan_headers(shard)
    return scanned if scanned is not None else _index_with_tarfile(shard)


def _scan_headers(shard: str) -> tuple[list[tuple[str, int, int, int]], str | None] | None:
    """`_index_shard` by ummae's own header parser; None for a shard with a header of a tar
    dialect it does not parse (`_OTHER_DIALECT`)."""
    try:
        fd = os.open(shard, os.O_RDONLY)
    except OSError as err:
        return [], f"cannot be opened ({err})"
    try:
        end = os.fstat(fd).st_size
        members: list[tuple[str, int, int, int]] = []
        override: dict[str, bytes] = {}  # from a pax or GNU long-name header, for the next member
        offset = 0
        start = None  # where the header blocks of the member being read begin
        while True:
            header = os.pread(fd, 512, offset)
            if len(header) < 512:
                problem = None if offset == end and offset > 0 else "unexpected end of data"
                return members, problem and f"unreadable after {len(members)} images ({problem})"
            if header == _ZERO_BLOCK:  # end-of-archive marker
                return members, None
            fields = _parse_header(header)
            if fields is _OTHER_DIALECT:
                return None
            if isinstance(fields, str):
                problem = "not an uncompressed tar" if fields is _BAD_CHECKSUM and offset == 0 else fields
                return members, f"unreadable after {len(members)} images ({problem})"
            typeflag, name, size = fields
            start = offset if start is None else start
            data_offset, offset = offset + 512, offset + 512 + _padded(size)
            if typeflag in b"xL":  # a pax record or GNU long name: it describes the next member
                _extend(override, typeflag, os.pread(fd, size, data_offset))
                continue
            name = override.get("path", name)
            if "size" in override:
                size = int(override["size"])
                offset = data_offset + _padded(size)
            override, head, start = {}, data_offset - start, None
            name = name.decode("utf-8", "surrogateescape")
            if typeflag in _FILE_TYPES and image_field(name):
                members.append((name, data_offset, size, head))
    finally:
        os.close(fd)


_ZERO_BLOCK = bytes(512)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (`7`: contiguous, read as regular)
# What `_parse_header` says of a header it cannot parse (compared by identity).
_BAD_CHECKSUM, _OTHER_DIALECT, _BAD_SIZE = "invalid header", "a tar dialect not parsed here", "invalid size field"


def _padded(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: whole 512-byte blocks."""
    return (size + 511) // 512 * 512


def _parse_header(header: bytes) -> tuple[bytes, bytes, int] | str:
    """`(typeflag, name, size)` of a 512-byte ustar header (the name with its ustar prefix, as the
    header holds it: a pax `path` record or GNU long name before it may replace it), or why not:
    `_BAD_CHECKSUM` (not a header), `_OTHER_DIALECT` (a valid header, of a dialect read by
    `tarfile` instead: not ustar, a GNU multi-volume / global pax / sparse header, a base-256
    size), `_BAD_SIZE`."""
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        checksum = -1
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field counts as spaces
        return _BAD_CHECKSUM
    typeflag, size_field = header[156:157], header[124:136]
    if header[257:262] != b"ustar" or typeflag in b"KgS" or size_field[0] & 0x80:
        return _OTHER_DIALECT
    try:
        size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return _BAD_SIZE
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    return typeflag, prefix + b"/" + name if prefix else name, size


def _extend(override: dict[str, bytes], typeflag: bytes, extended: bytes) -> None:
    """Record what a GNU long-name (`L`) or pax (`x`) header's data says of the next member."""
    if typeflag == b"L":
        override["path"] = extended.split(b"\0", 1)[0]
    else:
        override.update(_pax_records(extended))


def _member_mismatch(block: bytes, head: int, name: bytes, size: int) -> str | None:
    """Why `block[:head]`, the tar header blocks an index places right before a member's data, are
    not those of the member `name` (UTF-8 bytes) of `size` bytes; None when they are.

    Parsed as `_scan_headers` parses them, so a pax `path` record or GNU long name gives the
    whole name, which the ustar header itself may hold cut at 100 bytes or with `?` for
    non-ASCII characters. Checked: every header's checksum, that the last one is a regular
    file's and ends exactly at the data, its name and its size.
    """
    override: dict[str, bytes] = {}
    position = 0
    try:
        while position + 512 <= head:
            fields = _parse_header(block[position:position + 512])
            if isinstance(fields, str):
                return f"no tar header where the index says ({fields})"
            typeflag, header_name, header_size = fields
            data, position = position + 512, position + 512 + _padded(header_size)
            if typeflag in b"xL":
                _extend(override, typeflag, block[data:data + header_size])
                continue
            if data != head:
                return "the member's headers are not where the index says"
            if typeflag not in _FILE_TYPES:
                return "not a file"
            found_name, found_size = override.get("path", header_name), int(override.get("size", header_size))
            if found_name != name:
                return f"the member there is '{found_name.decode('utf-8', 'replace')}'"
            if found_size != size:
                return f"the member there has {found_size} bytes, not {size}"
            return None
    except ValueError:  # a pax record that does not parse
        return "an unreadable pax header where the index says"
    return "no member header where the index says"


def _pax_records(data: bytes) -> dict[str, bytes]:
    """The `path` and `size` of a pax extended header ("<length> <key>=<value>\\n" records)."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] != b"\0":
        length = int(data[position:data.index(b" ", position)])
        key, _, value = data[data.index(b" ", position) + 1: position + length - 1].partition(b"=")
        if key in (b"path", b"size"):
            records[key.decode()] = value
        position += length
    return records


def _index_with_tarfile(shard: str) -> tuple[list[tuple[str, int, int, int]], str | None]:
    """`_index_shard` through Python's tarfile, which reads every tar dialect."""
    members: list[tuple[str, int, int, int]] = []
    try:
        tar = tarfile.open(shard, "r:")  # "r:": uncompressed only, the format random access needs
    except (tarfile.ReadError, OSError) as err:
        return members, f"not a readable uncompressed tar ({err})"
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.ReadError, OSError) as err:
                return members, f"unreadable after {len(members)} images ({err})"
            if info is None:
                return members, None
            if info.isfile() and image_field(info.name):
                # `info.offset`: where the member's first header block is, pax or GNU ones included
                members.append((info.name, info.offset_data, info.size, info.offset_data - info.offset))


def _fresh_index(shard: str) -> ShardIndex | None:
    """The members of `shard` from its index file; None when it has none, or one that cannot be
    used (stale, corrupt, unreadable), which is warned about in one line."""
    try:
        return read_index(shard)
    except IndexProblem as err:
        warnings.warn(f"shard '{shard}': not using its index file ({err}), reading its tar headers "
                      f"instead; rewrite the index with: ummae shard-index --data '{shard}'", stacklevel=3)
        return None


def index_shard(shard: str) -> str | None:
    """Write the index file of `shard` (`ummae.data.shard_index`) from a scan of its tar headers.

    Returns None when written, else why not: a damaged shard, a tar dialect only `tarfile`
    reads (`_scan_headers`), whose members' headers `TarShards.read_bytes` could not check, or
    a shard the format cannot hold (`write_index`); such a shard's headers are read at every
    start instead. Raises UmmaeError (one line) when
    the file cannot be written.
    """
    scanned = _scan_headers(shard)
    if scanned is None:
        return "a tar dialect ummae's header reader does not parse (global pax headers, sparse files " \
               "or base-256 sizes)"
    members, problem = scanned
    if problem is not None:
        return f"the shard is damaged: {problem}"
    try:
        write_index(shard, ShardIndex.from_members(members))
    except ValueError as err:  # a shard beyond what the format holds (4G members, MiB-long headers)
        return str(err)
    except OSError as err:
        raise UmmaeError(f"cannot write the index of shard '{shard}': {err.strerror or err}") from None
    return None


def index_shards(spec: str | os.PathLike, force: bool = False,
                 progress: bool = True) -> tuple[int, int, list[str]]:
    """Write the missing and stale index files of the shards `spec` names (`find_shards`);
    `force`: rewrite the fresh ones too. Returns `(written, already fresh, ["<shard>: why it
    has no index", ...])`. Raises UmmaeError on a bad spec or an index that cannot be written."""
    from ummae.engine.progress import progress_mode, track

    written, fresh, problems = 0, 0, []
    for shard in track(find_shards(spec), "index", progress_mode(progress), unit="shard"):
        if not force:
            try:
                if read_index(shard) is not None:
                    fresh += 1
                    continue
            except IndexProblem:
                pass  # stale or damaged: rewritten below
        problem = index_shard(shard)
        if problem is None:
            written += 1
        else:
            problems.append(f"{shard}: {problem}")
    return written, fresh, problems


class _MemberNames:
    """`names[i]` -> `'<shard path>/<member name>'`, the id of image i in warnings and skip lists.

    The member names are kept as one bytes object and the end of each name in it (`name_ends`,
    int64 [n]): no Python object per image, so the table is compact and forked DataLoader workers
    share it (a list of str would be copied page by page into every worker as reference counts
    are touched), and the names of an index file are used as they were read."""

    def __init__(self, shards: list[str], shard_of: np.ndarray, names: bytes, name_ends: np.ndarray) -> None:
        self.shards, self.shard_of, self.names, self.name_ends = shards, shard_of, names, name_ends

    def __len__(self) -> int:
        return len(self.name_ends)

    def member(self, index: int) -> bytes:
        """The tar member name of image `index`, as stored (UTF-8 bytes)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        index %= len(self)
        return self.names[int(self.name_ends[index - 1]) if index else 0:int(self.name_ends[index])]

    def __getitem__(self, index: int) -> str:
        member = self.member(index).decode("utf-8", "surrogateescape")
        return f"{self.shards[self.shard_of[index]]}/{member}"


class TarShards(ImageFolderUnlabeled):
    """Every image member of a list of tar shards, without labels, by random access.

    Behaves like `ImageFolderUnlabeled` (it is one, with tar members instead of files):
    `dataset[i]` is `transform(load_rgb(member_i))`, an unreadable member (corrupt, or cut short
    by a truncated shard) is warned about, skipped and reported by `load`, and its name
    `'<shard path>/<member name>'` goes to the run's skipped_images.txt. A shard that is not a tar
    at all is warned about at indexing and left out (`self.bad_shards`).

    Each shard's members come from its index file (`<shard>.ummae-index`, see
    `ummae.data.shard_index`) when it has a fresh one, else from reading its tar headers. An
    index that is stale, corrupt or unreadable is warned about (once per shard, naming the
    command that rewrites it) and the shard's headers are read instead; `self.indexed` counts
    the shards whose index file was used.

    Order: shards in the order given, members in tar order; index i is stable as long as the
    shards are, which is what exact resume relies on. An index file lists the same members in
    the same order as the header scan, so i does not depend on whether a shard has one.
    """

    def __init__(self, spec: str | os.PathLike,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 loader: Callable[[io.BytesIO], torch.Tensor] | None = None) -> None:
        self.root = str(spec)
        self.transform = transform
        self.loader = loader
        self.skipped: set[str] = set()
        self.shards = find_shards(spec)
        self.bad_shards: list[str] = []
        tables: list[ShardIndex] = []
        self.indexed = 0
        for shard in self.shards:
            table = _fresh_index(shard)
            if table is not None:
                self.indexed += 1
            else:
                members, problem = _index_shard(shard)
                if problem is not None:
                    self.bad_shards.append(f"{shard}: {problem}")
                    warnings.warn(f"shard '{shard}' is damaged: {problem}", stacklevel=2)
                table = ShardIndex.from_members(members)
                # Entries just read from the shard itself: its reads need no check (head 0).
                table.heads = np.zeros(len(table), dtype=np.int64)
            tables.append(table)
        counts = [len(t) for t in tables]
        if not sum(counts):
            raise UmmaeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the {len(self.shards)} "
                             f"shard(s) of '{spec}'")
        # The table is numpy arrays, not Python objects: millions of entries stay compact, and
        # forked DataLoader workers share them.
        self._shard_of = np.repeat(np.arange(len(tables), dtype=np.int32), counts)
        self._offset = np.concatenate([t.offsets for t in tables])
        self._size = np.concatenate([t.sizes for t in tables])
        self._head = np.concatenate([t.heads for t in tables]).astype(np.int32)
        name_base = np.cumsum([0] + [len(t.names) for t in tables[:-1]])
        self.paths = _MemberNames(self.shards, self._shard_of, b"".join(t.names for t in tables),
                                  np.concatenate([t.name_ends + base for t, base in zip(tables, name_base)]))
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> open fd, least recent first

    def read_bytes(self, index: int) -> bytes:
        """The stored bytes of image `index` (e.g. the JPEG file), with one positional read.

        A member listed by an index file is read together with its tar header blocks (`head`
        bytes before the data, in the same `os.pread`), and they must be the member's: a valid
        checksum, its name and size (`_member_mismatch`). So an index that passed the load-time
        checks (`read_index`) but is wrong anyway never yields another member's bytes: the read
        raises UmmaeError, and the image is skipped and named like an unreadable one. Not
        rescanned and retried: every process must number the images alike (the seeded epoch
        order deals indices to ranks and workers), and one DataLoader worker that rescanned a
        changed shard mid-run would number its members on its own.
        """
        size, offset, head = int(self._size[index]), int(self._offset[index]), int(self._head[index])
        shard = int(self._shard_of[index])
        data = os.pread(self._fd(shard), size + head, offset - head)
        if len(data) < size + head:
            raise UmmaeError(f"cannot read image '{self.paths[index]}': shard truncated "
                             f"({max(len(data) - head, 0)} of {size} bytes)")
        if head:
            mismatch = _member_mismatch(data, head, self.paths.member(index), size)
            if mismatch:
                raise UmmaeError(f"cannot read image '{self.paths[index]}': the shard's index does not match "
                                 f"the shard ({mismatch}); rewrite it with: ummae shard-index --data "
                                 f"'{self.shards[shard]}'")
            data = data[head:]
        return data

    def _source(self, index: int) -> io.BytesIO:
        # The parent's skip-and-count loop decodes what this returns with the same `load_rgb`
        # (or crop loader) as files in a folder: here the member's bytes from the shard.
        try:
            data = self.read_bytes(index)
        except OSError as err:
            raise UmmaeError(f"cannot read image '{self.paths[index]}': {err}") from err
        buffer = io.BytesIO(data)
        buffer.name = self.paths[index]  # named in load_rgb's errors
        return buffer

    def _fd(self, shard: int) -> int:
        """An open file descriptor of shard `shard`, from a small per-process LRU cache. Forked
        DataLoader workers inherit the cache; `os.pread` keeps no shared file position, so that
        is safe."""
        fd = self._files.pop(shard, None)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY)
            if len(self._files) >= MAX_OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def __getstate__(self) -> dict:  # spawned workers open their own files
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def write_shards(data: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000,
                 prefix: str = "train", progress: bool = True, shrink=None) -> tuple[list[str], list[str]]:
    """Pack every image under folder `data` into tar shards `out/<prefix>-000000.tar`, ...

    Each readable image is stored under the key of its position in the sorted file list
    (`000000123.jpg`), `shard_size` images per shard, with WebDataset's own `ShardWriter`: as it
    is on disk (bytes unchanged), or, with `shrink` (`ummae.data.reencode.LongerSideAtMost` or
    `CropSafe`, `ummae shards --max-side`), as `ummae.data.reencode.stored_image` decides: a
    smaller upright JPEG if `shrink` says it is too large, a JPEG of its own size if its format
    decodes slower than one (PNG, WebP, ...), else its bytes. The key stays the file's position
    either way, so the shards hold the folder's images in the folder's order. Every file is
    decoded once first, so that unreadable ones are left out (and listed) instead of failing a
    training run later.

    Every shard gets its index file (`<shard>.ummae-index`, `ummae.data.shard_index`) too.

    Returns `(shard paths, unreadable files with the reason)`. Raises UmmaeError if `data` holds no
    images, none is readable, or `out` already holds shards.
    """
    from ummae.data.folder import find_images
    from ummae.data.reencode import stored_image
    from ummae.engine.progress import progress_mode, track

    wds = require_webdataset()
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
    files = find_images(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.tar")):
        raise UmmaeError(f"'{out}' already holds {prefix}-*.tar shards; choose an empty --out")
    unreadable: list[str] = []
    written = 0
    # A whole-second mtime: with WebDataset's default (the fractional time.time()) every member
    # gets a second, pax header just for it, which makes shards bigger and indexing slower.
    try:
        with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0,
                             mtime=int(time.time())) as sink:
            for number, path in enumerate(track(files, "shards", progress_mode(progress), unit="img")):
                try:
                    field, stored = stored_image(path, shrink)
                except UmmaeError as err:
                    unreadable.append(str(err))
                    continue
                # WebDataset fields are the extension without the dot; `jpeg` and `jpg` are both fine.
                sink.write({"__key__": f"{number:09d}", field: stored})
                written += 1
    except OSError as e:
        # A full disk (or a folder gone read-only) mid-way: no half-written shard, and no set
        # of shards that silently lacks the rest of the images, is left behind.
        for shard in out.glob(f"{prefix}-*.tar"):
            shard.unlink(missing_ok=True)
        raise UmmaeError(f"--out: cannot write shards to '{out}': {e.strerror or e} (the shards written "
                         f"so far were removed)") from None
    shards = sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))
    if written == 0:
        for shard in shards:
            os.remove(shard)
        raise UmmaeError(f"none of the {len(files)} images under '{data}' could be read")
    _index_written(shards)
    return shards, unreadable


def _index_written(shards: list[str]) -> None:
    """An index file next to each shard just written, so that start-up reads it instead of the
    tar headers. A failure is a warning, not an error: the shards are complete without it."""
    for shard in shards:
        try:
            problem = index_shard(shard)
            failure = problem and f"no index written for shard '{shard}' ({problem})"
        except UmmaeError as err:
            failure = str(err)
        if failure:
            warnings.warn(f"{failure}; its tar headers are read at start-up instead (retry with: "
                          f"ummae shard-index --data '{shard}')", stacklevel=3)
