"""The training-step skeleton and the loop's check points, shared by pretrain, finetune and `ummae bench`.

`TrainStep` is one optimizer step from `accum` micro-batches; what a micro-batch means (the
pre-training model and its masks, fine-tuning's mixing and loss) is the caller's `prepare` and
`loss`. For each micro-batch of the step:

    seed_step(step)                     at the first micro-batch: every draw of the step seeded
    inputs, n = prepare(batch)          host -> device, masks, mixing (outside autocast)
    loss = loss(*inputs)                under the training autocast (bf16 on CUDA with `auto`)
    factor = guard.loss_factor(loss)    1.0, or NaN for a non-finite loss (engine.guard)
    scaler.scale(loss * factor / accum).backward()   gradient sync off but for the last one
                                        (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`)

then clipping (optional, after unscaling), the guarded optimizer step (fused AdamW, skipped ON THE
DEVICE when a loss or gradient is non-finite) and the scheduler. Nothing in it reads a value back
to the host: the loop does that only at its check points (`CheckPoints`): a log line, a periodic
checkpoint, a signal, where the guard's counters are collected once.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.profiler import record_function

from .checkpoint import prune_step_checkpoints, save_checkpoint, step_checkpoint_path
from .distributed import DistEnv, all_reduce_max
from .guard import GuardReport, NonFiniteLossError, StepGuard, state_is_finite
from .sharding import clip_grad_norm, gradient_sync_off, is_sharded
from .signals import RunInterrupted, StopSignals

__all__ = ["training_autocast", "TrainStep", "StepCheckpoints", "CheckPoints", "shutdown_workers"]

_END = object()


def training_autocast(device: torch.device, precision: str):
    """The autocast context of training: bf16 on CUDA for precision `auto`, else as configured."""
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """One optimizer step from `accum` micro-batches (see the module docstring).

    Args:
        train_model: the module backward runs through (DDP-wrapped or FSDP-sharded: its
            gradient sync is turned off but for the last micro-batch, `sharding.gradient_sync_off`).
        params: the parameters the optimizer updates (the guard checks them).
        prepare: `batch -> (inputs, num_images)`, outside autocast.
        loss: `*inputs -> 0-d loss tensor`, under the training autocast.
        seed_step: `step -> None`, called at the first micro-batch of each step (None: no seeding).
        distributed: the model is DDP-wrapped or sharded (gradients reduced at the last micro-batch only).
    The phases are labelled `forward`, `backward` and `optimizer` for `torch.profiler`.
    """

    def __init__(self, train_model: torch.nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 scheduler, scaler: torch.amp.GradScaler, guard: StepGuard, *, prepare: Callable,
                 loss: Callable, device: torch.device, precision: str, accum: int = 1,
                 clip_grad: float | None = None, seed_step: Callable[[int], None] | None = None,
                 distributed: bool = False):
        self.train_model, self.params, self.optimizer = train_model, params, optimizer
        self.scheduler, self.scaler, self.guard = scheduler, scaler, guard
        self.prepare, self.loss, self.seed_step = prepare, loss, seed_step
        self.device, self.precision, self.accum = device, precision, accum
        self.clip_grad, self.distributed = clip_grad, distributed
        self.sharded = is_sharded(train_model)

    def __call__(self, batches: Iterator, step: int) -> int | None:
        """Optimizer step `step + 1` on the next `accum` micro-batches of `batches`: the number of
        images it trained on, or None if `batches` ran out before the step was complete."""
        images = 0
        for micro in range(1, self.accum + 1):
            batch = next(batches, _END)
            if batch is _END:
                return None
            if micro == 1 and self.seed_step is not None:
                self.seed_step(step)
            images += self._micro_step(batch, last=micro == self.accum)
        self._optimizer_step(step + 1)
        return images

    def _micro_step(self, batch, last: bool) -> int:
        with record_function("forward"):
            inputs, num_images = self.prepare(batch)
            with training_autocast(self.device, self.precision):
                loss = self.loss(*inputs)
        with record_function("backward"):
            # A non-finite loss turns the gradients to NaN (x NaN instead of x 1.0), on every rank.
            factor = self.guard.loss_factor(loss)
            with contextlib.nullcontext() if last or not self.distributed else gradient_sync_off(self.train_model):
                self.scaler.scale(loss * factor / self.accum).backward()
        return num_images

    def _optimizer_step(self, step: int) -> None:
        """The update of `step`, skipped on the device when anything is non-finite: no host sync."""
        with record_function("optimizer"):
            grad_norm = None
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                # FSDP: the global norm of the sharded gradients, each rank scaling its own shards
                clip = clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
                grad_norm = clip(self.params, self.clip_grad)
            self.guard.step(self.optimizer, self.scaler, self.params, step, grad_norm)
            self.scheduler.step_update(step)


class StepCheckpoints:
    """A run's periodic checkpoints `run_dir/checkpoints/step-N.pt`: checked finite, written
    atomically by rank 0, the newest `keep_last` kept. `state()` is called on every rank (it may
    gather from all of them) and gives the dict to write."""

    def __init__(self, run_dir: Path, keep_last: int, env: DistEnv, state: Callable[[], dict],
                 last_saved: int | None, write_sharded: Callable[[Path], Path] | None = None):
        self.run_dir, self.keep_last, self.env, self.state = run_dir, keep_last, env, state
        self.last_saved = last_saved  # the step of the newest checkpoint, None before the first
        # FSDP: `path -> path`, every rank writes its shards into the folder (sharded_checkpoint)
        self.write_sharded = write_sharded

    def path(self, step: int) -> Path:
        return step_checkpoint_path(self.run_dir, step, sharded=self.write_sharded is not None)

    def save(self, step: int) -> Path | None:
        """Write the state at `step`; its path on rank 0, None on the others."""
        if self.write_sharded is not None:
            path = self.write_sharded(self.path(step))
            if self.env.is_main:
                prune_step_checkpoints(self.run_dir, self.keep_last)
            self.last_saved = step
            return path if self.env.is_main else None
        state = self.state()
        if not self.env.is_main:
            self.last_saved = step
            return None
        if not state_is_finite(state["model"], state["optimizer"]):  # belt and braces; see guard.py
            raise NonFiniteLossError(f"the state at step {step} is not finite; nothing was written "
                                     f"(last checkpoint: step {self.last_saved})")
        path = save_checkpoint(step_checkpoint_path(self.run_dir, step), state)
        prune_step_checkpoints(self.run_dir, self.keep_last)
        self.last_saved = step
        return path


@dataclass
class CheckPoints:
    """Where the loop stops to look, after an optimizer step: a log line every `log_every` steps
    (and at the last), a periodic checkpoint every `save_every` (0: none), a signal (one process:
    at once; DDP: at the next log or checkpoint, where the ranks agree on it). At each one the
    guard's counters are read (the one host sync) and a non-finite step stops the run."""

    env: DistEnv
    device: torch.device
    guard: StepGuard
    stop: StopSignals
    checkpoints: StepCheckpoints
    total_steps: int
    log_every: int
    save_every: int
    raise_if_nonfinite: Callable[[GuardReport, int | None], None]  # (report, last saved step)
    log: Callable[[int, GuardReport, float], None]  # (step, report, time.perf_counter() now)

    def visit(self, step: int, reset_window: bool = True) -> None:
        """The check point after optimizer step `step`, if one is due. `reset_window`: a log line
        starts a new loss window (pre-training), else the window runs to the epoch's end."""
        log_due = step % self.log_every == 0 or step == self.total_steps
        save_due = bool(self.save_every) and step % self.save_every == 0 and step < self.total_steps
        signal_due = self.stop.received is not None and not self.env.enabled  # DDP: at the next check point
        if not (log_due or save_due or signal_due):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        report = self.guard.collect(self.env, reset_window=log_due and reset_window)  # the one host sync
        self.raise_if_nonfinite(report, self.checkpoints.last_saved)
        if log_due:
            self.log(step, report, now)
        if save_due:
            self.checkpoints.save(step)
        self.stop_if_signalled(step)

    def stop_if_signalled(self, step: int) -> None:
        """Raise `RunInterrupted` (after a checkpoint of `step`) if any rank received SIGTERM/SIGINT."""
        received = self.stop.received
        if self.env.enabled:  # all ranks agree, so they stop at the same step
            received = int(all_reduce_max(float(received or 0), self.env, self.device)) or None
        if received is None or step >= self.total_steps:
            return
        saved = self.checkpoints.save(step) if self.checkpoints.last_saved != step else None
        path = saved or self.checkpoints.path(step)  # DDP: rank 0 wrote it
        run_dir = self.checkpoints.run_dir
        raise RunInterrupted(f"stopped by {signal.Signals(received).name} at step {step}; checkpoint '{path}' "
                             f"written; the same command with --resume auto (and --out '{run_dir}') continues "
                             f"the run exactly", received)


def shutdown_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop persistent DataLoader workers now. After an error the live iterator is held by the
    traceback, and its workers would linger until a garbage collection (which then blocks ~10 s);
    torch has no public call for this, hence the private one, guarded."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
