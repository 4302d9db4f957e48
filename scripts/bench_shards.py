"""Images/s of ONE data-loading process (what each DataLoader worker does) from tar shards vs from
the same images as a folder, for docs/benchmarks.md.

    python scripts/bench_shards.py /tmp/bench_shards --images 600 --shard-size 100 --rounds 5

Makes `--images` JPEGs of ImageNet-like size (500x375, quality 90, crops of the demo photographs)
in DIR/folder, packs them with `ummae shards` into DIR/shards, then times, INTERLEAVED round by
round so machine noise hits every reader alike:

    folder     ImageFolderUnlabeled: one file per image, in the epoch's seeded random order
    shards     TarShards: one positional read per image in the shards, same random order (ummae's reader)
    wds-stream webdataset.WebDataset: shards streamed in order (no shuffle), the reader ummae did not pick

each two ways: `bytes` (reading the stored image only) and `sample` (bytes + decode + the
pre-training random-resized crop to 224 px, i.e. a whole training sample; the mask is left out as
it does not depend on the storage). It also times building the shards' table at start-up (from the
index files `ummae shards` writes; `--startup` compares that with reading every tar header).
The files are in the page cache after the first round, so this measures the readers' own cost,
not a disk or a network file system.

With `--startup`, instead: what a process pays at start-up, constructing `TarShards`, for a data
set of ImageNet-1K's size, by reading every member's tar header (no index files) vs by reading
the index files `ummae shards` / `ummae shard-index` write next to the shards:

    python scripts/bench_shards.py /tmp/bench_index --startup --startup-shards 256 \\
        --startup-members 5000 --rounds 3 --json docs/bench/shard_index_cpu.json

The set is synthetic (`--startup-shards` x `--startup-members` members of 16 bytes each, written
with tarfile as ustar, whole-second mtimes, as `ummae shards` writes them): the index's cost
depends on the member count, not on the image bytes. Each way is timed in CPU time and wall time,
interleaved round by round, with the page cache warm and "cold-ish" (every shard's and index's
pages evicted with posix_fadvise(DONTNEED) first; a virtual machine's host may still cache them).
With the members this small the scan's header reads are nearly sequential, so the cold scan here
is a lower bound of a real one, whose headers lie ~110 KB apart. Delete DIR afterwards (~1.3 GB
for 256 x 5000).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int) -> None:
    from ummae.data import load_demo_images

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return
    photos = [p for p in load_demo_images() if min(p.size) >= 300]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((x, y, x + side, y + side * 3 // 4)).resize((500, 375), Image.BICUBIC)
        crop.save(folder / f"{i:06d}.jpg", quality=90)


def make_member_shards(folder: Path, shards: int, members: int) -> list[str]:
    """`shards` tar shards of `members` 16-byte `.jpg` members each, keyed as `ummae shards` keys
    them, without index files; kept when already there."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"train-{k:06d}.tar") for k in range(shards)]
    data = bytes(16)
    for k, path in enumerate(paths):
        if Path(path).is_file():
            continue
        with tarfile.open(path + ".partial", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(members):
                info = tarfile.TarInfo(f"{k * members + i:09d}.jpg")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
        Path(path + ".partial").rename(path)
    return paths


def _evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (clean pages only, which these are)."""
    import os

    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_startup(args) -> dict:
    """Start-up by scanning the tar headers vs by reading the index files (see the docstring)."""
    import contextlib
    import os
    import platform

    import ummae.data.shards as shards_module
    from ummae.data import TarShards
    from ummae.data.shard_index import index_path
    from ummae.data.shards import index_shards

    folder = args.dir / "member_shards"
    t0 = time.perf_counter()
    paths = make_member_shards(folder, args.startup_shards, args.startup_members)
    print(f"shards ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for path in paths:  # the first `shard-index` below times writing every index
        Path(index_path(path)).unlink(missing_ok=True)
    c0, w0 = time.process_time(), time.perf_counter()
    written, _, problems = index_shards(str(folder), progress=False)
    write_cpu, write_wall = time.process_time() - c0, time.perf_counter() - w0
    assert written == len(paths) and not problems
    indexes = [index_path(p) for p in paths]
    members = args.startup_shards * args.startup_members

    @contextlib.contextmanager
    def without_indexes():  # as if there were none: TarShards reads every tar header, as before
        real = shards_module.read_index
        shards_module.read_index = lambda shard: None
        try:
            yield
        finally:
            shards_module.read_index = real

    def construct(scan: bool) -> TarShards:
        with without_indexes() if scan else contextlib.nullcontext():
            dataset = TarShards(str(folder))
        assert len(dataset) == members and dataset.indexed == (0 if scan else len(paths))
        return dataset

    ways = {f"{how}/{cache}": (how == "scan", cache == "cold") for how in ("scan", "index") for cache in ("warm", "cold")}
    cpu = {name: [] for name in ways}
    wall = {name: [] for name in ways}
    reference = construct(scan=True)  # warm-up; and every way must give the same table
    for r in range(args.rounds):
        for name, (scan, cold) in ways.items():
            if cold:
                _evict(paths + indexes)
            c0, w0 = time.process_time(), time.perf_counter()
            dataset = construct(scan)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
            assert np.array_equal(dataset._offset, reference._offset) and np.array_equal(dataset._size, reference._size)
            del dataset
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {cpu[n][-1]:.2f} s cpu" for n in ways), file=sys.stderr)

    def med(values):
        return statistics.median(values)

    return {"what": "TarShards start-up: every member's tar header vs the index files", "cpu": _cpu_name(),
            "cores": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0], "python": platform.python_version(),
            "numpy": np.__version__, "shards": len(paths), "members_per_shard": args.startup_members,
            "members": members, "rounds": args.rounds,
            "shard_bytes_total": sum(os.path.getsize(p) for p in paths),
            "index_bytes_total": sum(os.path.getsize(p) for p in indexes),
            "index_bytes_per_member": sum(os.path.getsize(p) for p in indexes) / members,
            "write_indexes_cpu_s": write_cpu, "write_indexes_wall_s": write_wall,
            "cpu_s_median": {n: med(v) for n, v in cpu.items()},
            "cpu_s_min_max": {n: [min(v), max(v)] for n, v in cpu.items()},
            "wall_s_median": {n: med(v) for n, v in wall.items()},
            "wall_s_min_max": {n: [min(v), max(v)] for n, v in wall.items()},
            "members_per_cpu_s": {n: members / med(v) for n, v in cpu.items()},
            "speedup_cpu": {c: med(cpu[f"scan/{c}"]) / med(cpu[f"index/{c}"]) for c in ("warm", "cold")},
            "speedup_wall": {c: med(wall[f"scan/{c}"]) / med(wall[f"index/{c}"]) for c in ("warm", "cold")}}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--startup", action="store_true",
                        help="time start-up (header scan vs index files) instead of the readers")
    parser.add_argument("--startup-shards", type=int, default=256)
    parser.add_argument("--startup-members", type=int, default=5000)
    args = parser.parse_args()
    if args.startup:
        result = bench_startup(args)
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return

    import torch

    try:
        import webdataset as wds
    except ImportError:  # an optional dependency: one line saying how to get it, not a traceback
        sys.exit("bench_shards.py: tar shards need webdataset, which is not installed: pip install 'ummae[shards]' "
                 "(or pip install webdataset)")

    from ummae.data import ImageFolderUnlabeled, TarShards, load_rgb, pretrain_transform, write_shards
    from ummae.data.sampling import EpochSampler

    torch.set_num_threads(1)  # a DataLoader worker runs its transforms on one thread
    folder, shard_dir = args.dir / "folder", args.dir / "shards"
    make_images(folder, args.images)
    if not list(shard_dir.glob("*.tar")):
        write_shards(folder, shard_dir, args.shard_size, progress=False)
    transform = pretrain_transform(224)
    folder_ds = ImageFolderUnlabeled(folder, transform)
    index_times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        shard_ds = TarShards(shard_dir, transform)
        index_times.append(time.perf_counter() - t0)
    pattern = str(shard_dir / "train-*.tar")
    shard_files = sorted(str(p) for p in shard_dir.glob("train-*.tar"))
    assert len(shard_ds) == len(folder_ds) == args.images

    def order(epoch: int) -> list[int]:
        sampler = EpochSampler(args.images, seed=0)
        sampler.set_epoch(epoch)
        return [i for _, i in sampler]

    def folder_bytes(epoch):
        for i in order(epoch):
            folder_ds.paths[i].read_bytes()

    def shards_bytes(epoch):
        for i in order(epoch):
            shard_ds.read_bytes(i)

    def wds_bytes(epoch):
        for _ in wds.WebDataset(shard_files, shardshuffle=False):
            pass

    def folder_sample(epoch):
        for i in order(epoch):
            folder_ds[i]

    def shards_sample(epoch):
        for i in order(epoch):
            shard_ds[i]

    def wds_sample(epoch):
        for s in wds.WebDataset(shard_files, shardshuffle=False):
            transform(load_rgb(io.BytesIO(s["jpg"])))

    readers = {"folder/bytes": folder_bytes, "shards/bytes": shards_bytes, "wds-stream/bytes": wds_bytes,
               "folder/sample": folder_sample, "shards/sample": shards_sample, "wds-stream/sample": wds_sample}
    times = {name: [] for name in readers}
    for name, fn in readers.items():  # warm-up: page cache, imports
        fn(0)
    for r in range(args.rounds):
        for name, fn in readers.items():
            t0 = time.perf_counter()
            fn(r + 1)
            times[name].append(time.perf_counter() - t0)
    result = {"images": args.images, "shards": len(shard_files), "pattern": pattern,
              "index_s_median": statistics.median(index_times),
              "index_members_per_s": args.images / statistics.median(index_times),
              "images_per_s": {name: args.images / statistics.median(t) for name, t in times.items()},
              "images_per_s_min_max": {name: [args.images / max(t), args.images / min(t)] for name, t in times.items()}}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
