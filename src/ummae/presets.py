"""Named, ready-to-run configurations (`ummae presets` lists them).

Each preset is a set of overrides on the defaults of `ummae.config`. Paper recipes follow
SPEC sec. 6 (UM-MAE's ImageNet-1K scripts); `demo` is a tiny Swin that learns something
visible from the built-in photographs in about two minutes on a laptop CPU.
"""

from __future__ import annotations

import copy
from typing import Any

from .config import PretrainConfig, apply_overrides
from .errors import ConfigError

__all__ = ["PRESETS", "get_preset", "preset_names"]

# name -> (one-line description, overrides)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": (
        "tiny Swin, UM-MAE on the built-in demo photographs, 128 px; about 2 min on a 2-core CPU",
        {
            "model": dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4,
                          decoder_dim=128, decoder_depth=1, decoder_heads=4),
            "masking": dict(unit_size=16, secondary_ratio=0.25),
            "data": dict(img_size=128, min_crop_scale=0.2, demo_length=256, num_workers=2),
            "optim": dict(blr=1.5e-4, lr=1e-3, warmup_epochs=1, weight_decay=0.05),
            "train": dict(epochs=30, batch_size=32, accum_steps=1, log_every=2),
        },
    ),
    "ummae_swin_tiny_256": (
        "the paper's Swin-T UM-MAE recipe: 256 px, unit 16, SM 0.25, 200 epochs, effective batch 4096",
        {
            "model": dict(arch="swin", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                          window_size=8, pos_hidden_dim=32, decoder_dim=512, decoder_depth=2,
                          decoder_heads=16, norm_pix_loss=True),
            "masking": dict(unit_size=16, secondary_ratio=0.25),
            "data": dict(img_size=256, min_crop_scale=0.2),
            "optim": dict(blr=1.5e-4, lr=None, weight_decay=0.05, betas=[0.9, 0.95], warmup_epochs=10),
            # 256 images x 16 accumulation steps = the paper's effective batch of 4096 on one device.
            "train": dict(epochs=200, batch_size=256, accum_steps=16),
        },
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> PretrainConfig:
    """A fresh `PretrainConfig` for the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (--preset); available: {', '.join(PRESETS)}")
    cfg = PretrainConfig(preset=name)
    return apply_overrides(cfg, copy.deepcopy(PRESETS[name][1]), f"preset '{name}'")
