"""Side-by-side benchmark of full training steps of several configurations (`ummae bench`).

A timed step is the very optimizer step `ummae pretrain` runs (`engine.loop.TrainStep`), for one
batch without gradient accumulation: masks drawn by the model (seeded generator), forward under
the training autocast (bf16 on CUDA, fp32 on CPU with `train.precision: auto`), the loss, the
non-finite guard's loss factor, backward through the grad scaler, gradient clipping if
`optim.clip_grad` is set, the guarded step of fused AdamW (the device-side finite checks of the
gradients and of the updated weights included, `engine.guard`), `zero_grad` and the lr
scheduler's update. There is no data loader: every configuration trains on one fixed batch of
random normal images of its `data.img_size`, so the numbers are those of the model step alone
(`BenchStep`).

What is reported, per configuration:
    step_time_s           median wall time of the timed steps (min, max, IQR and all times too).
                          All models are built first; then after `warmup` untimed rounds the steps
                          are INTERLEAVED (step 1 of A, step 1 of B, step 2 of A, ...), so machine
                          noise (other jobs, clock changes, thermals) hits every configuration
                          alike. On CUDA the device is synchronized before and after each step.
    images_per_s          batch / median step time.
    flops_per_image       FLOPs of the encoder's FORWARD pass (`model.forward_encoder(imgs,
                          masks)` on the real batch and masks, counted once with
                          `torch.utils.flop_counter.FlopCounterMode`), per image. A model without
                          `forward_encoder` falls back to its whole forward, and
                          `flops_per_image_scope` says so.
    train_flops_per_step  FLOPs of the whole step's forward + backward (FlopCounterMode counts
                          both); the optimizer's elementwise update is not counted.
    achieved_flops_per_s  train_flops_per_step / median step time.
    fraction_of_matmul    achieved / the machine's own matmul rate, measured in the same run: the
                          best of several timed runs of square matmuls (n = 2048 on CPU, 8192 on
                          CUDA) in the dtype training computes in, after a warm-up; 2 n^3 FLOPs.
    peak_memory_bytes     memory of training this configuration: parameters, gradients, AdamW
                          state, activations and the batch, measured in a separate pass of
                          `MEMORY_STEPS` steps per configuration after timing (not interleaved,
                          so no other model's memory is in it):
                            CUDA ("cuda_max_allocated"): in-process, after freeing the timing
                              models; `max_memory_allocated()` during building + the steps, minus
                              `memory_allocated()` just before building.
                            CPU ("cpu_child_rss_delta"): the process has no allocator peak for
                              CPU tensors, so each configuration is built and trained alone in a
                              fresh process (a child `python -m ummae.perf.bench --memory-probe` that
                              imports once and forks one process per configuration): its peak RSS
                              during building + the steps minus its RSS just before building.
                              An unmeasured build + step first maps in the library code and
                              starts the runtime caches, and is freed, so the delta is the
                              training's memory (with allocator overhead, as in a real run), not
                              the libraries'. See `_peak_rss_bytes` for why not `ru_maxrss`.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..config import PretrainConfig, apply_overrides, config_to_dict
from ..engine.distributed import resolve_device
from ..engine.guard import StepGuard
from ..engine.loop import TrainStep, training_autocast
from ..engine.optim import build_optimizer, build_scheduler
from ..errors import ConfigError, UmmaeError
from ..models import build_pretrain_model

__all__ = ["run_benchmark", "BenchStep", "count_flops", "flop_counter", "measure_matmul_flops", "format_table",
           "write_json", "sync_device", "CPU_ATTENTION_FLOPS", "MATMUL_N", "MEMORY_STEPS"]

MATMUL_N = {"cpu": 2048, "cuda": 8192}  # square matmul size per device type
MATMUL_REPEATS = 5
MEMORY_STEPS = 3  # step 1 creates the AdamW state; later steps hold state + grads + activations
DATA_SEED = 0
MODEL_SEED = 0
SCHEDULE_STEPS = 1000  # the nominal lr schedule of a bench step (its lr does not change the step's cost)


# ---------------------------------------------------------------------------------------------
# the benchmark

def run_benchmark(configs: list[PretrainConfig], batch_size: int | None = 8, steps: int = 10,
                  warmup: int = 2, device: str = "auto", *, measure_memory: bool = True,
                  matmul_n: int | None = None, build_model: Callable | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Time training steps of `configs` side by side in this process; returns the JSON report.

    Args:
        configs: resolved configurations (`resolve_config`), one per row; `cfg.preset` names it.
        batch_size: images per step for every configuration; None = each one's train.batch_size.
        steps, warmup: timed and untimed interleaved rounds.
        device: auto | cpu | cuda | cuda:N.
        measure_memory: False skips the peak-memory pass (peak_memory_bytes is then None).
        matmul_n: size of the reference matmul; None = `MATMUL_N` of the device type.
        build_model: `cfg -> model` (default `build_pretrain_model`); the model must return
            `(loss, pred, masks)` from `forward(imgs, generator=...)`. The CPU memory probe
            rebuilds models in a child process with `build_pretrain_model`, so a custom builder
            needs `measure_memory=False` on CPU.
        log: progress messages (e.g. to stderr); None = silent.
    """
    if not configs:
        raise ConfigError("bench needs at least one preset")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be an integer >= 1, got {steps}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"--warmup must be an integer >= 0, got {warmup}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size}")
    if matmul_n is not None and matmul_n < 1:
        raise ConfigError(f"matmul size must be >= 1, got {matmul_n}")
    dev = resolve_device(device)
    if build_model is not None and measure_memory and dev.type != "cuda":
        raise ValueError("the CPU memory probe builds models with build_pretrain_model in a child "
                         "process; pass measure_memory=False with a custom build_model")
    log = log or (lambda message: None)
    build_model = build_model or build_pretrain_model
    threads = torch.get_num_threads()

    # Each configuration with the benchmark's batch; the lr follows it as in training (it does not
    # change the step's cost, but the copy keeps the caller's configs untouched).
    configs = [copy.deepcopy(cfg) for cfg in configs]
    for cfg in configs:
        if batch_size is not None:
            cfg.train.batch_size = batch_size
        cfg.train.accum_steps = 1

    # The reference rate first, before any model takes memory, in the dtype the first config
    # trains in.
    compute_dtype = _compute_dtype(dev, configs[0].train.precision)
    n = matmul_n or MATMUL_N.get(dev.type, MATMUL_N["cpu"])
    log(f"matmul rate: {n}x{n} {_dtype_name(compute_dtype)} on {dev}")
    matmul_flops = measure_matmul_flops(dev, compute_dtype, n)

    rows = _time_interleaved(configs, dev, build_model, steps, warmup, log)
    # The timing models are gone with that function's frame; hand their memory back before the
    # memory pass builds each model again on its own.
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if measure_memory:
        log(f"peak memory: {MEMORY_STEPS} steps per preset, one preset at a time")
        if dev.type == "cuda":
            method = "cuda_max_allocated"
            peaks = [_peak_memory_cuda(cfg, dev, build_model) for cfg in configs]
        else:
            method = "cpu_child_rss_delta"
            peaks = _peak_memory_cpu(configs, threads)
    else:
        method, peaks = "not_measured", [None] * len(rows)

    for row, peak in zip(rows, peaks):
        row["peak_memory_bytes"] = peak
        row["peak_memory_method"] = method
        row["fraction_of_matmul"] = row["achieved_flops_per_s"] / matmul_flops

    return {
        "matmul_flops_per_s": matmul_flops,
        "matmul_n": n,
        "matmul_dtype": _dtype_name(compute_dtype),
        "matmul_repeats": MATMUL_REPEATS,
        "device": str(dev),
        "device_name": _device_name(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "interleaved": True,
        "flops_convention": "FlopCounterMode: a multiply-add is 2 FLOPs (papers' 'FLOPs' are often MACs)",
        "peak_memory_method": method,
        "results": rows,
    }


def _time_interleaved(configs: list[PretrainConfig], device: torch.device, build_model: Callable,
                      steps: int, warmup: int, log: Callable[[str], None]) -> list[dict]:
    """Build every model, count its FLOPs, then warm-up and timed rounds across all of them."""
    log(f"building {len(configs)} model(s)")
    runs = [BenchStep(cfg, device, build_model) for cfg in configs]

    log("counting FLOPs")
    for run in runs:
        run.flops = count_flops(run.model, run.imgs, run.autocast, run.cfg.train.seed)

    log(f"timing: {warmup} warm-up + {steps} timed steps per preset, interleaved")
    for _ in range(warmup):
        for run in runs:
            run.step()
    for _ in range(steps):
        for run in runs:
            run.times.append(run.timed_step())
    return [run.result() for run in runs]


class BenchStep:
    """One configuration's training step, as `ummae pretrain` runs it (see the module docstring):
    the model (seed `MODEL_SEED`), fused AdamW, the lr schedule, grad scaler and non-finite guard
    of training around `engine.loop.TrainStep`, a fixed batch of random images (seed `DATA_SEED`)
    and the masks' own generator (new masks every step, as in training). `ummae bench` times
    `step`; `--profile` and `--matmul-ceiling` (`step_profile`, `step_ceiling`) run it too."""

    def __init__(self, cfg: PretrainConfig, device: torch.device, build_model: Callable = build_pretrain_model):
        self.cfg, self.device = cfg, device
        torch.manual_seed(MODEL_SEED)
        self.model = build_model(cfg).to(device)
        self.model.train()
        size = cfg.data.img_size
        self.imgs = torch.randn(cfg.train.batch_size, 3, size, size,
                                generator=torch.Generator().manual_seed(DATA_SEED)).to(device)
        self.mask_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        optimizer = build_optimizer(self.model, cfg.lr, cfg.optim.weight_decay, cfg.optim.betas, fused=True)
        scheduler = build_scheduler(optimizer, SCHEDULE_STEPS, 0, cfg.optim.min_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self._train_step = TrainStep(
            self.model, [p for p in self.model.parameters() if p.requires_grad], optimizer, scheduler, scaler,
            StepGuard(device), prepare=lambda imgs: ((imgs,), imgs.shape[0]), loss=self._loss, device=device,
            precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad)
        self.steps_done = 0
        self.flops: dict = {}
        self.times: list[float] = []

    def _loss(self, imgs: torch.Tensor) -> torch.Tensor:
        loss, _, _ = self.model(imgs, generator=self.mask_gen)
        return loss

    def autocast(self):
        return training_autocast(self.device, self.cfg.train.precision)

    def step(self) -> None:
        """One optimizer step on the fixed batch (kernels launched, not waited for)."""
        self._train_step(iter((self.imgs,)), self.steps_done)
        self.steps_done += 1

    def timed_step(self) -> float:
        sync_device(self.device)  # nothing queued from the previous preset's step
        start = time.perf_counter()
        self.step()
        sync_device(self.device)  # the step's kernels have finished, not just been launched
        return time.perf_counter() - start

    def result(self) -> dict:
        times = self.times
        median = statistics.median(times)
        quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [median] * 3
        batch = self.imgs.shape[0]
        return {
            "preset": self.cfg.preset,
            "batch_size": batch,
            "img_size": self.cfg.data.img_size,
            "params": sum(p.numel() for p in self.model.parameters()),
            "precision": _dtype_name(_compute_dtype(self.device, self.cfg.train.precision)),
            "step_time_s": median,
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "step_time_iqr_s": quartiles[2] - quartiles[0],
            "step_times_s": list(times),
            "images_per_s": batch / median,
            "peak_memory_bytes": None,  # filled in by the memory pass
            "flops_per_image": self.flops["encoder_forward"] / batch,
            "flops_per_image_scope": self.flops["encoder_scope"],
            "model_forward_flops_per_image": self.flops["model_forward"] / batch,
            "train_flops_per_step": self.flops["train_step"],
            "achieved_flops_per_s": self.flops["train_step"] / median,
        }


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype matmuls run in under training's autocast rule (`training_autocast`)."""
    ctx = training_autocast(device, precision)
    return ctx.fast_dtype if isinstance(ctx, torch.autocast) else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() is often just "x86_64"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# FLOPs and the reference matmul rate

# `FlopCounterMode` knows the CUDA attention kernels (flash, memory-efficient, cuDNN) but not the
# CPU one that `F.scaled_dot_product_attention` dispatches to on the CPU (torch 2.14), which it
# then counts as 0 FLOPs: every timm block (ViT, Hiera) and Swin's attention would lose their
# attention matmuls. Same formulas as torch's own for the CUDA kernels: 2 matmuls forward
# (QK^T, PV), 5 backward, 2 FLOPs per multiply-add.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                             out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts CPU attention (see `CPU_ATTENTION_FLOPS`)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def count_flops(model: torch.nn.Module, imgs: torch.Tensor, autocast: Callable | None = None,
                seed: int = 0) -> dict:
    """FLOPs of one training step on `imgs`, counted by `FlopCounterMode` (nothing is updated).

    Returns `model_forward` (whole forward incl. loss), `train_step` (forward + backward),
    `encoder_forward` (`model.forward_encoder(imgs, masks)` with the step's masks, or the whole
    forward when the model has no `forward_encoder`) and `encoder_scope` saying which.
    `autocast` is a zero-argument factory of the training autocast context.
    """
    autocast = autocast or contextlib.nullcontext
    gen = torch.Generator().manual_seed(seed + 1)
    with flop_counter() as counter:
        with autocast():
            loss, _, masks = model(imgs, generator=gen)
        forward = counter.get_total_flops()
        loss.backward()
        train = counter.get_total_flops()
    model.zero_grad(set_to_none=True)  # counting must not leak gradients into the first step

    if hasattr(model, "forward_encoder"):
        with torch.no_grad(), autocast(), flop_counter() as counter:
            model.forward_encoder(imgs, masks)
        encoder, scope = counter.get_total_flops(), "encoder_forward"
    else:
        encoder, scope = forward, "model_forward"
    return {"model_forward": forward, "train_step": train, "encoder_forward": encoder,
            "encoder_scope": scope}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                         repeats: int = MATMUL_REPEATS) -> float:
    """Best FLOP/s of an `n x n @ n x n` matmul (2 n^3 FLOPs) over `repeats` timed runs.

    Each run is enough back-to-back matmuls to last about 50 ms, so the synchronisation and
    the timer do not count on a fast GPU.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def timed(count: int) -> float:
        sync_device(device)
        start = time.perf_counter()
        for _ in range(count):
            torch.matmul(a, b, out=out)
        sync_device(device)
        return time.perf_counter() - start

    timed(1)  # warm-up: library init, kernel selection, thread-pool start
    count = max(1, int(0.05 / max(timed(1), 1e-9)))
    # The best run is the attainable rate; slower ones measure interference, not the machine.
    best = min(timed(count) for _ in range(repeats)) / count
    return 2 * n ** 3 / best


# ---------------------------------------------------------------------------------------------
# peak memory

def _peak_memory_cuda(cfg: PretrainConfig, device: torch.device, build_model: Callable) -> int:
    """Allocator peak while building and training `cfg` alone, minus what was allocated before."""
    gc.collect()
    torch.cuda.empty_cache()
    sync_device(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run = BenchStep(cfg, device, build_model)
    for _ in range(MEMORY_STEPS):
        run.step()
    sync_device(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del run
    gc.collect()
    torch.cuda.empty_cache()
    return int(peak)


def _peak_memory_cpu(configs: list[PretrainConfig], threads: int) -> list[int | None]:
    """RSS growth of training each configuration, measured outside this process.

    One child process (`python -m ummae.perf.bench --memory-probe`, configs as JSON on stdin) pays the
    imports (torch, timm: seconds) once, then forks a fresh grandchild per configuration that
    measures it alone and exits, so no configuration sees another's freed memory. Without
    `os.fork` each configuration gets its own child instead. None where a measurement failed.
    """
    groups = [configs] if hasattr(os, "fork") else [[cfg] for cfg in configs]
    return [peak for group in groups for peak in _cpu_memory_probe(group, threads)]


def _cpu_memory_probe(configs: list[PretrainConfig], threads: int) -> list[int | None]:
    request = {"configs": [config_to_dict(cfg) for cfg in configs], "threads": threads,
               "steps": MEMORY_STEPS}
    env = dict(os.environ)
    # The child must import this very package, installed or not.
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "ummae.perf.bench", "--memory-probe"],
                          input=json.dumps(request), capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        answers = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        answers = [{"error": tail}] * len(configs)
    peaks = []
    for cfg, answer in zip(configs, answers):
        if "error" in answer:
            print(f"ummae bench: memory probe of {cfg.preset} failed ({answer['error']})", file=sys.stderr)
        peaks.append(answer.get("peak_memory_bytes"))
    return peaks


def _memory_probe_main() -> int:
    """Child process: read the request (JSON on stdin), print one answer per config (JSON list).

    Runs no torch op itself before forking: forking a process whose thread pools have started
    is unsafe, and each grandchild must start its own.
    """
    request = json.loads(sys.stdin.read())
    configs = []
    for values in request["configs"]:
        cfg = apply_overrides(PretrainConfig(), values, "memory probe")
        cfg.preset = values["preset"]
        configs.append(cfg)
    if len(configs) == 1:
        answers = [_measure_in_fresh_process(configs[0], request["threads"], request["steps"])]
    else:
        answers = [_measure_in_fork(cfg, request["threads"], request["steps"]) for cfg in configs]
    print(json.dumps(answers))
    return 0


def _measure_in_fork(cfg: PretrainConfig, threads: int, steps: int) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # grandchild: measure, send the answer, leave without running exit handlers
        os.close(read_fd)
        try:
            answer = _measure_in_fresh_process(cfg, threads, steps)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, whatever it is
            answer = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(write_fd, "w") as f:
            f.write(json.dumps(answer))
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"error": f"probe process died (wait status {status}; out of memory?)"}
    return json.loads(text)


def _measure_in_fresh_process(cfg: PretrainConfig, threads: int, steps: int) -> dict:
    """Peak RSS of building `cfg` and training it `steps` steps, minus RSS just before.

    A first, unmeasured build + step maps in the code and starts the runtime caches that the
    training uses (in a forked process even code the parent had loaded is mapped in again on first
    use); it is freed and the heap handed back before the baseline, so the delta is the memory of
    the model, gradients, optimizer state, activations and batch, not of libraries.
    """
    device = torch.device("cpu")
    torch.set_num_threads(threads)
    _measured_training(cfg, device, 1)
    _release_freed_memory()
    _reset_peak_rss()
    baseline = _peak_rss_bytes()
    _measured_training(cfg, device, steps)
    peak = _peak_rss_bytes()
    return {"peak_memory_bytes": peak - baseline, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak}


def _measured_training(cfg: PretrainConfig, device: torch.device, steps: int) -> None:
    run = BenchStep(cfg, device)
    for _ in range(steps):
        run.step()


def _release_freed_memory() -> None:
    """Collect garbage and return glibc's free heap pages to the system, so RSS is what is in use."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay resident (lower delta)
        pass


def _peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this process's own address
    space. Not `ru_maxrss`: the kernel carries the PARENT's peak into a child's `ru_maxrss` at
    exec (and fork), so a child started from a big benchmark process would report the parent's
    peak. Elsewhere `ru_maxrss` (bytes on macOS, KiB on the other Unixes).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _reset_peak_rss() -> None:
    """Lower the peak-RSS mark to the current RSS (Linux >= 4.0), so earlier peaks (the imports,
    the forking process's) do not hide the training's growth; where this is not possible the
    baseline is the peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# output

def format_table(report: dict) -> str:
    """The report as a text table, with ratios against the first configuration."""
    rows = report["results"]
    lines = [
        f"device {report['device']} ({report['device_name']}), torch {report['torch']}, "
        f"{report['threads']} threads; matmul {report['matmul_n']}x{report['matmul_n']} "
        f"{report['matmul_dtype']}: {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(best of {report['matmul_repeats']})",
        f"{report['steps']} timed steps per preset after {report['warmup']} warm-up, interleaved; "
        f"peak memory: {report['peak_memory_method']}",
        "",
    ]

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.1f}"

    header = ("preset", "batch", "step time (s, median)", "images/s", "peak mem (MiB)",
              "GFLOPs/img (enc fwd)", "achieved GFLOP/s", "% of matmul")
    table = [header] + [(
        r["preset"], str(r["batch_size"]), f"{r['step_time_s']:.4g}", f"{r['images_per_s']:.1f}",
        mib(r["peak_memory_bytes"]), f"{r['flops_per_image'] / 1e9:.3g}",
        f"{r['achieved_flops_per_s'] / 1e9:.1f}", f"{100 * r['fraction_of_matmul']:.1f}",
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    if any(r["flops_per_image_scope"] != "encoder_forward" for r in rows):
        lines.append("(GFLOPs/img is the whole model's forward where a model has no forward_encoder)")

    first = rows[0]
    for r in rows[1:]:
        time_ratio = r["step_time_s"] / first["step_time_s"]
        if r["peak_memory_bytes"] and first["peak_memory_bytes"]:
            mem = f"{r['peak_memory_bytes'] / first['peak_memory_bytes']:.2f}x"
        else:
            mem = "n/a"
        lines.append(f"{r['preset']} / {first['preset']}: step time {time_ratio:.2f}x, peak memory {mem}")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise UmmaeError(f"--json: cannot write '{path}': {e.strerror or e}") from None
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--memory-probe"]:
        sys.exit("usage: python -m ummae.perf.bench --memory-probe < request.json  (used by `ummae bench`)")
    sys.exit(_memory_probe_main())
