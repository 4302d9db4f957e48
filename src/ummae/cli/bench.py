"""`ummae bench`: time training steps of presets side by side (see `ummae.perf`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]

EPILOG = """\
Each step is the training step `ummae pretrain` runs (forward, loss, backward, the non-finite
guard, fused AdamW, the lr schedule) on a fixed batch of random images, under the autocast
training uses (bf16 on CUDA). All presets are built in one process
and their steps interleaved after warm-up, so machine noise hits them alike. Reported per preset:
median step time, images/s, peak memory (CUDA allocator peak, or a child process's RSS growth on
CPU), encoder forward FLOPs per image, achieved FLOP/s and its share of this machine's matmul rate.

examples:
  ummae bench demo
  ummae bench ummae_swin_tiny_256 simmim_swin_tiny_256 --batch-size 8 --json b.json
  ummae bench demo --set model.embed_dim=64 --steps 20 --device cpu
  ummae bench ummae_swin_tiny_256 --profile --device cpu --json profile.json
  ummae bench ummae_swin_tiny_256 --matmul-ceiling --device cpu --json ceiling.json

--profile: instead of timing, profile --steps steps of each preset (after --warmup) with
torch.profiler and print where the step's time and memory go per component (patch embed,
compaction, position bias, attention, MLP, merging, decoder, loss, optimizer, ...); see
ummae.perf.step_profile.

--matmul-ceiling (CPU): replay every matmul, convolution and attention call of one step alone at
its own shapes and add up their times: the step's time if nothing else cost anything, and so the
highest share of the matmul rate the step could reach; see ummae.perf.step_ceiling.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="time training steps of presets side by side",
        description="Benchmark full training steps of one or more presets in one process, "
                    "interleaved, with FLOPs, memory and the machine's matmul rate.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="+", metavar="PRESET", help="preset names (see `ummae presets`)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="images per step, for every preset (default 8)")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps per preset (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="untimed steps per preset first (default 2)")
    p.add_argument("--device", metavar="DEV", help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--profile", action="store_true",
                   help="per-component profile of the step instead of timing (see below)")
    p.add_argument("--matmul-ceiling", action="store_true",
                   help="the step's matmuls alone, replayed at their own shapes: the achievable ceiling (CPU)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                   help="override a config key of every preset, e.g. model.drop_path_rate=0.1 (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import validate
    from ..resolve import layer_config, resolve_config
    from ..errors import ConfigError
    from .checks import check_output

    flags = {"train.batch_size": args.batch_size, "train.device": args.device}
    # Before importing torch: a preset typo, a bad --set key or an unwritable --json cost no import.
    for name in args.presets:
        validate(layer_config(name, None, args.sets, flags)[0])
    check_output("--json", args.json, "file")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ConfigError(f"--json: directory '{Path(args.json).parent}' does not exist")

    from ..perf import format_table, run_benchmark, write_json

    configs = [resolve_config(name, None, args.sets, flags) for name in args.presets]

    if args.profile:
        return _run_profile(args, configs)
    if args.matmul_ceiling:
        return _run_ceiling(args, configs)
    report = run_benchmark(configs, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                           device=configs[0].train.device,
                           log=lambda message: print(f"ummae bench: {message}", file=sys.stderr))
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


def _run_each(args: argparse.Namespace, configs, verb: str, measure, key: str, format_report,
              cpu_only: bool = False) -> int:
    """--profile / --matmul-ceiling: `measure(cfg, device, batch_size, steps=, warmup=)` per preset,
    the reports under `key` with the device's description, printed by `format_report`."""
    import torch

    from ..engine.distributed import resolve_device
    from ..perf import write_json
    from ..errors import ConfigError

    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise ConfigError("--steps and --batch-size must be >= 1, --warmup >= 0")
    device = resolve_device(configs[0].train.device)
    if cpu_only and device.type != "cpu":
        raise ConfigError("--matmul-ceiling runs on the CPU only (--device cpu)")
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), key: []}
    for cfg in configs:
        print(f"ummae bench: {verb} {cfg.preset}", file=sys.stderr)
        report[key].append(measure(cfg, device, args.batch_size, steps=args.steps, warmup=args.warmup))
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


def _run_profile(args: argparse.Namespace, configs) -> int:
    from ..perf import format_profile, profile_step

    return _run_each(args, configs, "profiling", profile_step, "profiles", format_profile)


def _run_ceiling(args: argparse.Namespace, configs) -> int:
    from ..perf import format_ceiling, matmul_ceiling

    return _run_each(args, configs, "matmul ceiling of", matmul_ceiling, "ceilings",
                     lambda report: format_ceiling(report["ceilings"]), cpu_only=True)
