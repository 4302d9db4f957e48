"""Reconstruction objectives and the pixel <-> unit reshapes they need.

Pixels are compared per *mask unit* (SPEC sec. 1): an image `[B, 3, H, W]` is cut into
`L = (H/u) * (W/u)` units of `u x u` pixels, in unit row-major order, each flattened to
`u*u*3` values (channel last, as MAE does).
"""

from __future__ import annotations

import torch

__all__ = ["patchify", "unpatchify", "normalize_targets", "masked_mse_loss", "masked_l1_loss"]


def patchify(imgs: torch.Tensor, unit: int) -> torch.Tensor:
    """Cut images into flattened units.

    Args:
        imgs: `[B, 3, H, W]`, H and W divisible by `unit`.
        unit: unit side in pixels.

    Returns:
        `[B, L, unit*unit*3]`, units in row-major order, values ordered (row, col, channel).
    """
    B, C, H, W = imgs.shape
    if H % unit or W % unit:
        raise ValueError(f"image size {H}x{W} is not divisible by the unit size {unit}")
    h, w = H // unit, W // unit
    x = imgs.reshape(B, C, h, unit, w, unit)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, h * w, unit * unit * C)


def unpatchify(units: torch.Tensor, unit: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`.

    Args:
        units: `[B, L, unit*unit*3]` with `L = grid_size[0] * grid_size[1]`.
        unit: unit side in pixels.
        grid_size: `(h, w)` units.

    Returns:
        `[B, 3, h*unit, w*unit]`.
    """
    B, L, D = units.shape
    h, w = grid_size
    C = D // (unit * unit)
    if h * w != L or C * unit * unit != D:
        raise ValueError(f"cannot unpatchify [B, {L}, {D}] into a {h}x{w} grid of {unit}px units")
    x = units.reshape(B, h, w, unit, unit, C)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, C, h * unit, w * unit)


def normalize_targets(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-unit pixel normalisation of MAE's `norm_pix_loss`.

    Args:
        target: `[B, L, D]` unit pixels.

    Returns:
        `[B, L, D]`, each unit shifted to mean 0 and divided by `sqrt(var + eps)`.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=False)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error averaged over the masked units only.

    Args:
        pred: `[B, L, D]` predicted unit pixels.
        target: `[B, L, D]` target unit pixels (already normalised if wanted).
        mask: `[B, L]` bool, True = masked; only these units count.

    Returns:
        scalar loss.
    """
    per_unit = (pred - target).pow(2).mean(dim=-1)  # [B, L]
    weight = mask.to(per_unit.dtype)
    return (per_unit * weight).sum() / weight.sum().clamp_min(1.0)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels of the masked units (SimMIM's loss).

    Args:
        pred, target: `[B, L, D]` unit pixels.
        mask: `[B, L]` bool, True = masked.

    Returns:
        scalar loss.
    """
    per_unit = (pred - target).abs().mean(dim=-1)  # [B, L]
    weight = mask.to(per_unit.dtype)
    return (per_unit * weight).sum() / weight.sum().clamp_min(1.0)
