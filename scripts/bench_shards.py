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
it does not depend on the storage). It also times building the shards' index (tar headers only).
The files are in the page cache after the first round, so this measures the readers' own cost,
not a disk or a network file system.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

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
