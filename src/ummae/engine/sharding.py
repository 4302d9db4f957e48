"""Data parallelism: DDP (every rank holds the whole model) or FSDP2 (each rank holds a shard).

`train.strategy` (`--strategy`):
    ddp   `DistributedDataParallel`: parameters, gradients and both AdamW moments replicated on
          every rank (16 bytes per parameter in fp32), gradients all-reduced once per step.
    fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per transformer block (encoder
          and decoder, `transformer_blocks`) plus the root for what is left (embeddings, norms,
          heads). Each rank keeps 1/N of every parameter, its gradient and its AdamW moments; a
          unit's parameters are all-gathered just before its forward (and backward) and its
          gradients reduce-scattered after its backward. `train.reshard_after_forward`: free the
          gathered parameters after the forward (true, ZeRO-3: least memory, a second all-gather
          in backward) or keep them until the backward (false, ZeRO-2 style: one all-gather per
          step, the full parameters of all units alive between forward and backward).
          On CUDA with bf16 the units compute in bf16 from fp32 parameters
          (`MixedPrecisionPolicy`); the gradients are reduced in fp32.

Both: gradient accumulation reduces only at the last micro-batch of a step (`gradient_sync_off`),
and the guard's gradient norm is the global one (`total_grad_norm`: FSDP's gradients are DTensors
whose shards live on different ranks). `train.grad_checkpointing` recomputes each encoder block
in backward (the encoder's timm-style `set_grad_checkpointing`), under either strategy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError
from .distributed import DistEnv

__all__ = ["transformer_blocks", "enable_grad_checkpointing", "wrap_for_training", "is_sharded",
           "gradient_sync_off", "total_grad_norm", "clip_grad_norm", "local_tensor"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the children of every container named `blocks`.

    That is timm's convention and every built-in model's (Swin and PVT stages' `blocks`, ViT's
    and Hiera's `blocks`, the MAE decoder's `blocks`); a backbone from outside that names them
    otherwise is sharded as one root unit, which is correct, only less memory-saving.
    """
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, (nn.ModuleList, nn.Sequential)):
            found.extend(module.children())
    return found


def enable_grad_checkpointing(model: nn.Module, arch: str) -> None:
    """Recompute every encoder block's activations in backward (timm's `set_grad_checkpointing`,
    which every built-in encoder answers; the RNG state is restored, so drop path draws the same)."""
    encoder = getattr(model, "encoder", None)
    if not hasattr(encoder, "set_grad_checkpointing"):
        raise ConfigError(f"train.grad_checkpointing: the {arch} encoder has no set_grad_checkpointing "
                          f"(timm's API) to checkpoint its blocks with")
    encoder.set_grad_checkpointing(True)


def wrap_for_training(model: nn.Module, strategy: str, env: DistEnv, device: torch.device, *,
                      bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """The module the training step runs through: DDP-wrapped (more than one rank), sharded in
    place with FSDP2 (`strategy` fsdp, any number of ranks: one process shards nothing, but gets
    the same code path), or `model` itself.

    Args:
        bf16: compute in bf16 from fp32 parameters (FSDP on CUDA with bf16 autocast).
    """
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (env.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                  else MixedPrecisionPolicy())
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        # The root's parameters are needed again at once by the backward: never resharded after forward.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        return model
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(module, "_orig_mod", module), FSDPModule)


@contextlib.contextmanager
def gradient_sync_off(train_model: nn.Module):
    """Accumulate this micro-batch's gradients locally, without a reduce (DDP: `no_sync`; FSDP2:
    `set_requires_gradient_sync(False)`, its gradients then stay unsharded until the last one)."""
    inner = getattr(train_model, "_orig_mod", train_model)  # torch.compile's wrapper
    if is_sharded(inner):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    elif hasattr(train_model, "no_sync"):
        with train_model.no_sync():
            yield
    else:
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (the same storage), a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The 2-norm of all gradients together, the same on every rank (a 0-d plain tensor), or None
    without gradients. FSDP's gradients are sharded DTensors: their norm is reduced over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """`torch.nn.utils.clip_grad_norm_` that also works on FSDP's sharded gradients: the global
    norm, then every rank scales its own shards by the same factor. Returns the norm."""
    norm = total_grad_norm(params)
    if norm is not None:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([local_tensor(p.grad) for p in params if p.grad is not None], scale)
    return norm


# ---------------------------------------------------------------------------------------------
# full (consolidated) state of a sharded model: the checkpoint format every command reads

def _names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order `optimizer.state_dict()` numbers them (0, 1, ...). FSDP2
    keeps the names, so a DDP run's numbering and a sharded run's agree by position."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full tensors, gathered to rank 0's CPU memory only (the other ranks get empty dicts)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's state dict and the optimizer's (numbered as `optimizer.state_dict()`
    numbers them: the format of a DDP checkpoint), on rank 0; empty dicts on the others.
    Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_options())
    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not by_name:
        return weights, {}
    index = {n: i for i, n in enumerate(_names_in_optimizer_order(model, optimizer))}
    numbered = {"state": {index[n]: s for n, s in by_name["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}
    return weights, numbered


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, numbered: dict) -> None:
    """Load a full optimizer state (`optimizer.state_dict()`'s numbering, as every rank read it
    from a checkpoint file) into the optimizer of a sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names_in_optimizer_order(model, optimizer)
    by_name = {"state": {names[int(i)]: s for i, s in numbered["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in numbered["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
