"""Keeping non-finite numbers out of the weights and the checkpoints, without a host sync per step.

Every check of the training step happens on the device and is read back only at the loop's
check points (a log step, a checkpoint, the end, a signal): one host sync per log interval.

Per optimizer step:
    1. each micro-batch's loss is accumulated (finite ones only) for the log line, and a
       non-finite one poisons its backward pass (the loss is multiplied by NaN instead of 1.0),
       so the gradients carry it - across DDP ranks too, through the gradient all-reduce;
    2. the gradients are checked (`found_inf`); fused AdamW skips the whole update when it is
       set (PyTorch's mechanism for GradScaler): parameters, moments and step count stay as
       they were;
    3. after the update the parameters are checked again, for an update that overflowed from
       finite gradients (a huge lr); such weights cannot be repaired, so the run stops at the
       next check point, before anything is written.
Before a checkpoint is written, its model and optimizer tensors are checked once more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UmmaeError
from .distributed import DistEnv
from .sharding import local_tensor, total_grad_norm

__all__ = ["StepGuard", "GuardReport", "state_is_finite", "NonFiniteLossError", "LOSS", "GRADIENTS", "WEIGHTS"]

# What went non-finite first (the `kind` of a report).
LOSS, GRADIENTS, WEIGHTS = 1, 2, 3
_NO_STEP = 2 ** 40  # "no bad step yet" in the min-reduction over ranks


class NonFiniteLossError(UmmaeError):
    """A loss, gradient or update became NaN or infinite; training stopped, nothing non-finite written."""


@dataclass
class GuardReport:
    """What the device counters held at a check point (summed / agreed over ranks)."""
    loss_sum: float
    loss_count: float
    skipped: int  # optimizer updates skipped on device since the run (session) started
    bad_step: int  # first step with a non-finite loss/gradient/weight since the last check, 0 if none
    bad_kind: int  # LOSS, GRADIENTS or WEIGHTS
    bad_loss: float  # the loss of that step (this rank's; nan if another rank saw it)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")


class StepGuard:
    """Device-side counters of one training session (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self._loss_sum, self._loss_count, self._skipped = zero.clone(), zero.clone(), zero.clone()
        self._group_bad = torch.zeros((), dtype=torch.bool, device=device)
        # first bad (step, kind, loss) since the last check point
        self._bad = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        self._group_loss = zero.clone()

    def loss_factor(self, loss: torch.Tensor) -> torch.Tensor:
        """1.0 for a finite loss, NaN otherwise: multiply the loss by it before backward."""
        finite = torch.isfinite(loss.detach())
        self._loss_sum += torch.where(finite, loss.detach().double(), 0.0)
        self._loss_count += finite
        # the loss reported for this group: its first non-finite one, else its last one
        self._group_loss = torch.where(self._group_bad, self._group_loss, loss.detach().double())
        self._group_bad |= ~finite
        return torch.where(finite, 1.0, float("nan")).to(loss.dtype)

    def found_inf(self, params: list[torch.Tensor], step: int, grad_norm: torch.Tensor | None = None,
                  check_grads: bool = True) -> torch.Tensor:
        """A float 0-d tensor, 1.0 when the update of `step` must be skipped (fused AdamW's `found_inf`).

        `grad_norm`: the total norm if clipping computed it already, else the gradients' norms
        are computed here. A norm that overflows counts as non-finite: its squares would
        overflow Adam's second moment. `check_grads=False` (fp16: the grad scaler skips
        overflowing steps and lowers its scale, a normal event): only the losses count.
        """
        if not check_grads:
            grad_norm = None
        elif grad_norm is None and any(hasattr(p.grad, "to_local") for p in params):
            # FSDP: each rank holds a shard of the gradients; the verdict must be the same on all
            # of them (each updates only its shards), so it is the global norm's
            norm = total_grad_norm(params)
            grad_norm = None if norm is None else norm.square()  # squared like the plain case below
        elif grad_norm is None:
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.stack(torch._foreach_norm(grads)).square().sum() if grads else None
        bad_grads = ~torch.isfinite(grad_norm) if grad_norm is not None else torch.zeros_like(self._group_bad)
        bad = bad_grads | self._group_bad
        kind = torch.where(self._group_bad, float(LOSS), float(GRADIENTS))
        self._note(bad, step, kind)
        self._skipped += bad
        self._group_bad.zero_()
        return bad.float()

    def step(self, optimizer: torch.optim.Optimizer, scaler, params: list[torch.Tensor], step: int,
             grad_norm: torch.Tensor | None = None) -> None:
        """The optimizer step of `step` (pretrain and finetune), skipped ON THE DEVICE when the
        losses or gradients were non-finite (no host sync), then the weights checked and the
        gradients cleared. With an enabled fp16 `scaler`, the scaler skips overflowing steps itself.
        """
        found_inf = self.found_inf(params, step, grad_norm, check_grads=not scaler.is_enabled())
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.grad_scale, optimizer.found_inf = None, found_inf  # fused AdamW skips on found_inf
            optimizer.step()
        self.check_weights(params, step)
        optimizer.zero_grad(set_to_none=True)

    def check_weights(self, params: list[torch.Tensor], step: int) -> None:
        """Record (on device) whether the update of `step` left a non-finite parameter."""
        # FSDP: this rank's shards only; the ranks agree on the earliest bad step in `collect`
        local = [t for t in (local_tensor(p.detach()) for p in params) if t.numel()]
        if not local:
            return
        peak = torch.stack(torch._foreach_norm(local, float("inf"))).max()
        self._note(~torch.isfinite(peak), step, torch.tensor(float(WEIGHTS), device=self.device))

    def _note(self, bad: torch.Tensor, step: int, kind: torch.Tensor) -> None:
        first = bad & (self._bad[0] == 0)
        entry = torch.stack([torch.tensor(float(step), dtype=torch.float64, device=self.device),
                             kind.double(), self._group_loss])
        self._bad = torch.where(first, entry, self._bad)

    def window_state(self) -> list[float]:
        """This process's running loss sum and count (a checkpoint taken in the middle of a window)."""
        return [float(self._loss_sum.item()), float(self._loss_count.item())]

    def restore_window(self, state: list[float]) -> None:
        """Continue the window a checkpoint was taken in (`window_state`)."""
        self._loss_sum.fill_(state[0])
        self._loss_count.fill_(state[1])

    def collect(self, env: DistEnv, reset_window: bool) -> GuardReport:
        """Read the counters (the one host sync of a check point), agreed over ranks."""
        sums = torch.stack([self._loss_sum, self._loss_count])
        bad_step = torch.where(self._bad[0] > 0, self._bad[0], float(_NO_STEP))
        agreed = torch.stack([self._skipped, -bad_step])
        if env.enabled:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # max of -step: the earliest bad step
        sums_h, agreed_h, local = sums.tolist(), agreed.tolist(), self._bad.tolist()
        step = int(-agreed_h[1])
        step = 0 if step >= _NO_STEP else step
        report = GuardReport(sums_h[0], sums_h[1], int(agreed_h[0]), step,
                             int(local[1]) if int(local[0]) == step else LOSS,
                             local[2] if int(local[0]) == step else float("nan"))
        if reset_window:
            self._loss_sum.zero_()
            self._loss_count.zero_()
        self._bad.zero_()
        return report


def state_is_finite(*states) -> bool:
    """True if every floating-point tensor in the (nested) state dicts is finite (one sync)."""
    tensors: list[torch.Tensor] = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            obj = local_tensor(obj)  # a sharded state: this rank's shards
            if obj.is_floating_point() and obj.numel():
                tensors.append(obj.detach())
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for s in states:
        walk(s)
    if not tensors:
        return True
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.float() if t.dtype == torch.float64 else t)
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(ts, float("inf")))).all())
               for ts in by_device.values())
