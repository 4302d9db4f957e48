"""The weight initialisation every model here shares (ViT / Swin / MAE conventions)."""

from __future__ import annotations

import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ["init_linear_and_norm"]


def init_linear_and_norm(m: nn.Module, linear: str = "trunc_normal") -> None:
    """Initialise one module: Linear weights by `linear` ("trunc_normal": std 0.02, as Swin and
    PVT; "xavier": uniform, as MAE's ViT and decoder), zero biases; LayerNorm to identity.
    Use as `model.apply(init_linear_and_norm)` or with `functools.partial` for `linear`."""
    if isinstance(m, nn.Linear):
        if linear == "xavier":
            nn.init.xavier_uniform_(m.weight)
        else:
            trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
