"""Shards re-encoded to the size training needs (`ummae shards --max-side auto`) vs the original
photos: images/s per CPU core, bytes on disk, and what the crops lose. One command:

    python scripts/bench_reencode.py --json docs/bench/reencode_cpu.json     # ~5 CPU-minutes

For each size of scripts/bench_loader.py (500x375, 2000x1500, 4000x3000; the demo photographs
cover-resized, grain sigma 3, quality 90: `bench_loader.make_jpegs`), --photos files are written
as a folder, packed by `write_shards` as they are and re-encoded for --preset (`CropSafe`: the
smallest size at which no crop upsamples, 764x573 for a 4:3 photo at 256 px / scale 0.2), and:

- **speed**: a whole pre-training sample (seed, read, `CropDecoder` "fast" decode + crop + flip
  at the preset's img_size and scale; the mask is left out, it does not depend on the storage)
  from the folder, from the original shards and from the re-encoded shards (`TarShards`: one
  positional read), and from the re-encoded bytes at every --qualities (in memory), timed
  interleaved in CPU time of this one-thread process (`bench_loader.time_interleaved`), median of
  --rounds rounds;
- **bytes**: folder vs shards on disk, and bytes per re-encoded image at each quality;
- **what the crops lose**: the same crop box (drawn by torchvision's `RandomResizedCrop.get_params`
  on the original at a fixed scale, 0.2 / 0.5 / 1.0, aspect 3/4..4/3, then mapped to the shrunk
  image in float coordinates) taken from the re-encoded image and from the original, both fully
  decoded and resized to img_size by Pillow (bicubic, a float box: no rounding of the mapped
  box), mean absolute difference in grey levels (0-255) over --seeds boxes per photo. The box is
  mapped rather than redrawn because the same seed does NOT give the same relative box on the
  shrunk image: the size is relative, but `torch.randint` places it by a modulo of the range
  (the script prints how far apart the two boxes land). As the yardstick, the difference
  between the two decode paths of training on the original (`CropDecoder` "fast" vs "plain",
  same seed, so the same box), which training accepts by default.
- **write cost**: the two downscales that were weighed, per image: a full decode + LANCZOS,
  and the reduced-scale JPEG decode (draft to >= 2x the target) + LANCZOS that `stored_image`
  uses, with their difference.
- **other formats**: a whole sample from the 500x375 photos stored as PNG, WebP (Pillow's lossy
  default), BMP, TIFF and LZW TIFF instead of JPEG: is storing an image below the size as a JPEG
  worth it? (`reencoded_at_own_size` follows this.)
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import SIZES, make_jpegs, time_interleaved  # noqa: E402

from ummae.data import CropDecoder, ImageFolderUnlabeled, TarShards, load_rgb, write_shards  # noqa: E402
from ummae.data.reencode import CropSafe, encode_jpeg, shrink_image, stored_image  # noqa: E402
from ummae.data.sampling import seed_for  # noqa: E402
from ummae.data.transforms import CROP_RATIO  # noqa: E402

CROP_SCALES = (0.2, 0.5, 1.0)
# Formats a folder of photos may hold instead of JPEG, each saved with Pillow's defaults
# (WebP: lossy, quality 80; TIFF: uncompressed unless said).
OTHER_FORMATS = {"PNG": ("PNG", {}), "WebP": ("WEBP", {}), "BMP": ("BMP", {}), "TIFF": ("TIFF", {}),
                 "TIFF LZW": ("TIFF", {"compression": "tiff_lzw"})}


def _encoded(img: Image.Image, fmt: str, options: dict) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def sample_runs(decoder: CropDecoder, sources: dict) -> dict:
    """name -> function(index, key): one seeded sample from `sources[name]` (a dataset or a list
    of in-memory JPEGs)."""

    def seeded(get):
        def run(index, key):
            torch.manual_seed(seed_for(0, "augment", *key))
            return get(index)
        return run

    runs = {}
    for name, source in sources.items():
        if isinstance(source, ImageFolderUnlabeled):  # folder or shards: read + decode
            runs[name] = seeded(source.__getitem__)
        else:  # bytes in memory
            runs[name] = seeded(lambda i, source=source: decoder(io.BytesIO(source[i])))
    return runs


def crop_box(width: int, height: int, scale: float, seed: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a RandomResizedCrop box of area fraction `scale` drawn under `seed`."""
    torch.manual_seed(seed)
    stand_in = torch.empty(1, 1, 1).expand(1, height, width)
    top, left, h, w = T.RandomResizedCrop.get_params(stand_in, [scale, scale], list(CROP_RATIO))
    return left, top, left + w, top + h


def crop(img: Image.Image, box, img_size: int) -> np.ndarray:
    return np.asarray(img.resize((img_size, img_size), Image.Resampling.BICUBIC, box=box), dtype=np.float32)


def crop_losses(paths: list[Path], versions: dict, img_size: int, seeds: int) -> dict:
    """{version: {scale: mean |crop(version) - crop(original)|}} with mapped boxes (module docstring)."""
    result: dict = {name: {} for name in versions}
    for scale in CROP_SCALES:
        diffs: dict[str, list[float]] = {name: [] for name in versions}
        for k, path in enumerate(paths):
            original = load_rgb(path)
            shrunk = {name: load_rgb(io.BytesIO(data[k])) for name, data in versions.items()}
            for seed in range(seeds):
                box = crop_box(original.width, original.height, scale, seed)
                reference = crop(original, box, img_size)
                for name, img in shrunk.items():
                    fx, fy = img.width / original.width, img.height / original.height
                    mapped = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
                    diffs[name].append(float(np.abs(crop(img, mapped, img_size) - reference).mean()))
        for name in versions:
            result[name][scale] = statistics.mean(diffs[name])
    return result


def decode_path_loss(paths: list[Path], img_size: int, seeds: int) -> dict:
    """{scale: mean |fast - plain|} of CropDecoder on the originals, same seed (so the same box)."""
    result = {}
    for scale in CROP_SCALES:
        fast = CropDecoder(img_size, (scale, scale), hflip=False, decode="fast")
        plain = CropDecoder(img_size, (scale, scale), hflip=False, decode="plain")
        diffs = []
        for path in paths:
            for seed in range(seeds):
                torch.manual_seed(seed)
                a = fast(path).float()
                torch.manual_seed(seed)
                diffs.append(float((a - plain(path).float()).abs().mean()))
        result[scale] = statistics.mean(diffs)
    return result


def same_seed_offset(paths: list[Path], shrink: CropSafe, scale: float, seeds: int) -> float:
    """Mean distance (fraction of the image side) between the relative box positions the same
    seed draws on the original and on the shrunk size: not 0, so boxes must be mapped."""
    offsets = []
    for path in paths:
        with Image.open(path) as im:
            width, height = im.size
        small = shrink(width, height) or (width, height)
        for seed in range(seeds):
            a = crop_box(width, height, scale, seed)
            b = crop_box(*small, scale, seed)
            offsets.append(max(abs(a[0] / width - b[0] / small[0]), abs(a[1] / height - b[1] / small[1])))
    return statistics.mean(offsets)


def downscale_costs(paths: list[Path], shrink: CropSafe, rounds: int) -> dict:
    """ms per image and difference of the two downscales weighed for writing (module docstring)."""
    def full(path):
        img = load_rgb(path)
        return shrink_image(img, shrink(*img.size))

    def used(path):  # what stored_image does, without the encoding
        target = {}

        def draft(size):
            target["size"] = shrink(*size)
            return target["size"][0] * 2, target["size"][1] * 2
        return shrink_image(load_rgb(path, at_least=draft), target["size"])

    times: dict[str, list[float]] = {"full decode + LANCZOS": [], "draft >= 2x + LANCZOS (used)": []}
    for _ in range(rounds):
        for name, fn in zip(times, (full, used)):
            start = time.process_time()
            for path in paths:
                fn(path)
            times[name].append((time.process_time() - start) / len(paths) * 1e3)
    diff = statistics.mean(float(np.abs(np.asarray(full(p), dtype=np.float32) - np.asarray(used(p), dtype=np.float32)).mean())
                           for p in paths)
    return {"ms_per_image": {name: statistics.median(t) for name, t in times.items()}, "mean_abs_diff": diff}


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--photos", type=int, default=6, help="distinct photos per size")
    parser.add_argument("--noise", type=float, default=3.0, help="grain added before encoding (sigma)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8, help="crop boxes per photo and scale")
    parser.add_argument("--qualities", type=int, nargs="+", default=[85, 90, 95])
    parser.add_argument("--preset", default="ummae_swin_tiny_256", help="img_size and min_crop_scale")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ummae.presets import get_preset

    data_cfg = get_preset(args.preset).data
    img_size, min_scale = data_cfg.img_size, data_cfg.min_crop_scale
    shrink = CropSafe(img_size, min_scale)
    decoder = CropDecoder(img_size, (min_scale, 1.0), decode="fast")
    print(f"{args.preset}: {img_size} px crops, scale {min_scale}-1; --max-side auto: {shrink.describe()}")
    report = {"preset": args.preset, "img_size": img_size, "min_crop_scale": min_scale,
              "crop_safe_side": shrink.side, "torch": torch.__version__, "pillow": Image.__version__, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            width, height = SIZES[name]
            root = Path(tmp) / name
            (root / "folder").mkdir(parents=True)
            paths = make_jpegs(root / "folder", width, height, args.photos, args.noise)
            write_shards(root / "folder", root / "original", progress=False)
            write_shards(root / "folder", root / "auto", progress=False, shrink=shrink)
            small = shrink(width, height) or (width, height)
            # at each quality, if anything is shrunk (otherwise the files are stored as they are)
            encoded = {f"q{q}": [stored_image(p, shrink, quality=q)[1] for p in paths]
                       for q in args.qualities if small != (width, height)}
            sources = {"folder": ImageFolderUnlabeled(root / "folder", loader=decoder),
                       "shards, original": TarShards(root / "original", loader=decoder),
                       "shards, re-encoded (auto)": TarShards(root / "auto", loader=decoder)}
            sources.update({f"re-encoded {q} (in memory)": data for q, data in encoded.items()})
            if name == "imagenet":  # the same pixels in other formats: worth re-encoding below the size?
                for label, (fmt, options) in OTHER_FORMATS.items():
                    sources[f"{label} (in memory)"] = [_encoded(load_rgb(p), fmt, options) for p in paths]
            runs = sample_runs(decoder, sources)
            repeat = max(4, round(8 * 500 * 375 / (width * height)))
            # time_interleaved passes (path, key): here "path" is the index of the photo
            rates = time_interleaved(runs, list(range(len(paths))), args.rounds, repeat)
            stored = {"folder": folder_bytes(paths),
                      "shards, original": folder_bytes(list((root / "original").glob("*.tar"))),
                      "shards, re-encoded (auto)": folder_bytes(list((root / "auto").glob("*.tar")))}
            shrunk_only = [encode_jpeg(shrink_image(load_rgb(p), small), 100) for p in paths] if small != (width, height) else None
            versions = dict(encoded)
            entry = {"width": width, "height": height, "stored_size": list(small),
                     "bytes_per_image_as_stored": {run: statistics.mean(map(len, data)) for run, data in sources.items()
                                                   if isinstance(data, list)},
                     "images_per_s_per_core": rates, "bytes_on_disk": stored,
                     "bytes_per_image": {q: statistics.mean(map(len, data)) for q, data in encoded.items()},
                     "decode_path_loss_fast_vs_plain": decode_path_loss(paths, img_size, args.seeds)}
            if shrunk_only is not None:
                versions["shrunk, q100"] = shrunk_only  # ~the downscale alone, almost no encoding loss
                entry["crop_loss_vs_original"] = crop_losses(paths, versions, img_size, args.seeds)
                entry["same_seed_box_offset"] = same_seed_offset(paths, shrink, min_scale, args.seeds)
                entry["write_downscale"] = downscale_costs(paths, shrink, args.rounds)
            report["sizes"][name] = entry

            print(f"\n{name} {width}x{height} -> stored {small[0]}x{small[1]}, {args.photos} photos, 1 thread")
            base = rates["folder"]
            for run, rate in rates.items():
                print(f"  {run:32s} {rate:8.1f} img/s/core  {rate / base:5.2f}x folder")
            print("  bytes on disk: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in stored.items()))
            print("  bytes per re-encoded image: " + ", ".join(f"{q} {v / 1024:.0f} KiB"
                                                           for q, v in entry["bytes_per_image"].items()))
            print("  crop difference, grey levels, at scale " + "/".join(map(str, CROP_SCALES)) + ":")
            print("    fast vs plain decode of the original: "
                  + " / ".join(f"{v:.2f}" for v in entry["decode_path_loss_fast_vs_plain"].values()))
            for version, losses in entry.get("crop_loss_vs_original", {}).items():
                print(f"    {version:10s} vs original: " + " / ".join(f"{v:.2f}" for v in losses.values()))
            if "write_downscale" in entry:
                w = entry["write_downscale"]
                print("  write downscale: " + ", ".join(f"{k} {v:.1f} ms" for k, v in w["ms_per_image"].items())
                      + f"; differ by {w['mean_abs_diff']:.2f} grey levels")
                print(f"  same seed on the shrunk size: box position off by {entry['same_seed_box_offset']:.1%} "
                      f"of the side on average (so boxes are mapped, not redrawn)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
