"""Continuing a run: a checkpoint found and loaded once, then handed on as a `ResumePoint`.

`--resume PATH|auto` goes through one function per kind of run, `engine.pretrain.resume_pretrain`
and `engine.finetune.resume_finetune`: it finds the file (`find_resume`: a path, or with `auto`
the newest periodic checkpoint in `--out`, None if there is none yet), loads it once
(`load_checkpoint`: weights_only, nothing but tensors and plain values), builds the run's
configuration over the checkpoint's, refuses what cannot continue exactly and returns the
configuration with the `ResumePoint`. The engine restores model, optimizer and step from that
same state, after the checks that need the data (`ResumePoint.check_within`: the step within
the run's length).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .checkpoint import find_resume_checkpoint, is_sharded_checkpoint, load_checkpoint, run_dir_of

__all__ = ["ResumePoint", "find_resume", "load_weights"]


@dataclass
class ResumePoint:
    """A loaded checkpoint to continue: its file and its state dict (`load_checkpoint`'s)."""

    path: Path
    state: dict

    @property
    def source(self) -> str:
        """How error messages name it."""
        return f"--resume '{self.path}'"

    @property
    def sharded(self) -> bool:
        """A folder of FSDP shards: `state` has no weights, `sharded_checkpoint.load_sharded` loads them."""
        return is_sharded_checkpoint(self.path)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint belongs to (the default `--out` of the resumed run)."""
        return run_dir_of(self.path)

    def check_within(self, total_steps: int) -> None:
        """Refuse (one line) a checkpoint beyond the run's `total_steps`."""
        if self.step > total_steps:
            raise ConfigError(f"{self.source} is at step {self.state['step']}, beyond this run's "
                              f"{total_steps} steps; raise --max-steps/--epochs")


def find_resume(resume: str | Path | None, out: str | None) -> ResumePoint | None:
    """The checkpoint `--resume` means, loaded: a path, or `auto` (the newest periodic checkpoint
    in `out`; None when there is none yet, so one job command both starts and continues a run)."""
    if not resume:
        return None
    path = find_resume_checkpoint(str(resume), out)
    if path is not None and is_sharded_checkpoint(path):
        from .sharded_checkpoint import read_sharded_state

        return ResumePoint(path, read_sharded_state(path))
    return None if path is None else ResumePoint(path, load_checkpoint(path))


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a checkpoint's model weights, refusing (one line) those of another architecture."""
    weights = state["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"shape of {wrong[0]} is {tuple(weights[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
                  if wrong else f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected")
        raise ConfigError(f"{source} is a checkpoint of another architecture: {detail}")
    model.load_state_dict(weights)
