"""Behaviour guard: the first 30 losses of every `*_demo` preset equal the record made before the
house was restructured (`tests/golden/losses.py --write`, issue 19): bit for bit on the kind of
machine that made it, to float32 rounding carried over 30 steps (relative 1e-4) on another CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))
from losses import RECORD, demo_losses, demo_presets, machine  # noqa: E402

RECORDED = json.loads(RECORD.read_text())
WANT = RECORDED["losses"]
MACHINE = machine()


def recorded_here(preset: str) -> bool:
    """Whether `preset`'s losses were recorded on this kind of machine (a later addition keeps its own)."""
    return RECORDED.get("machines", {}).get(preset, RECORDED.get("machine")) == MACHINE


def test_every_demo_preset_is_recorded():
    assert sorted(WANT) == sorted(demo_presets())


@pytest.mark.parametrize("preset", sorted(WANT))
def test_first_losses_as_recorded(preset, tmp_path):
    got = demo_losses(preset, tmp_path / "run")
    assert len(got) == len(WANT[preset]) == 30
    if recorded_here(preset):
        assert got == WANT[preset]  # bit-identical
    else:
        assert [float.fromhex(x) for x in got] == pytest.approx([float.fromhex(x) for x in WANT[preset]], rel=1e-4)
