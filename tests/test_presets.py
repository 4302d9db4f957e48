"""Presets: every one resolves, validates and builds; the Swin-T preset is the paper's recipe."""

from __future__ import annotations

import pytest
import torch

from ummae.config import config_to_dict, validate
from ummae.resolve import resolve_config
from ummae.errors import ConfigError
from ummae.models import build_pretrain_model
from ummae.presets import PRESETS, get_preset, preset_names


def meta_model(cfg):
    with torch.device("meta"):  # shapes only: no memory, no init time
        return build_pretrain_model(cfg)


def test_there_are_presets_and_demo_is_one():
    assert preset_names() == list(PRESETS)
    assert "demo" in PRESETS and "ummae_swin_tiny_256" in PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_resolves_validates_and_builds(name):
    description, _ = PRESETS[name]
    assert description.strip() and "\n" not in description
    cfg = resolve_config(preset=name)
    assert cfg.preset == name
    assert validate(get_preset(name)) is not None
    model = meta_model(cfg)
    assert model.img_size == (cfg.data.img_size, cfg.data.img_size)
    assert model.unit == cfg.masking.unit_size
    assert sum(p.numel() for p in model.encoder.parameters()) > 0


@pytest.mark.parametrize("name", list(PRESETS))
def test_get_preset_returns_an_independent_copy(name):
    first = get_preset(name)
    first.model.depths.append(99)
    first.optim.betas[0] = 0.0
    first.train.epochs += 1
    second = get_preset(name)
    assert 99 not in second.model.depths
    assert second.optim.betas[0] != 0.0
    assert config_to_dict(second) == config_to_dict(get_preset(name))


def test_unknown_preset_names_the_option_and_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        get_preset("swin_huge")
    message = str(info.value)
    assert "swin_huge" in message and "--preset" in message
    for name in PRESETS:
        assert name in message


def test_swin_tiny_preset_is_the_paper_recipe():
    cfg = resolve_config(preset="ummae_swin_tiny_256")
    m, k, d, o, t = cfg.model, cfg.masking, cfg.data, cfg.optim, cfg.train
    assert d.img_size == 256
    assert (cfg.method, k.unit_size, k.secondary_ratio) == ("ummae", 16, 0.25)
    assert o.blr == 1.5e-4 and o.lr is None
    assert list(o.betas) == [0.9, 0.95]
    assert o.weight_decay == 0.05
    assert o.warmup_epochs == 10
    assert t.epochs == 200
    assert cfg.effective_batch == 4096
    assert cfg.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert (m.arch, m.embed_dim, m.window_size) == ("swin", 96, 8)
    assert list(m.depths) == [2, 2, 6, 2]
    assert list(m.num_heads) == [3, 6, 12, 24]
    assert m.norm_pix_loss is True


def test_swin_tiny_encoder_has_swin_t_size():
    model = meta_model(resolve_config(preset="ummae_swin_tiny_256"))
    n = sum(p.numel() for p in model.encoder.parameters())
    assert 27_000_000 <= n <= 28_500_000, n
    assert model.encoder.stride == 32  # 4 stages: 4 * 2**3
