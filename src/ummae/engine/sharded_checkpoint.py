"""Sharded checkpoints of an FSDP run: `checkpoints/step-XXXXXXXX.dcp/`, one folder per step.

Under `--strategy fsdp` no rank ever holds the whole training state during the run: each one
writes its own shards of the weights and AdamW moments with `torch.distributed.checkpoint`
(DCP), in parallel. A folder holds:
    .metadata, __<rank>_0.distcp   DCP's files: `{"model": ..., "optimizer": ...}`, keyed by
                                   parameter name, each tensor split as the ranks held it
    state.pt                       everything else a resume needs (step, config, scheduler, ...),
                                   a weights-only file as `checkpoint_file` writes them
Atomic as the `.pt` files are: the ranks write into `.step-XXXXXXXX.dcp.tmp/`, rank 0 adds
`state.pt` last and renames the folder; a kill leaves only the temporary folder, which no
listing sees and the next run removes (`rundir.remove_orphaned_temporaries`).

Loading goes through `torch.distributed.checkpoint.state_dict`: the target is the state dict of
the model and optimizer as this run holds them (sharded over its ranks, or whole under DDP or on
one process), and DCP reads each rank's part from whatever shards were written. So a sharded
checkpoint resumes under any number of processes and either strategy. The consolidated
`checkpoint.pt` at the end of a run (the DDP format, `sharding.full_state_dicts`) is what every
other command reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint_file import load_checkpoint, save_checkpoint
from .checkpoint import SHARDED_SUFFIX, is_sharded_checkpoint
from .distributed import DistEnv, any_rank
from .guard import NonFiniteLossError, state_is_finite

__all__ = ["SHARDED_SUFFIX", "STATE_FILE", "save_sharded", "load_sharded", "is_sharded_checkpoint",
           "read_sharded_state"]

STATE_FILE = "state.pt"


def read_sharded_state(path: Path) -> dict:
    """The folder's `state.pt` (no weights: those are loaded by `load_sharded` into the model)."""
    return load_checkpoint(path / STATE_FILE)


def _barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rest: dict,
                 env: DistEnv, device: torch.device) -> Path:
    """Write the sharded checkpoint folder `path` (every rank calls it: each writes its shards).

    Args:
        rest: what goes into `state.pt` (no `model`, no `optimizer`), written by rank 0.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights, optim = get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    # belt and braces (see guard.py): each rank checks its shards, all agree before anything is written
    if any_rank(not state_is_finite(weights, optim), env, device):
        raise NonFiniteLossError(f"the state at step {rest.get('step')} is not finite; nothing was written")
    tmp = path.with_name(f".{path.name}.tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed write's
        tmp.mkdir(parents=True)
    _barrier(env)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(tmp))
    _barrier(env)  # every rank's shards are on disk
    if env.is_main:
        save_checkpoint(tmp / STATE_FILE, {"model": {}, "sharded": True, **rest})
        if path.exists():  # the same step saved again (a finished run resumed at its end)
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier(env)
    return path


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into `model` and `optimizer` as this run holds them (every rank
    calls it): sharded by FSDP over any number of ranks, or whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    # The targets: this run's own tensors (the optimizer's moments are created first, at zero,
    # by torch's state-dict helper), which DCP fills in place from the saved shards.
    weights, optim = get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    dcp.load({"model": weights, "optimizer": optim}, checkpoint_id=str(path))
    set_model_state_dict(model, weights)
    set_optimizer_state_dict(model, optimizer, optim)
