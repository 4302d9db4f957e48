"""The first 30 losses of every `*_demo` preset: the behaviour guard of a restructuring.

    python tests/golden/losses.py --write      # record tests/golden/demo_losses.json (before a change)
    python tests/golden/losses.py --write --only NAME...   # add (or re-record) some presets only
    python tests/golden/losses.py              # compare with it, bit for bit

Each preset runs as it is, with only what makes the record small and fast changed: batch 2, no
DataLoader workers, a loss logged every step, no periodic checkpoint, no picture, 30 optimizer
steps, seed 0, on the CPU with one thread (CPU runs are deterministic: `engine/determinism.py`).
The losses are stored as `float.hex`, so "equal" means bit-identical. `tests/engine/test_golden_losses.py`
runs the comparison: bit-identical on the kind of machine the record was made on (same CPU model,
vector ISA and torch version, stored with it), and to a relative 1e-4 elsewhere, since another
CPU's kernels round float32 differently and 30 AdamW steps carry that on. A preset added later
(`--only`) may be recorded on another kind of machine: its own machine is stored beside it
(`machines`), and decides for it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

RECORD = Path(__file__).with_name("demo_losses.json")
STEPS = 30
SETS = ["data.num_workers=0", "train.log_every=1", "train.save_every=0", "train.vis_images=0"]
FLAGS = {"train.batch_size": 2, "train.max_steps": STEPS, "train.seed": 0, "train.device": "cpu"}


def machine() -> dict[str, str]:
    """What decides float32 rounding on a CPU: its model, the vector ISA torch uses, torch's version."""
    import platform

    import torch

    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def demo_presets() -> list[str]:
    from ummae.presets import preset_names

    return [name for name in preset_names() if name.endswith("_demo")]


def demo_losses(preset: str, out: Path) -> list[str]:
    """The first STEPS losses of `preset` (float.hex), from a run into `out`."""
    import torch

    from ummae.resolve import resolve_config
    from ummae.engine.pretrain import pretrain

    torch.set_num_threads(1)
    cfg = resolve_config(preset=preset, sets=SETS, flags={**FLAGS, "train.out": str(out)})
    result = pretrain(cfg, progress=False)
    lines = [json.loads(line) for line in result.metrics.read_text().splitlines() if line.strip()]
    return [float(x["loss"]).hex() for x in lines]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="record the losses (before a change)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="with --write: record only these presets, "
                   "keep the rest of the record (each keeps the machine it was recorded on)")
    args = p.parse_args()
    names = args.only or demo_presets()
    with tempfile.TemporaryDirectory() as tmp:
        got = {name: demo_losses(name, Path(tmp) / name) for name in names}
    if args.write and args.only:
        record = json.loads(RECORD.read_text())
        record["losses"].update(got)
        record.setdefault("machines", {}).update({name: machine() for name in got})
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"updated {RECORD} ({len(got)} presets)")
        return 0
    if args.write:
        RECORD.write_text(json.dumps({"machine": machine(), "steps": STEPS, "sets": SETS, "flags": FLAGS, "losses": got}, indent=1) + "\n")
        print(f"wrote {RECORD} ({len(got)} presets)")
        return 0
    want = json.loads(RECORD.read_text())["losses"]
    bad = [name for name in want if got.get(name) != want[name]]
    print("identical" if not bad and set(got) == set(want) else f"differ: {bad or sorted(set(got) ^ set(want))}")
    return 1 if bad or set(got) != set(want) else 0


if __name__ == "__main__":
    sys.exit(main())
