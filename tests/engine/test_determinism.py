"""Two fresh CPU runs with the same seed are bit-identical (#13 item 10).

The one kernel that broke this was the backward of advanced indexing (`table[index]`, Swin's
position-bias table gathered for every window): `index_put_(accumulate=True)` with atomic float
additions on several threads. `ummae.engine.determinism.deterministic_on_cpu` switches PyTorch's
deterministic algorithms on for CPU runs (pretrain and finetune) and restores the mode after.
The tests use 2 threads (the conftest runs everything else on one, where the race cannot happen).
"""

from __future__ import annotations

import json

import pytest
import torch

import ummae.engine.pretrain as pretrain_module
from tiny import run_cli_captured, tiny_pretrain_args
from ummae.resolve import resolve_config
from ummae.engine.checkpoint import load_checkpoint
from ummae.engine.determinism import deterministic_on_cpu


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_indexing_backward_is_bit_identical_under_the_cpu_switch(two_threads):
    # 200,000 gathered rows: far above the 32,768 elements from which PyTorch parallelises the
    # accumulation (measured: without the switch, 0 of 20 repeats were bit-identical here).
    g = torch.Generator().manual_seed(0)
    table0 = torch.randn(300, 4, generator=g)
    index = torch.randint(0, 300, (200_000,), generator=g)
    weight = torch.randn(200_000, 4, generator=g)

    def gradient() -> torch.Tensor:
        table = table0.clone().requires_grad_()
        (table[index] * weight).sum().backward()
        return table.grad

    with deterministic_on_cpu(torch.device("cpu")):
        first = gradient()
        assert all(torch.equal(first, gradient()) for _ in range(10))


def test_the_switch_is_on_only_during_a_cpu_run_and_restored_after(monkeypatch):
    seen = []
    monkeypatch.setattr(pretrain_module, "_pretrain",
                        lambda *args: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert not torch.are_deterministic_algorithms_enabled()
    pretrain_module.pretrain(resolve_config("demo", flags={"train.device": "cpu"}), progress=False)
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()
    with deterministic_on_cpu(torch.device("meta")):  # any other device: left alone
        assert not torch.are_deterministic_algorithms_enabled()


def test_two_fresh_cpu_runs_with_the_same_seed_are_bit_identical(tmp_path, two_threads):
    # Batch 32 of the tiny Swin gathers 32 x 4 windows x 16 x 16 = 32,768 bias rows per block:
    # the threaded accumulation path.
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = run_cli_captured(tiny_pretrain_args(out, "--set", "data.demo_length=64", "--batch-size", "32",
                                                     "--max-steps", "4"), out)
        assert result.code == 0, result.err
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append((losses, load_checkpoint(out / "checkpoint.pt")))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert len(losses_a) == 4 and losses_a == losses_b
    for key, tensor in state_a["model"].items():
        assert torch.equal(tensor, state_b["model"][key]), key
    for key, tensor in state_a["optimizer"]["state"].items():
        for name, value in tensor.items():
            assert torch.equal(value, state_b["optimizer"]["state"][key][name]), (key, name)
