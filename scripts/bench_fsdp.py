"""Peak memory per rank and step time: DDP vs FSDP vs FSDP + gradient checkpointing (issue 23).

    python scripts/bench_fsdp.py --out fsdp.json                      # ViT-L and Swin-L UM-MAE, CPU
    python scripts/bench_fsdp.py --models vit_b --ranks 1,2 --out x.json   # smaller, faster
    python scripts/bench_fsdp.py --summarize x.json     # the markdown table of docs/benchmarks.md

Each (model, strategy, ranks) is one fresh `torchrun` (gloo on CPU, NCCL on CUDA): the model is
built, wrapped as `ummae pretrain` wraps it (`engine.sharding`), and trained for `--steps`
optimizer steps of the very `engine.loop.TrainStep` on a fixed random batch. Per rank:
peak memory growth over the process before the model was built (CPU: peak RSS, VmHWM, after
the mark is reset; CUDA: the allocator's peak), and the median step time after one warm-up step.
The runs of one model are interleaved over `--repeats` rounds; the JSON holds every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {  # UM-MAE presets, with ViT-L/B as --set overrides of the ViT-B preset
    "vit_l": ("ummae_vit_base_224", ["model.embed_dim=1024", "model.depths=[24]", "model.num_heads=[16]"]),
    "vit_b": ("ummae_vit_base_224", []),
    "swin_l": ("ummae_swin_large_256", []),
    "swin_b": ("ummae_swin_large_256", ["model.embed_dim=128", "model.num_heads=[4,8,16,32]"]),
}
VARIANTS = {"ddp": ("ddp", False), "ddp+ckpt": ("ddp", True), "fsdp": ("fsdp", False), "fsdp+ckpt": ("fsdp", True)}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from ummae.engine.distributed import init_distributed
    from ummae.engine.guard import StepGuard
    from ummae.engine.loop import TrainStep
    from ummae.engine.optim import build_optimizer, build_scheduler
    from ummae.engine.sharding import enable_grad_checkpointing, wrap_for_training
    from ummae.models import build_pretrain_model
    from ummae.perf.bench import _peak_rss_bytes, _release_freed_memory, _reset_peak_rss
    from ummae.resolve import resolve_config

    preset, sets = MODELS[args.model]
    strategy, ckpt = VARIANTS[args.variant]
    cfg = resolve_config(preset, None, sets, {"train.device": args.device, "train.batch_size": args.batch})
    env, device = init_distributed(args.device, group_of_one=strategy == "fsdp")
    cuda = device.type == "cuda"
    _release_freed_memory()
    base = torch.cuda.memory_allocated(device) if cuda else _rss_bytes()
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).to(device)
    if ckpt:
        enable_grad_checkpointing(model, cfg.model.arch)
    bf16 = cuda and cfg.train.precision in ("auto", "bf16")
    train_model = wrap_for_training(model, strategy, env, device, bf16=bf16)
    opt = build_optimizer(model, 1e-4, 0.05, [0.9, 0.95], fused=True)
    sched = build_scheduler(opt, 1000, 0, 0.0)
    imgs = torch.randn(args.batch, 3, cfg.data.img_size, cfg.data.img_size,
                       generator=torch.Generator().manual_seed(1)).to(device)
    gen = torch.Generator().manual_seed(2)
    step = TrainStep(train_model, [p for p in model.parameters() if p.requires_grad], opt, sched,
                     torch.amp.GradScaler(device.type, enabled=False), StepGuard(device),
                     prepare=lambda x: ((x,), x.shape[0]), loss=lambda x: train_model(x, generator=gen)[0],
                     device=device, precision=cfg.train.precision, distributed=env.enabled or strategy == "fsdp")
    # The peak is the training's: building and sharding the model (FSDP briefly holds both the
    # full and the sharded parameters) happens before the mark is reset.
    _release_freed_memory()
    state_built = (torch.cuda.memory_allocated(device) if cuda else _rss_bytes()) - base
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    times = []
    for i in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(iter((imgs,)), i)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
    _release_freed_memory()
    after = (torch.cuda.memory_allocated(device) if cuda else _rss_bytes()) - base
    row = {"rank": env.rank, "peak_growth_bytes": peak - base, "step_time_s": statistics.median(times[1:]),
           "step_times_s": times, "built_growth_bytes": state_built, "after_steps_growth_bytes": after,
           "params": sum(p.numel() for p in model.parameters())}
    rows = [None] * env.world_size
    if dist.is_initialized() and env.world_size > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if env.is_main:
        Path(args.result).write_text(json.dumps(rows))


def _rss_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmRSS in /proc/self/status")


def run_one(model: str, variant: str, ranks: int, batch: int, steps: int, device: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               __file__, "--worker", "--model", model, "--variant", variant, "--batch", str(batch),
               "--steps", str(steps), "--device", device, "--result", str(result)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode:
            return {"model": model, "variant": variant, "ranks": ranks, "batch_per_rank": batch,
                    "error": proc.stderr[-2000:]}
        rows = json.loads(result.read_text())
    return {"model": model, "variant": variant, "ranks": ranks, "batch_per_rank": batch, "per_rank": rows,
            "peak_growth_max_bytes": max(r["peak_growth_bytes"] for r in rows),
            "step_time_s": max(r["step_time_s"] for r in rows), "params": rows[0]["params"]}


def is_out_of_memory(run: dict) -> bool:
    """A failed `run_one` that ran out of device memory (CUDA's OOM error in the worker's stderr)."""
    error = run.get("error", "")
    return "OutOfMemoryError" in error or "out of memory" in error


def largest_batch(model: str, variant: str, ranks: int, steps: int, device: str, threads: int,
                  start: int = 8, cap: int = 4096, log=None) -> dict:
    """The largest batch per rank that trains, by doubling from `start` until a run runs out of
    memory (every try a fresh process). Between the largest that fits and the first that does not."""
    fits, batch, tries = None, min(start, cap), []
    while batch <= cap:
        r = run_one(model, variant, ranks, batch, steps, device, threads)
        tries.append(r)
        if log:
            log(f"   {model} {variant} batch {batch}: " + ("fits" if "error" not in r else
                                                          "out of memory" if is_out_of_memory(r) else "failed"))
        if "error" in r:
            break
        fits, batch = batch, batch * 2
    stop = tries[-1]
    return {"model": model, "variant": variant, "largest_fitting_batch": fits,
            "first_failing_batch": batch if "error" in stop else None,
            "failure_is_out_of_memory": is_out_of_memory(stop) if "error" in stop else None, "tries": tries}


def summarize(runs: list[dict]) -> str:
    """A markdown table per model: variant x ranks -> peak per rank at each batch, the state (the
    intercept of peak over batch, in bytes per parameter), activations per image (the slope), the
    resident state after the steps, and the step time over DDP's at the same ranks and batch."""
    ok = [r for r in runs if "error" not in r]
    out = []
    for model in dict.fromkeys(r["model"] for r in ok):
        mine = [r for r in ok if r["model"] == model]
        batches = sorted({r["batch_per_rank"] for r in mine})
        params = mine[0]["params"]
        cell = {}
        for r in mine:  # with --repeats: the median over rounds
            cell.setdefault((r["variant"], r["ranks"], r["batch_per_rank"]), []).append(r)
        med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
        out += [f"{model}: {params / 1e6:.1f}M parameters (encoder + decoder), batch per rank {batches}", "",
                "| variant | ranks | " + " | ".join(f"peak/rank b={b} (MiB)" for b in batches)
                + " | state (B/param) | activations (MiB/img) | resident after steps (B/param) | "
                + " | ".join(f"step / DDP b={b}" for b in batches) + " |",
                "|" + "---|" * (5 + 2 * len(batches))]
        for variant, ranks in dict.fromkeys((v, n) for v, n, _ in cell):
            rows = [cell.get((variant, ranks, b)) for b in batches]
            if not all(rows):
                continue
            peaks = [med(rs, lambda r: r["peak_growth_max_bytes"]) for rs in rows]
            slope = (peaks[-1] - peaks[0]) / (batches[-1] - batches[0]) if len(batches) > 1 else float("nan")
            state = peaks[0] - slope * batches[0]
            after = med(rows[0], lambda r: max(x["after_steps_growth_bytes"] for x in r["per_rank"]))
            ratios = []
            for b, rs in zip(batches, rows):
                ddp = cell.get(("ddp", ranks, b))
                ratios.append(med(rs, lambda r: r["step_time_s"]) / med(ddp, lambda r: r["step_time_s"])
                              if ddp else float("nan"))
            out.append(f"| {variant} | {ranks} | " + " | ".join(f"{p / 2**20:.0f}" for p in peaks)
                       + f" | {state / params:.1f} | {slope / 2**20:.0f} | {after / params:.1f} | "
                       + " | ".join(f"{x:.2f}" for x in ratios) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--models", default="vit_l,swin_l")
    p.add_argument("--variants", default="ddp,fsdp,fsdp+ckpt")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--batch", type=int, default=1, help="images per rank (the worker's)")
    p.add_argument("--batches", default=None,
                   help="images per rank, comma-separated (default --batch); two or more separate the "
                        "training state (the intercept) from the activations (the slope per image)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--summarize", metavar="JSON", nargs="+", help="print the tables of written JSON files")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        from ummae.engine.distributed import shutdown_distributed

        worker(args)
        shutdown_distributed()  # after worker's frame (the model, the optimizer) is gone: frees the group now
        return 0
    if args.summarize:
        print("\n".join(summarize(json.loads(Path(f).read_text())["runs"]) for f in args.summarize))
        return 0
    import platform

    import torch

    from ummae.perf.bench import _device_name

    batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
    runs = []
    meta = {"command": " ".join(["python", "scripts/bench_fsdp.py"] + (sys.argv[1:] if argv is None else list(argv))),
            "cpu": _device_name(torch.device("cpu")), "torch": torch.__version__, "python": platform.python_version(),
            "threads_per_rank": args.threads, "steps": args.steps,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "peak_memory_method": "per rank = per process; CPU: peak RSS (VmHWM) over the training steps, "
                                  "the mark reset (clear_refs 5) after the model, its wrapping and the "
                                  "optimizer were built, minus the RSS before the model was built; CUDA: "
                                  "max_memory_allocated minus memory_allocated before the model",
            "step_time": "median of the steps after one warm-up; max over ranks", "runs": runs}
    for model in args.models.split(","):
        for _ in range(args.repeats):  # interleaved: every variant once per round
            for ranks, batch, variant in [(r, b, v) for r in map(int, args.ranks.split(",")) for b in batches
                                          for v in args.variants.split(",")]:
                r = run_one(model, variant, ranks, batch, args.steps, args.device, args.threads)
                runs.append(r)
                if args.out:  # after every run: a long sweep cut short keeps what it measured
                    Path(args.out).write_text(json.dumps(meta, indent=1) + "\n")
                if "error" in r:
                    print(f"bench_fsdp: {model} {variant} x{ranks} failed: {r['error'][-300:]}", file=sys.stderr)
                else:
                    print(f"bench_fsdp: {model:7s} {variant:10s} ranks {ranks} batch {batch}  peak/rank "
                          f"{r['peak_growth_max_bytes'] / 2**20:8.0f} MiB  step {r['step_time_s']:.2f} s",
                          file=sys.stderr, flush=True)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
