"""Packing the visible units of a uniform mask into the half-size *compact image* (SPEC sec. 2).

Under uniform sampling every 2x2 block of units keeps exactly one unit, so gathering the kept
unit of each block, in block row-major order, tiles a regular image of half the height and
width. A windowed encoder (Swin) or one with spatial-reduction attention (PVT) then runs on it
unchanged, at a quarter of the cost. What the encoder must not lose is *where* each token really
was: `compact_coordinates` gives every compact token its true position in the full image.

Because a unit is a whole number of patches, packing pixels before the patch embedding is the
same as packing patch embeddings after it, and four times cheaper.
"""

from __future__ import annotations

import torch

from .objectives import patchify, unpatchify

__all__ = ["compact_image", "compact_coordinates", "compact_unit_flags", "full_coordinates"]


def compact_image(imgs: torch.Tensor, ids_keep: torch.Tensor, unit: int) -> torch.Tensor:
    """Gather the visible unit of each block into the compact image.

    Args:
        imgs: `[B, 3, H, W]` full images.
        ids_keep: `[B, H*W/(4*unit^2)]` visible unit index of each block, block row-major order
            (`MaskSample.ids_keep` of a uniform mask).
        unit: mask unit in pixels.

    Returns:
        `[B, 3, H/2, W/2]`; compact unit `(i, j)` is the visible unit of block `(i, j)`.
    """
    B, _, H, W = imgs.shape
    units = patchify(imgs, unit)  # [B, L, unit*unit*3]
    kept = units.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, units.shape[-1]))
    return unpatchify(kept, unit, (H // unit // 2, W // unit // 2))


def compact_unit_flags(flags: torch.Tensor, ids_keep: torch.Tensor, grid_size: tuple[int, int],
                       patches_per_unit: int) -> torch.Tensor:
    """Move per-unit flags (e.g. the secondary mask) onto the compact patch grid.

    Args:
        flags: `[B, L]` bool over the full unit grid.
        ids_keep: `[B, L/4]` block row-major visible units.
        grid_size: `(h, w)` full unit grid.
        patches_per_unit: patches along one side of a unit (`unit // patch_size`).

    Returns:
        `[B, h/2 * p, w/2 * p]` bool, one entry per compact patch.
    """
    h, w = grid_size
    per_block = flags.gather(1, ids_keep).reshape(-1, h // 2, w // 2)
    p = patches_per_unit
    return per_block.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)


def compact_coordinates(ids_keep: torch.Tensor, grid_size: tuple[int, int],
                        patches_per_unit: int) -> torch.Tensor:
    """True positions, in the full image, of the patches of the compact image.

    Positions are patch *centres* in patch units (`row + 0.5, col + 0.5`), so a merge of 2x2
    tokens can halve the mean of its children and stay exact (see `models.swin.merge_coordinates`).

    Args:
        ids_keep: `[B, L/4]` block row-major visible units.
        grid_size: `(h, w)` full unit grid.
        patches_per_unit: patches along one side of a unit.

    Returns:
        `[B, h/2 * p, w/2 * p, 2]` float32 (row, col) of each compact patch.
    """
    h, w = grid_size
    p = patches_per_unit
    B = ids_keep.shape[0]
    unit_r = torch.div(ids_keep, w, rounding_mode="floor").reshape(B, h // 2, w // 2)
    unit_c = (ids_keep % w).reshape(B, h // 2, w // 2)
    # Every patch of compact unit (i, j) sits at its unit's true corner plus its offset inside it.
    unit_r = unit_r.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
    unit_c = unit_c.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
    offset = torch.arange(h // 2 * p, device=ids_keep.device) % p
    offset_c = torch.arange(w // 2 * p, device=ids_keep.device) % p
    rows = unit_r * p + offset.view(1, -1, 1)
    cols = unit_c * p + offset_c.view(1, 1, -1)
    return torch.stack([rows, cols], dim=-1).float() + 0.5


def full_coordinates(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Patch-centre coordinates of an unmasked `height x width` patch grid.

    Returns:
        `[1, height, width, 2]` float32 (row, col), shared by the whole batch.
    """
    rows = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    cols = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    return grid.unsqueeze(0)
