"""SIGTERM and SIGINT: finish the current step, write a checkpoint, exit with a clear line.

Clusters stop a job with SIGTERM (SLURM at preemption, time limit or `scancel`, then SIGKILL
after its grace period, `KillWait`, 30 s by default; Kubernetes likewise, 30 s by default;
`torchrun` forwards the SIGTERM it gets to every worker). Ctrl-C is SIGINT. While the training
loop runs, both only set a flag; the loop sees it at the next step boundary (in a multi-process
run at the next check point, where the ranks agree), writes a checkpoint and raises
`RunInterrupted`. The command line then exits with 128 + the signal number, 143 for SIGTERM and
130 for SIGINT, the status a shell, SLURM and torchrun report for a process ended by that
signal, so a job script can tell "stopped, resumable" (143/130) from "failed" (1, 2) and requeue.
A second signal of the same kind stops at once (the default action).
"""

from __future__ import annotations

import signal
import threading

from ..errors import UmmaeError

__all__ = ["StopSignals", "RunInterrupted"]

_HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(UmmaeError):
    """The run stopped on a signal after writing a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT set `received` instead of stopping.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in _HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM/SIGINT (sent to the whole process
    group by Ctrl-C and by SLURM); the main process finishes its step and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
