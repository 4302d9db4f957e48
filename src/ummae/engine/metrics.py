"""Where a run's numbers go: JSON lines (`metrics.jsonl`) and TensorBoard events (`tb/`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "truncate_metrics", "log_line"]


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)  # line-buffered: a killed run keeps its lines
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        """`record` must hold `step`; numeric entries also go to TensorBoard as `train/<key>`."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint being resumed."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    path.write_text("".join(f"{line}\n" for line in kept))


def log_line(record: dict, total_steps: int, start_step: int, elapsed: float) -> str:
    """One plain progress line (logs that are not a terminal): step, epoch, loss, lr, images/s, ETA."""
    from .progress import eta_text

    done = record["step"] - start_step
    eta = elapsed / done * (total_steps - record["step"]) if done else float("nan")
    return (f"step {record['step']}/{total_steps}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.3e}  {record['images_per_sec']:.1f} images/s  ETA {eta_text(eta)}")
