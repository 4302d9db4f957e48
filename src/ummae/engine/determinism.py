"""Bit-identical CPU runs: PyTorch's deterministic algorithms, switched on for the run only.

Two fresh CPU runs with the same seed, machine, software and thread count must give the same
bits. Every random draw is seeded (see docs/reliability.md), but one kind of kernel still
depends on thread timing: a backward pass through advanced indexing (`table[index]`, e.g. the
Swin position-bias table gathered for every window) is `index_put_(accumulate=True)`, which
PyTorch runs with atomic float additions on several CPU threads once it has at least 32768
elements, so the summation order, and the last bits of the gradient, change from run to run.
`torch.use_deterministic_algorithms(True)` makes that kernel (and every other one with a
deterministic variant) serial and ordered. Measured on the demo preset (batch 32, 2 threads):
no step-time difference beyond the noise (0.17-0.18 s per forward+backward either way).

Only on the CPU: on CUDA the switch makes kernels without a deterministic variant raise and needs
`CUBLAS_WORKSPACE_CONFIG`, and GPU runs promise bit-identical resume, not bit-identical fresh runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["deterministic_on_cpu"]


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms while the block runs on a CPU `device`; the previous mode after."""
    if device.type != "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every torch.empty with NaN; nothing here reads unset memory.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
