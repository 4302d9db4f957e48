"""`ummae presets` builds no model: encoder sizes come from `ummae.preset_sizes`, exact for every
preset (checked against a real build here), with a build as the fallback for a changed preset."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ummae.preset_sizes as preset_sizes
from ummae.cli.presets import config_digest, encoder_params
from ummae.resolve import resolve_config
from ummae.models import build_pretrain_model
from ummae.presets import PRESETS

REGENERATE = 'python -c "from ummae.cli.presets import write_size_table; write_size_table()"'


def _built_count(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_pretrain_model(cfg).encoder.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_size_table_is_exact_for_every_preset(name):
    cfg = resolve_config(preset=name)
    entry = preset_sizes.ENCODER_PARAMS.get(name)
    assert entry is not None and entry[0] == config_digest(cfg), f"{name}: stale table; run {REGENERATE}"
    assert entry[1] == _built_count(cfg), f"{name}: the model changed; run {REGENERATE}"


def test_a_changed_preset_is_counted_by_building_it(monkeypatch):
    cfg = resolve_config(preset="demo")
    real = _built_count(cfg)
    # Right digest, wrong count: the table is trusted (so the digest is what guards it) ...
    monkeypatch.setitem(preset_sizes.ENCODER_PARAMS, "demo", (config_digest(cfg), real + 1))
    assert encoder_params("demo", cfg) == real + 1
    # ... and a digest of another configuration is ignored: the model is built and counted.
    monkeypatch.setitem(preset_sizes.ENCODER_PARAMS, "demo", ("0" * 16, real + 1))
    assert encoder_params("demo", cfg) == real
    monkeypatch.delitem(preset_sizes.ENCODER_PARAMS, "demo")
    assert encoder_params("demo", cfg) == real


def test_the_listing_imports_neither_torch_nor_timm():
    code = ("import sys; from ummae.cli import main; main(['presets']); "
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False"
    assert "demo" in result.stdout  # negative control: the listing did run
