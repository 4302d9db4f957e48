"""How close to the machine's matmul rate a training step could get (`ummae bench --matmul-ceiling`).

`ummae bench` reports a step's achieved FLOP/s as a share of a large square matmul's rate. That
share has a ceiling below 100% that no change outside the matmuls can lift: the step's own
matmuls run at the shapes the model gives them (Swin-T's first stage multiplies [8192 x 96] by
[96 x 288]; a 2048^3 matmul is far easier to run at peak), and its attention kernels at theirs.

This module measures that ceiling. It runs one training step under a `TorchDispatchMode` that
records every op `FlopCounterMode` counts FLOPs for (matmuls, convolutions, attention: forward
and backward) with its arguments' shapes, strides and dtypes; then replays each distinct call
alone on fresh random tensors of the same layout, timed (best of `repeats` runs, each long
enough for the timer), and adds up `time x count`. Reported:
    counted_flops        the FLOPs of the recorded calls (= the step's FlopCounterMode total)
    matmul_only_s        the summed replay time: the step's time if everything else were free
    ceiling_flops_per_s  counted_flops / matmul_only_s: the best FLOP/s this step could reach
    ceiling_fraction     that, over the reference matmul rate measured in the same process,
                         before the step and again after the replays; the higher of the two is
                         used (a shared or virtual machine's rate drifts: both are reported)
    step_s, achieved_fraction  the real step (median of `steps`), for comparison
    calls                per distinct call: op, shapes, count, FLOPs, time, its own FLOP/s
Replayed calls see warm caches and no neighbours, so the ceiling is, if anything, optimistic.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry, shape_wrapper

from ..config import PretrainConfig
from . import bench
from .bench import CPU_ATTENTION_FLOPS, BenchStep, count_flops, measure_matmul_flops

__all__ = ["record_flop_calls", "matmul_ceiling", "format_ceiling"]


def _flop_formulas() -> dict:
    formulas = dict(flop_registry)  # and the CPU attention kernels torch's counter misses
    formulas.update({op: shape_wrapper(f) for op, f in CPU_ATTENTION_FLOPS.items()})
    return formulas


class _TensorSpec:
    """What a replay needs of a tensor argument: its layout (a leaf for pytree, unlike a tuple)."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype, self.device = tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type

    def __repr__(self) -> str:
        return f"T({self.shape}, {self.stride}, {self.dtype})"

    def materialise(self, generator: torch.Generator) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        if self.dtype.is_floating_point:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).to(self.dtype))
        return t


def _spec(value):
    return _TensorSpec(value) if isinstance(value, torch.Tensor) else value


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.formulas = _flop_formulas()
        self.calls: dict = {}  # key -> {"op", "args", "kwargs", "count", "flops"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            spec_args, spec_kwargs = tree_map(_spec, args), tree_map(_spec, kwargs)
            key = (str(func), repr(spec_args), repr(sorted(spec_kwargs.items(), key=str)))
            call = self.calls.setdefault(key, {"op": func, "args": spec_args, "kwargs": spec_kwargs,
                                               "count": 0, "flops": flops})
            call["count"] += 1
        return out


def record_flop_calls(step) -> list[dict]:
    """Run `step()` once and return the distinct FLOP-counted calls it made, with their counts."""
    recorder = _Recorder()
    with recorder:
        step()
    return list(recorder.calls.values())


def _materialise(spec, generator: torch.Generator):
    return spec.materialise(generator) if isinstance(spec, _TensorSpec) else spec


def time_call(call: dict, repeats: int = 3, min_seconds: float = 0.02) -> float:
    """Best seconds per execution of one recorded call, replayed alone on random tensors."""
    gen = torch.Generator().manual_seed(0)
    args = tree_map(lambda s: _materialise(s, gen), call["args"])
    kwargs = tree_map(lambda s: _materialise(s, gen), call["kwargs"])
    op = call["op"]
    with torch.no_grad():
        op(*args, **kwargs)  # warm-up
        start = time.perf_counter()
        op(*args, **kwargs)
        once = max(time.perf_counter() - start, 1e-7)
        count = max(1, int(min_seconds / once))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(count):
                op(*args, **kwargs)
            best = min(best, (time.perf_counter() - start) / count)
    return best


def matmul_ceiling(cfg: PretrainConfig, device: torch.device, batch_size: int, steps: int = 3,
                   warmup: int = 1, repeats: int = 3) -> dict:
    """The step's matmul-only time and FLOP/s ceiling next to its real time (CPU; see the module)."""
    if device.type != "cpu":
        raise NotImplementedError("--matmul-ceiling replays calls on the CPU only")
    cfg = copy.deepcopy(cfg)  # the caller's config keeps its batch size
    cfg.train.batch_size = batch_size
    matmul_n = bench.MATMUL_N["cpu"]
    matmul_rate = measure_matmul_flops(device, torch.float32, matmul_n)
    run = BenchStep(cfg, device)  # the step `ummae bench` times
    total = count_flops(run.model, run.imgs, run.autocast)["train_step"]
    for _ in range(warmup):
        run.step()
    step_s = statistics.median(run.timed_step() for _ in range(steps))

    calls = record_flop_calls(run.step)
    rows, matmul_only = [], 0.0
    for call in calls:
        seconds = time_call(call, repeats)
        matmul_only += seconds * call["count"]
        tensors = [s.shape for s in call["args"] if isinstance(s, _TensorSpec)]
        rows.append({"op": str(call["op"]), "shapes": [list(s) for s in tensors], "count": call["count"],
                     "flops": call["flops"], "seconds": seconds, "flops_per_s": call["flops"] / seconds})
    rate_after = measure_matmul_flops(device, torch.float32, matmul_n)
    rates = (matmul_rate, rate_after)
    matmul_rate = max(rates)
    counted = sum(r["flops"] * r["count"] for r in rows)
    rows.sort(key=lambda r: -r["seconds"] * r["count"])
    return {"preset": cfg.preset, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "matmul_flops_per_s": matmul_rate, "matmul_flops_per_s_before_after": list(rates),
            "train_flops_per_step": total, "counted_flops": counted,
            "step_s": step_s, "achieved_fraction": total / step_s / matmul_rate,
            "matmul_only_s": matmul_only, "matmul_share_of_step": matmul_only / step_s,
            "ceiling_flops_per_s": counted / matmul_only, "ceiling_fraction": counted / matmul_only / matmul_rate,
            "calls": rows}


def format_ceiling(reports: list[dict], top: int = 8) -> str:
    lines = ["| preset | step (s) | achieved, % of matmul | matmuls alone (s) | their share of the step "
             "| ceiling, % of matmul |", "|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r['preset']} | {r['step_s']:.3f} | {100 * r['achieved_fraction']:.0f}% | "
                     f"{r['matmul_only_s']:.3f} | {100 * r['matmul_share_of_step']:.0f}% | "
                     f"{100 * r['ceiling_fraction']:.0f}% |")
    for r in reports:
        rate = r["matmul_flops_per_s"]
        lines += ["", f"{r['preset']}: the {top} costliest calls (time x count), reference matmul "
                      f"{rate / 1e9:.0f} GFLOP/s", "| op | shapes | count | ms each | % of matmul |",
                  "|---|---|---|---|---|"]
        for c in r["calls"][:top]:
            shapes = " ".join("x".join(map(str, s)) for s in c["shapes"])
            lines.append(f"| {c['op']} | {shapes} | {c['count']} | {1e3 * c['seconds']:.2f} | "
                         f"{100 * c['flops_per_s'] / rate:.0f}% |")
    return "\n".join(lines)
