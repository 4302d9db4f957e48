"""Pre-training data loader throughput, images/s per CPU core, on real JPEGs: one command.

    python scripts/bench_loader.py                      # all sizes, ~2-4 min on a loaded 2-core box
    python scripts/bench_loader.py --json docs/bench/loader_cpu.json

What one sample costs is what one DataLoader worker does per sample (`SeededSamples`): seed the
generator, decode the file, random-resized crop to img_size (bicubic), flip, convert to a tensor,
draw the sample's mask. Timed in one process on one thread (`torch.set_num_threads(1)`), so the
rate is per core; a loader with W workers on W free cores does about W times that.

The JPEGs are made from the scikit-image demo photographs (`ummae.data.load_demo_images`): each
photo is cover-resized (bicubic) to the target size, given a little Gaussian noise (sigma
--noise, as sensor grain: an upscaled photo alone is unrealistically smooth and decodes faster)
and saved at quality 90. File sizes (bytes per pixel) are printed so this can be judged.

Pipelines, timed interleaved (round-robin, median of --rounds rounds over all files), in CPU
time of this one-thread process, so that other programs on a shared machine do not count:
    old          the loader before data.decode existed (commit a7d1fb4): full decode, EXIF
                 transpose into a copy, pretrain_transform (normalised float)
    plain-float  load_rgb (full decode, no copy) + pretrain_transform (normalised float)
    plain-uint8  load_rgb (full decode) + pretrain_crop (uint8; normalised on the device)
    fast-uint8   CropDecoder(decode="fast"): box first, JPEG decoded at 1/2..1/8 scale
    gpu-worker   EncodedCrop (data.decode=gpu): what is left to a worker when the training process
                 decodes on the GPU: read the file, read the JPEG header, draw box and flip
And, to see where time goes, decode alone (full size) with Pillow, torchvision.io.decode_jpeg
and, if installed, simplejpeg; and mask drawing alone.

The GPU line: cores needed = (GPU images/s) / (images/s per core), with the GPU rate ESTIMATED
from the preset's training FLOPs per image (counted by `ummae.perf.count_flops`) at an assumed
MFU of H200 bf16 dense peak (--gpu-tflops 790, --mfu 0.4). Nothing here runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ummae.data import CropDecoder, EncodedCrop, load_demo_images, load_rgb, pretrain_crop, pretrain_transform
from ummae.data.sampling import draw_masks, seed_for, seeded_draws

SIZES = {"imagenet": (500, 375), "camera": (2000, 1500), "camera-12mp": (4000, 3000)}


def grainy_cover(photo: Image.Image, width: int, height: int, rng: np.random.Generator,
                 noise: float) -> Image.Image:
    """`photo` cover-resized (bicubic) and centre-cropped to width x height, with Gaussian grain
    of sigma `noise` drawn from `rng` (see the module docstring)."""
    s = max(width / photo.width, height / photo.height)
    big = photo.resize((round(photo.width * s), round(photo.height * s)), Image.Resampling.BICUBIC)
    left, top = (big.width - width) // 2, (big.height - height) // 2
    pixels = np.asarray(big.crop((left, top, left + width, top + height)), dtype=np.float32)
    return Image.fromarray(np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 255).astype(np.uint8))


def make_jpegs(folder: Path, width: int, height: int, count: int, noise: float) -> list[Path]:
    """`count` JPEGs of width x height from the demo photographs (see the module docstring)."""
    rng = np.random.default_rng(0)
    paths = []
    for k, photo in enumerate(load_demo_images()[:count]):
        path = folder / f"{width}x{height}_{k}.jpg"
        grainy_cover(photo, width, height, rng, noise).save(path, quality=90)
        paths.append(path)
    return paths


def load_rgb_before(path: Path) -> Image.Image:
    """`load_rgb` as it was before data.decode existed (commit a7d1fb4), for RGB JPEGs: the same
    decode, then `ImageOps.exif_transpose` into a copy of the whole image."""
    with Image.open(path) as opened:
        opened.load()
        upright = ImageOps.exif_transpose(opened)
    return upright if upright.mode == "RGB" else upright.convert("RGB")


def pipelines(img_size: int, masking) -> dict:
    """name -> function(path, key) doing one sample's work; key = (epoch, index) seeds it."""
    old = pretrain_transform(img_size)
    crop = pretrain_crop(img_size)
    fast = CropDecoder(img_size, decode="fast")

    def sample(make):
        def run(path, key):
            with seeded_draws(seed_for(0, "augment", *key)):  # as SeededSamples seeds a worker's sample
                image = make(path)
            if masking is not None:
                draw_masks(masking, 0, key[0], [key[1]])
            return image
        return run

    runs = {
        "old": sample(lambda p: old(load_rgb_before(p))),
        "plain-float": sample(lambda p: old(load_rgb(p))),
        "plain-uint8": sample(lambda p: crop(load_rgb(p))),
        "fast-uint8": sample(fast),
        "gpu-worker": sample(EncodedCrop(img_size)),
    }
    if masking is not None:
        runs["mask only"] = lambda path, key: draw_masks(masking, 0, key[0], [key[1]])
    return runs


def decoders() -> dict:
    """name -> function(path, key): full-size decode alone (key unused), for the breakdown."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    def pil(path, key):
        with Image.open(path) as im:
            im.load()

    runs = {"decode: Pillow": pil,
            "decode: torchvision.io": lambda p, key: decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB)}
    try:
        import simplejpeg
    except ImportError:
        print("(simplejpeg not installed: pip install simplejpeg to time it too)")
    else:
        runs["decode: simplejpeg"] = lambda p, key: simplejpeg.decode_jpeg(Path(p).read_bytes())
        runs["decode: simplejpeg fastdct"] = lambda p, key: simplejpeg.decode_jpeg(
            Path(p).read_bytes(), fastdct=True, fastupsample=True)
    return runs


def time_interleaved(runs: dict, paths: list[Path], rounds: int, repeat: int) -> dict:
    """Median images/s of each run, rounds interleaved so that load changes hit all alike.

    Time is this process's CPU time (`time.process_time`): with one thread that is the work one
    core does, and other programs sharing the machine do not count against it (wall-clock
    rates are lower whenever the core is shared)."""
    keys = [(r, i) for r in range(repeat) for i in range(len(paths))]
    for run in runs.values():  # warm-up: imports, caches
        run(paths[0], (0, 0))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(rounds):
        for name, run in runs.items():
            start = time.process_time()
            for epoch, index in keys:
                run(paths[index], (rnd * repeat + epoch, index))
            rates[name].append(len(keys) / (time.process_time() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def gpu_estimate(preset: str, gpu_tflops: float, mfu: float) -> dict:
    """Estimated GPU images/s of `preset`'s training step from its FLOPs (counted on CPU)."""
    from ummae.perf import count_flops
    from ummae.resolve import resolve_config
    from ummae.models import build_pretrain_model

    cfg = resolve_config(preset)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    imgs = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size)
    flops = count_flops(model, imgs)["train_step"] / 2
    return {"preset": preset, "img_size": cfg.data.img_size, "train_flops_per_image": flops,
            "gpu_tflops": gpu_tflops, "mfu": mfu,
            "images_per_s": gpu_tflops * 1e12 * mfu / flops, "masking": model.masking}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--photos", type=int, default=6, help="distinct photos per size")
    parser.add_argument("--noise", type=float, default=3.0, help="grain added before encoding (sigma)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="ummae_swin_tiny_256", help="model for the mask and GPU estimate")
    parser.add_argument("--gpu-tflops", type=float, default=790.0, help="GPU bf16 dense peak (H200: ~790)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
    parser.add_argument("--only", nargs="+", metavar="PIPELINE",
                        help="time only these pipelines (names as printed), e.g. fast-uint8 gpu-worker")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    gpu = gpu_estimate(args.preset, args.gpu_tflops, args.mfu)
    masking = gpu.pop("masking")
    print(f"{args.preset}: {gpu['train_flops_per_image'] / 1e9:.1f} GFLOP per training image; at "
          f"{args.mfu:.0%} MFU of {args.gpu_tflops:.0f} TFLOP/s: ~{gpu['images_per_s']:.0f} images/s (ESTIMATE)")
    report = {"gpu_estimate": gpu, "torch": torch.__version__, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            width, height = SIZES[name]
            paths = make_jpegs(Path(tmp), width, height, args.photos, args.noise)
            bpp = statistics.mean(p.stat().st_size for p in paths) / (width * height)
            repeat = max(1, round(4 * 500 * 375 / (width * height)))  # >= 4 rounds of work at 500x375
            runs = {**pipelines(gpu["img_size"], masking), **decoders()}
            if args.only:
                runs = {name: run for name, run in runs.items() if name in args.only}
            rates = time_interleaved(runs, paths, args.rounds, repeat)
            base = rates.get("old", next(iter(rates.values())))
            print(f"\n{name} {width}x{height}, {bpp:.2f} bytes/pixel, crop {gpu['img_size']}px, 1 thread")
            print(f"{'pipeline':28s} {'img/s/core':>10s} {'vs ' + next(iter(rates))[:5]:>7s} {'cores for GPU':>13s}")
            for run, rate in rates.items():
                cores = gpu["images_per_s"] / rate
                print(f"{run:28s} {rate:10.1f} {rate / base:6.2f}x {cores:13.0f}")
            report["sizes"][name] = {"width": width, "height": height, "bytes_per_pixel": bpp,
                                     "images_per_s_per_core": rates}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
