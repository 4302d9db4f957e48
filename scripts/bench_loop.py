"""The whole pre-training loop, measured: `ummae pretrain` end to end with the real data loader,
against the synthetic `ummae bench` step of the same preset and batch, on this machine.

    python scripts/bench_loop.py --work /tmp/bench_loop --json docs/bench/loop_cpu.json

For each preset (default: the demo preset `ummae_swin_demo`, 128 px, and `ummae_swin_tiny_256`)
it trains from camera-size JPEGs (2000x1500, made from the demo photographs: cover-resized,
Gaussian grain, quality 90, a different grain and mirror per copy so no two files are the same
bytes) stored three ways:

    folder      the JPEG files themselves
    shards      `ummae shards` of the folder (bytes unchanged)
    reencoded   `ummae shards --max-side auto --preset P` (re-encoded to the size P's crops need;
                skipped, with a note, where this ummae has no --max-side)

with 0, 1 and 2 DataLoader workers (`--workers`), `data.decode=fast` (and `gpu`, which on a
CPU decodes in the training process: what it costs without a GPU; `--decodes`). Each run is a
fresh process of `--steps` optimizer steps of one batch each (`--accum-steps 1`); its rate is the median `images_per_sec` of its logged windows
after the first (start-up, first batches), and its CPU time per image (the process tree's user +
system time over the whole run, start-up included) is recorded beside. The synthetic rate is `ummae bench` of the
same preset, batch and device (fixed random images: no data loading at all), measured in the
same session. `loop_over_synthetic` near 1 means the loader keeps up.

On a 2-core machine the workers share the 2 cores with the model's threads (the CLI fits the
threads to what the workers leave: `ummae.engine.cpus`), so more workers is not more CPU; the
figures say where the time goes on such a machine, and the per-core rates of
scripts/bench_loader.py say what a GPU server's cores would deliver.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import grainy_cover  # noqa: E402
PRESETS = {"ummae_swin_demo": 16, "ummae_swin_tiny_256": 8}  # preset -> batch size


def make_camera_jpegs(folder: Path, count: int, size=(2000, 1500), noise: float = 3.0) -> Path:
    """`count` distinct JPEGs of `size` from the demo photographs (see the module docstring)."""
    from ummae.data import load_demo_images

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return folder
    photos, (width, height) = load_demo_images(), size
    for i in range(count):
        img = grainy_cover(photos[i % len(photos)], width, height, np.random.default_rng(i), noise)
        if (i // len(photos)) % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def ummae(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ummae", *args], capture_output=True, text=True, env=env, **kw)


def storages(work: Path, folder: Path, preset: str) -> dict[str, str | None]:
    """storage name -> `--data` value (None: this ummae cannot make it)."""
    shards = work / "shards"
    if not any(shards.glob("*.tar")):
        done = ummae("shards", "--data", str(folder), "--out", str(shards), "--shard-size", "50", "--no-progress")
        assert done.returncode == 0, done.stderr
    result = {"folder": str(folder), "shards": str(shards)}
    reencoded = work / f"reencoded_{preset}"
    if not any(reencoded.glob("*.tar")):
        done = ummae("shards", "--data", str(folder), "--out", str(reencoded), "--shard-size", "50",
                     "--max-side", "auto", "--preset", preset, "--no-progress")
        if done.returncode != 0:
            print(f"  (no re-encoded shards: {done.stderr.strip().splitlines()[-1]})", flush=True)
            return {**result, "reencoded": None}
    result["reencoded"] = str(reencoded)
    return result


def disk_bytes(data: str) -> int:
    path = Path(data)
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file() and f.suffix in (".jpg", ".tar"))


def run_loop(preset: str, data: str, workers: int, decode: str, batch: int, steps: int, out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = ummae("pretrain", "--preset", preset, "--data", data, "--out", str(out), "--batch-size", str(batch),
                 "--accum-steps", "1", "--max-steps", str(steps), "--workers", str(workers), "--device", "cpu", "--no-progress",
                 "--set", f"data.decode={decode}", "--set", "train.log_every=2", "--set", "train.save_every=0",
                 "--set", "train.vis_images=0")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    windows = [json.loads(line)["images_per_sec"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"images_per_s": statistics.median(windows[1:] or windows), "windows": windows,
            "wall_s": wall, "cpu_s": cpu, "cpu_s_per_image": cpu / (steps * batch)}


def synthetic(preset: str, batch: int, work: Path) -> float:
    path = work / f"bench_{preset}.json"
    done = ummae("bench", preset, "--batch-size", str(batch), "--steps", "5", "--warmup", "1", "--device", "cpu",
                 "--json", str(path))
    assert done.returncode == 0, done.stderr
    return json.loads(path.read_text())["results"][0]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the images, shards and runs")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--images", type=int, default=128, help="camera-size JPEGs to make")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--decodes", nargs="+", default=["fast"], choices=["fast", "plain", "gpu"])
    parser.add_argument("--batch-size", type=int, help="for every preset (default: the PRESETS table)")
    parser.add_argument("--size", default="2000x1500", help="the JPEGs' WIDTHxHEIGHT (default 2000x1500)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    size = tuple(int(v) for v in args.size.split("x"))
    folder = make_camera_jpegs(args.work / "jpegs", args.images, size)
    import torch
    from ummae.perf.bench import _device_name

    report = {"machine": f"{os.cpu_count()} CPUs, {_device_name(torch.device('cpu'))}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jpeg_size": list(size),
              "images": args.images, "steps": args.steps, "runs": [], "synthetic": {}, "disk_bytes": {}}
    for preset in args.presets:
        batch = args.batch_size or PRESETS[preset]
        report["synthetic"][preset] = rate = synthetic(preset, batch, args.work)
        print(f"{preset}, batch {batch}: synthetic step {rate:.1f} images/s", flush=True)
        for storage, data in storages(args.work, folder, preset).items():
            if data is None:
                continue
            report["disk_bytes"][f"{storage}:{preset}" if storage == "reencoded" else storage] = disk_bytes(data)
            for decode in args.decodes:
                for workers in args.workers:
                    run = run_loop(preset, data, workers, decode, batch, args.steps,
                                   args.work / "runs" / f"{preset}_{storage}_{decode}_{workers}")
                    run.update(preset=preset, storage=storage, decode=decode, workers=workers, batch=batch)
                    if "error" not in run:
                        run["loop_over_synthetic"] = run["images_per_s"] / rate
                        print(f"  {storage:9s} decode={decode:5s} workers={workers}: {run['images_per_s']:7.1f} "
                              f"images/s ({run['loop_over_synthetic']:.2f}x synthetic), "
                              f"{1000 * run['cpu_s_per_image']:.0f} CPU-ms/image", flush=True)
                    else:
                        print(f"  {storage:9s} decode={decode:5s} workers={workers}: {run['error']}", flush=True)
                    report["runs"].append(run)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
