"""Reconstruction objectives and the pixel <-> unit reshapes they need.

Pixels are compared per *mask unit* (SPEC sec. 1): an image `[B, 3, H, W]` is cut into
`L = (H/u) * (W/u)` units of `u x u` pixels, in unit row-major order, each flattened to
`u*u*3` values (channel last, as MAE does).

`self_consistency_loss` is EMAE's term (SPEC sec. 7): it pulls together the predictions that the
K disjoint parts of an image make for the same unit.
"""

from __future__ import annotations

import torch

__all__ = ["patchify", "unpatchify", "normalize_targets", "pixel_targets", "masked_mse_loss", "masked_l1_loss",
           "self_consistency_loss", "CONSISTENCY_DISTANCES"]

CONSISTENCY_DISTANCES = ("l1", "l2")


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


def pixel_targets(imgs: torch.Tensor, unit: int, norm_pix_loss: bool = True) -> torch.Tensor:
    """The reconstruction targets of MAE-style objectives: `imgs` `[B, 3, H, W]` cut into units,
    each normalised (`normalize_targets`) when `norm_pix_loss`; `[B, L, unit*unit*3]`."""
    target = patchify(imgs, unit)
    return normalize_targets(target) if norm_pix_loss else target


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


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-unit distance `[..., D] -> [...]`: mean absolute (l1) or mean squared (l2) difference."""
    diff = a - b
    return (diff.abs() if distance == "l1" else diff.pow(2)).mean(dim=-1)


def self_consistency_loss(pred: torch.Tensor, mask: torch.Tensor, distance: str = "l1") -> torch.Tensor:
    """EMAE's self-consistency over the units that two parts of an image both had to predict.

    For every pair of parts `i < j` and every unit masked in both, the symmetric distance with a
    stop-gradient on the other branch,

        d(sg(p_i), p_j) + d(p_i, sg(p_j)),

    so each branch is pulled towards the other's current prediction as a fixed target (`d` = mean
    absolute or squared difference over the unit's pixels). Averaged over all such (image, pair,
    unit) triples. With K = 4 random or uniform parts every unit is masked in 3 parts, so it
    takes part in 3 of the 6 pairs.

    Args:
        pred: `[B, K, L, D]` predictions of the K parts of each image.
        mask: `[B, K, L]` bool, True = masked in that part (only those predictions are compared:
            a visible unit's prediction is not trained and means nothing).
        distance: "l1" or "l2".

    Returns:
        scalar; 0 when all parts agree on every unit they share.
    """
    if distance not in CONSISTENCY_DISTANCES:
        raise ValueError(f"consistency distance must be one of {CONSISTENCY_DISTANCES}, got {distance!r}")
    K = pred.shape[1]
    i, j = torch.triu_indices(K, K, offset=1, device=pred.device)  # the K(K-1)/2 pairs
    p_i, p_j = pred[:, i], pred[:, j]  # [B, P, L, D]
    per_unit = (_distance(p_i.detach(), p_j, distance) + _distance(p_i, p_j.detach(), distance))  # [B, P, L]
    both = (mask[:, i] & mask[:, j]).to(per_unit.dtype)  # [B, P, L]
    return (per_unit * both).sum() / both.sum().clamp_min(1.0)
