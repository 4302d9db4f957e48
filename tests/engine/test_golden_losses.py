"""Behaviour guard: the first 30 losses of every `*_demo` preset are bit-identical to the record
made before the house was restructured (`tests/golden/losses.py --write`, issue 19)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))
from losses import RECORD, demo_losses, demo_presets  # noqa: E402

WANT = json.loads(RECORD.read_text())["losses"]


def test_every_demo_preset_is_recorded():
    assert sorted(WANT) == sorted(demo_presets())


@pytest.mark.parametrize("preset", sorted(WANT))
def test_first_losses_bit_identical(preset, tmp_path):
    got = demo_losses(preset, tmp_path / "run")
    assert len(got) == len(WANT[preset]) == 30
    assert got == WANT[preset]
