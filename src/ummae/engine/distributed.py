"""Multi-process training with PyTorch DDP, started by `torchrun` (or not at all).

`torchrun --nproc_per_node=N -m ummae pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK; this
module turns them into a process group (NCCL on GPUs, gloo on CPU) and offers the few
collectives the training loop needs. Without those variables everything is a one-process no-op,
so the same loop serves one CPU, one GPU and many nodes (torchrun's usual `--nnodes`,
`--node_rank`, `--rdzv_endpoint` flags).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["DistEnv", "resolve_device", "init_distributed", "shutdown_distributed", "all_reduce_mean",
           "all_reduce_sum", "all_reduce_max", "any_rank", "gather_strings", "gather_objects", "shared_run_dir"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """`auto | cpu | cuda | cuda:N` -> a device; asking for CUDA without one is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(name)


def init_distributed(device_name: str, group_of_one: bool = False) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device.

    Args:
        device_name: `train.device` (auto | cpu | cuda | cuda:N).
        group_of_one: a process alone still gets a process group (of one, through an in-memory
            store): FSDP needs one to shard over, even when there is nothing to split.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    use_cuda = device.type == "cuda"
    if use_cuda:
        # One GPU per process: torchrun's LOCAL_RANK picks it (cuda:N only makes sense alone).
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    env = DistEnv(rank, world_size, local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if env.enabled and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if use_cuda else None)
    elif group_of_one and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if use_cuda else None)
    return env, device


def shutdown_distributed() -> None:
    """Leave the process group and free it now, while the interpreter is fully alive.

    `destroy_process_group` only unregisters the group: the DDP wrapper and the training session
    still hold it, in reference cycles, so without the collection its gloo threads would run on
    until interpreter shutdown, where tearing them down aborts the process at random
    ("terminate called without an active exception", a rank lost after a finished run).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def _reduce(value: float, op, env: DistEnv, device: torch.device) -> float:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def all_reduce_mean(value: float, env: DistEnv, device: torch.device) -> float:
    return _reduce(value, dist.ReduceOp.SUM, env, device) / env.world_size if env.enabled else value


def all_reduce_sum(value: float, env: DistEnv, device: torch.device) -> float:
    return _reduce(value, dist.ReduceOp.SUM, env, device)


def all_reduce_max(value: float, env: DistEnv, device: torch.device) -> float:
    return _reduce(value, dist.ReduceOp.MAX, env, device)


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any: keeps collective decisions in lock-step."""
    return _reduce(float(flag), dist.ReduceOp.MAX, env, device) > 0 if env.enabled else flag


def gather_strings(items: set[str], env: DistEnv) -> set[str]:
    """Union of every rank's set of strings (e.g. the unreadable files each rank met)."""
    if not env.enabled:
        return set(items)
    gathered: list[set[str] | None] = [None] * env.world_size
    dist.all_gather_object(gathered, set(items))
    return set().union(*[g for g in gathered if g])


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj` (picklable; tensors on the CPU), in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shared_run_dir(out: str | None, default_stem: str, env: DistEnv) -> Path:
    """The run directory every rank writes to (rank 0 only, in practice), checked for writing.

    Args:
        out: `--out`, or None for `runs/<default_stem>-<timestamp>`; the timestamp is rank 0's,
            broadcast so that all ranks agree.
    """
    name = out or str(Path("runs") / f"{default_stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if env.enabled:
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    path = Path(name)
    if env.is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--out: cannot write to run directory '{path}': {e.strerror or e}") from None
    return path
