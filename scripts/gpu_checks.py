"""One command for every GPU measurement of issue 14; writes one JSON (and prints a summary).

    python scripts/gpu_checks.py --out gpu_checks.json            # on a machine with a GPU
    python scripts/gpu_checks.py --smoke --out /tmp/smoke.json    # same code paths, CPU, demo presets

What it measures (each part is independent; a failing part is recorded with its error and the
others still run):
  matmul      the device's bf16 (CPU smoke: fp32) square-matmul FLOP/s, the MFU reference;
  grid        `ummae.perf.run_benchmark` per pair (UM-MAE vs its SimMIM / MAE baseline) at a
              realistic batch, eager and `torch.compile`d (masks drawn outside the compiled
              region, as the training loop does): images/s, MFU = achieved FLOP/s / matmul
              FLOP/s, peak memory (CUDA allocator), step-time ratios;
  profile     `ummae.perf.profile_step` of Swin-T UM-MAE (CPU and device time per
              component);
  torchrun    a 1-process `torchrun ... -m ummae pretrain` (NCCL on a GPU, gloo on CPU): the
              distributed code path end to end;
  loader      full-loop images/s of `ummae pretrain` from a folder of JPEGs (the demo
              photographs saved at ImageNet-like 500x375 and camera-like 2000x1500) with the
              real data loader, `data.decode=fast` (the workers decode) and `data.decode=gpu`
              (the workers read bytes, nvJPEG decodes the batch), next to the synthetic step's
              images/s at the same batch: is the loader the bottleneck? And the device decode
              alone (`ummae.data.decode_batch`, one batch), images/s;

  fsdp        scripts/bench_fsdp.py on one GPU (1 rank: FSDP shards nothing, so this is the
              activation-checkpointing effect): ViT-L and Swin-L UM-MAE at batch 32, plain vs
              checkpointed vs FSDP vs FSDP + checkpointed, allocator peak and step time (and the
              ratios to the plain model); then the largest batch that fits per preset, plain
              and checkpointed, by doubling from 8 until CUDA runs out of memory (every try a
              fresh process). `--parts fsdp`; not in the default, never run yet.

Nothing here is a test; tests/scripts/test_gpu_checks.py runs `--smoke`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ummae.perf import measure_matmul_flops, run_benchmark  # noqa: E402
from ummae.resolve import resolve_config  # noqa: E402
from ummae.models import build_pretrain_model  # noqa: E402

# (UM-MAE preset, its baseline, batch per step on one GPU) -- realistic: what fits an 80 GB card
# with room to spare in bf16 (the paper's runs use 256 per 8 GPUs x accumulation).
GRID = [
    ("ummae_swin_tiny_256", "simmim_swin_tiny_256", 128),
    ("ummae_pvt_small_256", "simmim_pvt_small_256", 128),
    ("ummae_vit_base_224", "mae_vit_base_224", 128),
    ("ummae_swin_large_256", "simmim_swin_large_256", 32),
]
SMOKE_GRID = [
    ("ummae_swin_demo", "simmim_swin_demo", 2),
    ("ummae_pvt_demo", "simmim_pvt_demo", 2),
    ("ummae_vit_demo", "mae_vit_demo", 2),
]
SMOKE_SETS = ["data.img_size=64"]  # the demo presets at 64 px: seconds per part on a CPU


class CompiledStep(torch.nn.Module):
    """A pre-training model whose forward (after the masks are drawn) is `torch.compile`d.

    Masks come from a CPU generator as in training, outside the compiled region; the encoder,
    decoder and loss are one graph (see tests/models/test_compile.py). FLOP counting
    (`FlopCounterMode`, a dispatch mode) runs the eager model.
    """

    def __init__(self, model: torch.nn.Module, **compile_kw):
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, **compile_kw)

    def sample_masks(self, *a, **kw):
        return self.model.sample_masks(*a, **kw)

    def forward_encoder(self, imgs, masks):
        return self.model.forward_encoder(imgs, masks)

    def forward(self, imgs, masks=None, generator=None):
        if masks is None:
            masks = self.model.sample_masks(imgs.shape[0], generator=generator, device=imgs.device)
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        if _get_current_dispatch_mode_stack():
            return self.model(imgs, masks)
        return self.compiled(imgs, masks)


def _part(results: dict, name: str, fn, log):
    log(f"== {name}")
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # recorded, the other parts still run
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        log(f"   failed: {type(e).__name__}: {e}")
    results.setdefault("seconds", {})[name] = time.perf_counter() - start


def _configs(names, sets, device):
    return [resolve_config(n, None, list(sets), {"train.device": device}) for n in names]


def grid_part(grid, sets, device, steps, warmup, compile_modes, log, backend="inductor"):
    rows = []
    for um, base, batch in grid:
        for mode in compile_modes:
            configs = _configs([um, base], sets, device)
            if mode == "eager":
                build = build_pretrain_model
            else:
                build = lambda cfg: CompiledStep(build_pretrain_model(cfg), backend=backend)  # noqa: E731
            on_cuda = device.startswith("cuda")
            log(f"   {um} vs {base}, batch {batch}, {mode}")
            report = run_benchmark(configs, batch_size=batch, steps=steps, warmup=warmup, device=device,
                                   measure_memory=on_cuda,  # CPU smoke: no child processes
                                   build_model=None if mode == "eager" else build, log=None)
            for r in report["results"]:
                rows.append({"mode": mode, "pair": [um, base], "preset": r["preset"], "batch_size": batch,
                             "images_per_s": r["images_per_s"], "step_time_s": r["step_time_s"],
                             "mfu": r["fraction_of_matmul"], "peak_memory_bytes": r["peak_memory_bytes"],
                             "train_flops_per_step": r["train_flops_per_step"],
                             "precision": r["precision"], "matmul_flops_per_s": report["matmul_flops_per_s"]})
            first, second = report["results"]
            rows[-1]["step_time_ratio_vs_ummae"] = second["step_time_s"] / first["step_time_s"]
    return rows


def profile_part(name, sets, device, batch):
    from ummae.perf import profile_step

    cfg = _configs([name], sets, device)[0]
    return profile_step(cfg, torch.device(device), batch, steps=3, warmup=1)


def torchrun_part(preset, sets, device, out_dir: Path):
    run_dir = out_dir / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "ummae", "pretrain", "--preset", preset, "--out", str(run_dir), "--max-steps", "4",
           "--batch-size", "4", "--device", "cuda" if device.startswith("cuda") else "cpu",
           "--set", "train.log_every=1", "--set", "train.save_every=0", "--set", "data.num_workers=0"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start, "steps_logged": len(lines),
            "backend": "nccl" if device.startswith("cuda") else "gloo",
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def _jpeg_folder(root: Path, count: int, size=(500, 375)) -> Path:
    from ummae.data.demo import load_demo_images

    folder = root / "jpegs" / "all"
    folder.mkdir(parents=True, exist_ok=True)
    photos = load_demo_images()
    for i in range(count):
        img = photos[i % len(photos)].convert("RGB").resize(size)
        if (i // len(photos)) % 2:
            img = img.transpose(0)  # a mirrored copy: different bytes, same statistics
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return folder.parent


def loader_part(preset, sets, device, batch, steps, workers, out_dir: Path, log, sizes=((500, 375),)):
    """Full-loop images/s of `ummae pretrain` per JPEG size and decode mode (`fast`: the workers
    decode; `gpu`: the workers read bytes, the training process decodes on the device), next to
    the synthetic step; and the device decode alone (`decode_batch` on one batch of the files)."""
    from ummae.data import EncodedCrop, collate_encoded, decode_batch
    from ummae.data.sampling import SeededSamples
    from ummae.data.folder import ImageFolderUnlabeled
    from ummae.engine.pretrain import pretrain

    synthetic = run_benchmark(_configs([preset], sets, device), batch_size=batch, steps=max(steps // 4, 2),
                              warmup=1, device=device, measure_memory=False)["results"][0]["images_per_s"]
    runs = []
    for size in sizes:
        data = _jpeg_folder(out_dir / f"{size[0]}x{size[1]}", max(batch * 4, 64), size)
        for decode in ("fast", "gpu"):
            log(f"   loader {size[0]}x{size[1]}, decode={decode}, {workers} workers, batch {batch}")
            cfg = resolve_config(preset, None, list(sets) + [
                f"data.num_workers={workers}", f"data.decode={decode}", "train.save_every=0",
                f"train.log_every={max(steps // 4, 1)}"],
                {"train.device": device, "train.batch_size": batch, "train.max_steps": steps,
                 "data.path": str(data), "train.out": str(out_dir / f"loader_{size[0]}_{decode}")})
            result = pretrain(cfg, progress=False)
            lines = [json.loads(line) for line in Path(result.metrics).read_text().splitlines()]
            steady = sorted(line["images_per_sec"] for line in lines[1:]) or [result.images_per_sec]
            loop = steady[len(steady) // 2]
            runs.append({"jpeg_size": list(size), "decode": decode, "full_loop_images_per_s": loop,
                         "full_loop_images_per_s_run_mean": result.images_per_sec,
                         "loop_over_synthetic": loop / synthetic, "cpu_decoded": result.cpu_decoded})
        # the device decode alone: one batch of these files, decoded, cropped, resized, flipped
        cfg = resolve_config(preset, None, list(sets))
        samples = SeededSamples(ImageFolderUnlabeled(data, loader=EncodedCrop(cfg.data.img_size)), 0)
        encoded = collate_encoded([samples[(0, i)] for i in range(batch)])["image"]
        encoded = encoded.pin_memory() if device.startswith("cuda") else encoded
        times = []
        for _ in range(4):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            decode_batch(encoded, cfg.data.img_size, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        runs.append({"jpeg_size": list(size), "decode": "device decode alone (decode_batch)",
                     "images_per_s": batch / sorted(times[1:])[len(times[1:]) // 2]})
    return {"preset": preset, "batch_size": batch, "workers": workers, "cpu_count": os.cpu_count(),
            "synthetic_step_images_per_s": synthetic, "runs": runs}


def fsdp_part(device: str, batch: int, steps: int, log, models=("vit_l", "swin_l"), search_cap=4096):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fsdp", ROOT / "scripts" / "bench_fsdp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, largest = [], []
    for model in models:
        runs = {}
        for variant in ("ddp", "ddp+ckpt", "fsdp", "fsdp+ckpt"):  # one rank: "ddp" is the plain model
            log(f"   {model} {variant}, batch {batch}")
            runs[variant] = r = bench.run_one(model, variant, 1, batch, steps, device, threads=4)
            rows.append(r)
        if all("error" not in r for r in runs.values()):
            plain = runs["ddp"]
            for variant, r in runs.items():
                r["peak_over_plain"] = r["peak_growth_max_bytes"] / plain["peak_growth_max_bytes"]
                r["step_time_over_plain"] = r["step_time_s"] / plain["step_time_s"]
        for variant in ("ddp", "ddp+ckpt"):
            largest.append(bench.largest_batch(model, variant, 1, min(steps, 3), device, 4, cap=search_cap,
                                               log=log))
    return {"batch": batch, "runs": rows, "largest_batch": largest}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="CPU, demo presets at 64 px, tiny batches: the same code paths in about a minute")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per preset (default 20; smoke 1)")
    p.add_argument("--parts", default="matmul,grid,profile,torchrun,loader",
                   help="comma-separated subset of: matmul, grid, profile, torchrun, loader, fsdp (GPU; not "
                        "in the default)")
    p.add_argument("--no-compile", action="store_true", help="eager only in the grid")
    args = p.parse_args(argv)

    smoke = args.smoke
    device = args.device or ("cpu" if smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_checks: no CUDA device; run with --smoke for the CPU dry run", file=sys.stderr)
        return 2
    grid = SMOKE_GRID if smoke else GRID
    sets = SMOKE_SETS if smoke else []
    steps = args.steps or (1 if smoke else 20)
    warmup = 1 if smoke else 3
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    parts = set(args.parts.split(","))
    out = Path(args.out)
    log = lambda m: print(f"gpu_checks: {m}", file=sys.stderr, flush=True)  # noqa: E731

    results: dict = {"smoke": smoke, "device": device, "torch": torch.__version__, "python": platform.python_version(),
                     "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor(),
                     "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        if "matmul" in parts:
            _part(results, "matmul", lambda: {"dtype": str(dtype), "flops_per_s": measure_matmul_flops(
                torch.device(device), dtype, 256 if smoke else 8192)}, log)
        if "grid" in parts:
            # The smoke run compiles with aot_eager: the same graph capture, without inductor's
            # minutes of C++ code generation on a CPU.
            _part(results, "grid", lambda: grid_part(grid, sets, device, steps, warmup, modes, log,
                                                     "aot_eager" if smoke else "inductor"), log)
        if "profile" in parts:
            _part(results, "profile", lambda: profile_part(grid[0][0], sets, device, 2 if smoke else 64), log)
        if "torchrun" in parts:
            _part(results, "torchrun", lambda: torchrun_part(grid[0][0], sets, device, tmp), log)
        if "loader" in parts:
            workers = 0 if smoke else min(os.cpu_count() or 1, 16)
            _part(results, "loader", lambda: loader_part(grid[0][0], sets, device, 4 if smoke else 128,
                                                         4 if smoke else 60, workers, tmp, log,
                                                         ((500, 375),) if smoke else ((500, 375), (2000, 1500))),
                  log)
        if "fsdp" in parts:
            _part(results, "fsdp", lambda: fsdp_part(device, 2 if smoke else 32, 2 if smoke else 10, log,
                                                     ("vit_b",) if smoke else ("vit_l", "swin_l"),
                                                     4 if smoke else 4096), log)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for row in results.get("grid", []) if isinstance(results.get("grid"), list) else []:
        log(f"{row['mode']:8s} {row['preset']:24s} {row['images_per_s']:9.1f} img/s  MFU {100 * row['mfu']:5.1f}%  "
            f"peak {(row['peak_memory_bytes'] or 0) / 2**30:.2f} GiB")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    log(f"wrote {out}" + (f"; failed parts: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
