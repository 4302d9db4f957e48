"""Swin Transformer for UM-MAE: one backbone for compact (pre-training) and full images.

Swin: Hierarchical Vision Transformer using Shifted Windows, Liu et al., ICCV 2021.
UM-MAE: Uniform Masking, Li et al., arXiv 2205.10063 (SPEC sec. 3).

What UM-MAE changes, and why this file does not just call timm's `SwinTransformer`:
- Under uniform masking the encoder runs on the compact image (the visible unit of every 2x2
  block packed into a half-size image). Neighbours on that grid are not neighbours in the
  photograph, so the relative position bias must come from each token's *true* coordinates,
  which differ per sample. The bias is therefore a small MLP of log-spaced coordinate
  differences (`CoordinatePositionBias`) instead of a table indexed by offsets inside a window,
  and every block carries a coordinate map next to its tokens.
- The MLP is continuous, so the same weights run the full image with a larger window
  (fine-tuning: window 16 at 256 px) without interpolating any table.
- Visible units picked by secondary masking get a learnable token in place of their patch
  embedding, before the patch-embedding norm.
Everything else (patch embedding, MLP, drop path, patch merging) is timm's.

Shapes: tokens are kept channel-last, `[B, H, W, C]`; coordinates `[Bc, H, W, 2]` with `Bc` = B
(per-sample, compact image) or 1 (shared, full image), in units of the current stage's tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_notrace_function, register_notrace_module
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse

from ..compaction import compact_coordinates, compact_image, compact_unit_flags, full_coordinates
from ..errors import ConfigError
from ..masking import MaskSample, require_uniform
from . import official, swin_timm
from .pyramid import PYRAMID_LAYOUT, PyramidBackbone
from .specs import BackboneSpec, non_default_options, register_backbone
from .weight_init import init_linear_and_norm

__all__ = ["SwinTransformer", "CoordinatePositionBias", "CoordinateLattice", "ConvPatchMerging", "merge_coordinates"]

# Patch merging: "linear" = timm's PatchMerging (the Swin paper's: concatenate the 2x2 neighbours,
# LayerNorm, Linear without bias); "conv" = the official UM-MAE code's (`ConvPatchMerging`).
MERGES = ("linear", "conv")


def log_spaced(d: torch.Tensor) -> torch.Tensor:
    """`sign(d) * log(1 + |d|)`: near offsets resolved finely, far ones compressed."""
    return torch.sign(d) * torch.log1p(d.abs())


@register_notrace_function  # FX: branches on the (symbolic) grid size, so one graph node
def merge_coordinates(coords: torch.Tensor) -> torch.Tensor:
    """Coordinates after a 2x2 patch merge: mean of the four children, halved.

    With patch-centre coordinates this maps a full grid exactly onto the next stage's grid, and
    on the compact grid it places a merged token at the centre of its (scattered) children.

    Args:
        coords: `[Bc, H, W, 2]`.

    Returns:
        `[Bc, ceil(H/2), ceil(W/2), 2]`.
    """
    Bc, H, W, _ = coords.shape
    if H % 2 or W % 2:  # odd grid: timm's PatchMerging pads one row / column, so do the coordinates
        coords = extend_coordinates(coords, (H % 2, W % 2))
        H, W = H + H % 2, W + W % 2
    return coords.reshape(Bc, H // 2, 2, W // 2, 2, 2).mean(dim=(2, 4)) / 2


def _region_labels(size: int, win: int, shift: int, device: torch.device) -> torch.Tensor:
    # Along one axis of the rolled grid: 0 = tokens that stayed, 1 = the last window's tokens that
    # did not wrap, 2 = tokens wrapped round from the start (shift > 0).
    i = torch.arange(size, device=device)
    return (i >= size - win).long() + (i >= size - shift).long()


def window_attention_mask(H: int, W: int, win: tuple[int, int], shift: tuple[int, int],
                          device: torch.device) -> torch.Tensor | None:
    """`[nW, N, N]` bool, True where attention must be blocked in the windows of an `H x W` grid
    padded to whole windows (bottom rows, right columns) and then cyclically shifted by `shift`;
    None when nothing is padded or shifted.

    - The cyclic shift brings regions of the grid together that were not neighbours before the
      roll; tokens of different regions must not attend to each other.
    - A padded token is never a key of a real one (timm and the original Swin attend the zero
      padding instead), so real outputs do not depend on the padding.
    Built from the static sizes with tensor ops on `device` (no host copy, and a constant under
    `torch.compile`).
    """
    Hp, Wp = H + -H % win[0], W + -W % win[1]
    if (Hp, Wp) == (H, W) and not any(shift):
        return None
    N = win[0] * win[1]
    labels = 3 * _region_labels(Hp, win[0], shift[0], device).view(Hp, 1) \
        + _region_labels(Wp, win[1], shift[1], device).view(1, Wp)  # [Hp, Wp]
    labels = window_partition(labels.view(1, Hp, Wp, 1), win).reshape(-1, N)
    blocked = labels.unsqueeze(1) != labels.unsqueeze(2)  # [nW, N(query), N(key)]
    padded = (torch.arange(Hp, device=device) >= H).view(Hp, 1) | (torch.arange(Wp, device=device) >= W).view(1, Wp)
    padded = torch.roll(padded, (-shift[0], -shift[1]), dims=(0, 1))
    padded = window_partition(padded.view(1, Hp, Wp, 1), win).reshape(-1, N)
    return blocked | (padded.unsqueeze(1) & ~padded.unsqueeze(2))


def extend_coordinates(coords: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Coordinates `[Bc, H, W, 2]` continued by `pad = (rows, cols)` cells at the bottom / right,
    each axis stepping on by its last spacing (exact for a full grid, where it is the grid that
    a larger image would have). Keeps offsets to padded cells in the range real windows see."""
    for dim, n in ((1, pad[0]), (2, pad[1])):
        if n == 0:
            continue
        size = coords.shape[dim]
        last = coords.narrow(dim, size - 1, 1)
        step = last - coords.narrow(dim, size - 2, 1) if size > 1 else torch.ones_like(last)
        k = torch.arange(1, n + 1, device=coords.device, dtype=coords.dtype)
        k = k.view([-1 if d == dim else 1 for d in range(coords.ndim)])
        coords = torch.cat([coords, last + k * step], dim=dim)
    return coords


# -- where coordinates can lie: the static position-bias table ----------------------------------
#
# On a full grid every token sits at `index + 1/2`, so two tokens of a window are `index`
# differences apart: integers in [-(win-1), win-1]. On the compact grid of a uniform mask the
# stage-1 patch at compact index r (unit i = r // p, a = r % p, p = patches per unit) truly sits at
#     2p i + p dr + a + 1/2 = 2 r + (p dr - a + 1/2),
# with dr in {0, 1} the row of the kept unit inside its 2x2 block (drawn per block; the same for
# columns with dc). After s merges (mean of the 2x2 children, halved) the token at stage index r
# covers the stage-1 patches 2^s r + t, t < 2^s, and sits at
#     2 r + (2^s - 1/2 - mean_t((2^s r + t) % p) + p * mean(dr over the units it covers)) / 2^s,
# the mean of dr weighted by how many of the token's patches each unit holds. Every coordinate is
# therefore `scale * index + d` with `scale` 2 (compact) or 1 (full) and `d` from a small finite
# set D known from (p, s) alone. Two tokens of a window (whose indices differ by at most win-1;
# in a shifted window, those not blocked are true neighbours too) are then
#     scale * (r_i - r_j) + d_i - d_j
# apart: a finite set on a lattice of step `gcd(scale, differences of D)`, inside a known range.
# Evaluating the MLP once on that lattice and gathering by the integer lattice index of each
# pair gives the same numbers as evaluating it per pair, with static shapes (no `unique`).


@dataclass(frozen=True)
class CoordinateLattice:
    """The coordinates a Swin stage's tokens can have, per axis (see the comment above).

    `scale * index + d`, `d` in `deviations` (exact fractions). Build with `full()` or
    `compact(p)`, and `merged()` for each following stage.
    """

    kind: str  # "full" or "compact"
    patches_per_unit: int = 1  # p, compact only
    merges: int = 0  # s: patch merges since stage 1

    @classmethod
    def full(cls) -> "CoordinateLattice":
        return cls("full")

    @classmethod
    def compact(cls, patches_per_unit: int) -> "CoordinateLattice":
        return cls("compact", int(patches_per_unit))

    def table_size(self, window: tuple[int, int]) -> int:
        """Entries of the bias table for a `(rows, cols)` window."""
        (_, k_r), (_, k_c) = self.axis(window[0]), self.axis(window[1])
        return (2 * k_r + 1) * (2 * k_c + 1)

    def merged(self) -> "CoordinateLattice":
        return CoordinateLattice(self.kind, self.patches_per_unit, self.merges + 1)

    @property
    def scale(self) -> int:
        return 2 if self.kind == "compact" else 1

    @functools.cached_property
    def deviations(self) -> tuple[Fraction, ...]:
        """D: every possible `coordinate - scale * index` on one axis."""
        if self.kind == "full":
            return (Fraction(1, 2),)
        p, n = self.patches_per_unit, 1 << self.merges
        out = set()
        for phase_r in {(n * r) % p for r in range(p)}:  # where the token starts inside a unit
            row_units = _unit_weights(phase_r, n, p)  # weight of each unit row the token covers
            mean_a = Fraction(sum((phase_r + t) % p for t in range(n)), n)
            for phase_c in {(n * c) % p for c in range(p)}:
                weights = [wr * wc for wr in row_units for wc in _unit_weights(phase_c, n, p)]
                for mean_dr in _subset_sums(weights):  # dr is free per unit
                    out.add((n - Fraction(1, 2) - mean_a + p * mean_dr) / n)
        return tuple(sorted(out))

    def axis(self, window: int) -> tuple[float, int]:
        """(lattice step, K) for a window of `window` tokens: offsets are `k * step`, |k| <= K.

        The step is a power of two (a float, exactly); worked out in Python once per geometry and
        a constant for `torch.compile`.
        """
        return _lattice_axis(self.kind, self.patches_per_unit, self.merges, int(window))


@torch.compiler.assume_constant_result
def _lattice_axis(kind: str, patches_per_unit: int, merges: int, window: int) -> tuple[float, int]:
    return _lattice_axis_cached(kind, patches_per_unit, merges, window)


@functools.lru_cache(maxsize=256)
def _lattice_axis_cached(kind: str, patches_per_unit: int, merges: int, window: int) -> tuple[float, int]:
    lattice = CoordinateLattice(kind, patches_per_unit, merges)
    devs = lattice.deviations
    step = Fraction(lattice.scale)
    for d in devs[1:]:
        step = _fraction_gcd(step, d - devs[0])
    reach = lattice.scale * (window - 1) + devs[-1] - devs[0]
    return float(step), math.ceil(reach / step)


def _unit_weights(phase: int, n: int, p: int) -> list[Fraction]:
    """Fractions of n consecutive patches, starting `phase` patches into a unit of p, per unit."""
    counts: dict[int, int] = {}
    for t in range(n):
        counts[(phase + t) // p] = counts.get((phase + t) // p, 0) + 1
    return [Fraction(c, n) for c in counts.values()]


def _subset_sums(weights: list[Fraction]) -> set[Fraction]:
    sums = {Fraction(0)}
    for w in weights:
        sums |= {s + w for s in sums}
    return sums


def _fraction_gcd(a: Fraction, b: Fraction) -> Fraction:
    return Fraction(math.gcd(a.numerator * b.denominator, b.numerator * a.denominator),
                    a.denominator * b.denominator)


class CoordinatePositionBias(nn.Module):
    """Relative position bias as a function of true coordinate differences (SPEC sec. 3).

    `bias[h, i, j] = MLP(log_spaced(coord_i - coord_j))[h]`, MLP = Linear(2, hidden) - ReLU -
    Linear(hidden, heads).

    Evaluating the MLP for every pair of every window of every sample is costly, but the
    offsets take few values, known in advance from the sizes alone (`CoordinateLattice`). So the
    MLP runs once on that fixed lattice and each pair gathers its entry by the integer index of
    its offset: the same numbers, far fewer FLOPs, and static shapes (no host-device sync, no
    graph break under `torch.compile`). Without a lattice (coordinates of unknown origin) the
    MLP runs on every pair (`direct`).
    """

    def __init__(self, num_heads: int, hidden_dim: int = 32):
        super().__init__()
        self.num_heads = num_heads
        self.mlp = nn.Sequential(nn.Linear(2, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, num_heads))

    def _mlp(self, offsets: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast. Meta tensors (shape inference, e.g. timm's default-cfg
        # test) have no autocast to switch off.
        device = offsets.device.type
        with contextlib.nullcontext() if device == "meta" else torch.autocast(device, enabled=False):
            return self.mlp(log_spaced(offsets.float()))

    def direct(self, coords: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP on every pair: `[..., N, 2]` -> `[..., heads, N, N]` (`blocked` pairs -inf)."""
        offsets = coords.float().unsqueeze(-2) - coords.float().unsqueeze(-3)  # [..., N, N, 2]
        bias = self._mlp(offsets).movedim(-1, -3)
        if blocked is not None:
            bias = bias.masked_fill(blocked[:, None], float("-inf"))
        return bias

    def table(self, coords: torch.Tensor, lattice: CoordinateLattice, window: tuple[int, int],
              blocked: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP once on the lattice of possible offsets, gathered per pair (same numbers)."""
        (step_r, k_r), (step_c, k_c) = lattice.axis(window[0]), lattice.axis(window[1])
        dev = coords.device
        # The table: the MLP on every lattice offset, plus one -inf row for blocked pairs.
        rows = torch.arange(-k_r, k_r + 1, device=dev, dtype=torch.float32) * step_r
        cols = torch.arange(-k_c, k_c + 1, device=dev, dtype=torch.float32) * step_c
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
        table = self._mlp(grid)  # [(2k_r+1)(2k_c+1), heads]
        table = torch.cat([table, table.new_full((1, self.num_heads), float("-inf"))])

        # Integer lattice index of every pair's offset: exact (coordinates are dyadic, exact in
        # float32), clamped only for pairs of a shifted window that the mask blocks anyway.
        offsets = coords.float().unsqueeze(-2) - coords.float().unsqueeze(-3)  # [..., N, N, 2]
        ir = torch.round(offsets[..., 0] * (1 / step_r)).long().clamp_(-k_r, k_r) + k_r
        ic = torch.round(offsets[..., 1] * (1 / step_c)).long().clamp_(-k_c, k_c) + k_c
        index = ir * (2 * k_c + 1) + ic  # [..., N, N]
        if blocked is not None:
            index = index.masked_fill(blocked, table.shape[0] - 1)
        return F.embedding(index, table).movedim(-1, -3)  # [..., heads, N, N]

    def forward(self, coords: torch.Tensor, lattice: CoordinateLattice | None = None,
                window: tuple[int, int] | None = None, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            coords: `[..., N, 2]` coordinates of the N tokens of each window.
            lattice: where the coordinates lie (`CoordinateLattice`); None = unknown.
            window: `(rows, cols)` of a window (N = rows * cols), with `lattice`.
            blocked: `[nW, N, N]` bool, True = pair may not attend (bias -inf), or None; coords
                then `[Bc, nW, N, 2]`.

        Returns:
            `[..., heads, N, N]` float32 bias.
        """
        if lattice is not None and window is not None:
            # The table wins unless the lattice is finer than there are pairs to evaluate (late
            # stages: few tokens, offsets averaged over many units); a static choice either way.
            if lattice.table_size(window) <= coords[..., 0].numel() * coords.shape[-2]:
                if lattice.kind == "full" and coords.shape[0] == 1:
                    return self.window_table(window, coords.shape[-3], blocked, coords.device)
                return self.table(coords, lattice, window, blocked)
        return self.direct(coords, blocked)

    def window_table(self, window: tuple[int, int], num_windows: int, blocked: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
        """The full image's bias: every window of a full grid has the same offsets (the integers
        of the window; a shifted window's other pairs are `blocked`), so the bias is one
        `[heads, N, N]` gathered by a pair index made once per window size (timm's
        `relative_position_index`), not per pair of every window on every forward. The same
        numbers as `table` (the same MLP rows), without the per-pair offsets.

        Returns:
            `[1, nW, heads, N, N]` (expanded, not copied, where nothing is blocked).
        """
        (_, k_r), (_, k_c) = CoordinateLattice.full().axis(window[0]), CoordinateLattice.full().axis(window[1])
        rows = torch.arange(-k_r, k_r + 1, device=device, dtype=torch.float32)
        cols = torch.arange(-k_c, k_c + 1, device=device, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
        table = self._mlp(grid)  # [(2k_r+1)(2k_c+1), heads], the rows `table` would gather
        if torch.compiler.is_compiling():  # a constant for the compiler either way
            index = _window_pair_index(window[0], window[1], device)
        else:
            index = _window_pair_index_cached(window[0], window[1], device)
        N = window[0] * window[1]
        bias = F.embedding(index, table).permute(2, 0, 1)  # [heads, N, N]
        if blocked is None:
            return bias.expand(1, num_windows, -1, -1, -1)
        return bias.unsqueeze(0).masked_fill(blocked[:, None], float("-inf")).view(1, -1, self.num_heads, N, N)


def _window_pair_index(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """`[N, N]` row of each (query, key) pair of a `rows x cols` window in the offset table:
    `(dr + rows - 1) * (2 cols - 1) + (dc + cols - 1)`, offset = query - key (timm's
    `relative_position_index`)."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)  # token n = r * cols + c
    c = torch.arange(cols, device=device).repeat(rows)
    dr = r.view(-1, 1) - r.view(1, -1) + rows - 1
    dc = c.view(-1, 1) - c.view(1, -1) + cols - 1
    return dr * (2 * cols - 1) + dc


@functools.lru_cache(maxsize=64)
def _window_pair_index_cached(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    return _window_pair_index(rows, cols, device)


def windowed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout_p: float = 0.0,
                  scale: float | None = None) -> torch.Tensor:
    """Attention within windows with an additive bias, through SDPA's fused kernels.

    q, k, v: `[B, nW, heads, N, hd]`; bias: `[Bc, nW, heads, N, N]`, Bc = B (per sample: the
    compact image) or 1 (shared: the full image). Returns `[B, nW, N, heads * hd]`.
    The kernels take 4-D inputs: a per-sample bias lines up with `[B*nW, heads]` (q, k, v stay
    views); a shared one is broadcast over the batch as `[1, nW*heads]` instead of being copied B
    times (q, k, v are copied instead: head_dim < N, so that is the cheaper copy).
    """
    B, nW, heads, N, hd = q.shape
    if bias.shape[0] == 1 and B > 1:
        q, k, v = (t.reshape(B, nW * heads, N, hd) for t in (q, k, v))
        bias = bias.reshape(1, nW * heads, N, N)
    else:
        q, k, v = (t.reshape(B * nW, heads, N, hd) for t in (q, k, v))
        bias = bias.reshape(B * nW, heads, N, N)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return x.reshape(B, nW, heads, N, hd).transpose(2, 3).reshape(B, nW, N, heads * hd)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, biased by true-coordinate offsets."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, pos_hidden_dim: int = 32,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.pos_bias = CoordinatePositionBias(num_heads, pos_hidden_dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, blocked: torch.Tensor | None = None,
                lattice: CoordinateLattice | None = None,
                window: tuple[int, int] | None = None) -> torch.Tensor:
        """
        Args:
            x: `[B, nW, N, C]` tokens grouped by window.
            coords: `[Bc, nW, N, 2]`, Bc = B or 1.
            blocked: `[nW, N, N]` bool, True = pair may not attend (shifted windows), or None.
            lattice, window: where the coordinates lie and the window's `(rows, cols)`, for the
                static bias table (`CoordinatePositionBias`); None = per-pair MLP.

        Returns:
            `[B, nW, N, C]`.
        """
        B, nW, N, C = x.shape
        heads, hd = self.num_heads, C // self.num_heads
        with record_function("swin.qkv"):
            qkv = self.qkv(x).reshape(B, nW, N, 3, heads, hd)
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, nW, heads, N, hd] (views)

        with record_function("swin.position_bias"):
            bias = self.pos_bias(coords, lattice, window, blocked).to(q.dtype)  # [Bc, nW, heads, N, N]

        with record_function("swin.attention"):
            x = windowed_sdpa(q, k, v, bias, self.attn_drop if self.training else 0.0)
        with record_function("swin.proj"):
            return self.proj_drop(self.proj(x))


@register_notrace_module  # FX: window, shift and padding follow the grid size, so a leaf module
class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, each with a residual and drop path.

    FX tracing (timm's `feature_cls="fx"`, or torchvision's `create_feature_extractor` given
    `tracer_kwargs=dict(leaf_modules=timm.models.get_notrace_modules(),
    autowrap_functions=timm.models.get_notrace_functions())`) keeps the block as one node.
    """

    def __init__(self, dim: int, num_heads: int, shift: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, pos_hidden_dim: int = 32, drop_path: float = 0.0):
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, qkv_bias, pos_hidden_dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attend(self, x: torch.Tensor, coords: torch.Tensor, window_size: int,
                lattice: CoordinateLattice | None) -> torch.Tensor:
        B, H, W, C = x.shape
        # A window never exceeds the grid; when it covers a whole side there is nothing to shift.
        win = (min(window_size, H), min(window_size, W))
        shift = (win[0] // 2 if self.shift and win[0] < H else 0,
                 win[1] // 2 if self.shift and win[1] < W else 0)
        # A grid that is not a whole number of windows is padded at the bottom / right, before the
        # shift, as the original Swin does for detection. Unlike it (and timm), padded tokens are
        # never attended by real ones, so real outputs do not depend on the padding. (Padded cells
        # of a compact grid get coordinates off the bias lattice; their pairs are blocked or their
        # outputs cropped, so the clamped table entry they read never matters.)
        pad = (-H % win[0], -W % win[1])
        with record_function("swin.window_partition"):
            if any(pad):
                x = F.pad(x, (0, 0, 0, pad[1], 0, pad[0]))
                coords = extend_coordinates(coords, pad)
            Hp, Wp = H + pad[0], W + pad[1]
            if any(shift):
                x = torch.roll(x, (-shift[0], -shift[1]), dims=(1, 2))
                coords = torch.roll(coords, (-shift[0], -shift[1]), dims=(1, 2))
            blocked = window_attention_mask(H, W, win, shift, x.device)  # None if nothing to block

            N = win[0] * win[1]
            x_win = window_partition(x, win).reshape(B, -1, N, C)  # [B, nW, N, C]
            c_win = window_partition(coords, win).reshape(coords.shape[0], -1, N, 2)
        x_win = self.attn(x_win, c_win, blocked, lattice, win)
        with record_function("swin.window_partition"):
            x = window_reverse(x_win.reshape(-1, win[0], win[1], C), win, Hp, Wp)  # [B, Hp, Wp, C]
            if any(shift):
                x = torch.roll(x, shift, dims=(1, 2))
            if any(pad):
                x = x[:, :H, :W].contiguous()
        return x

    def forward(self, x: torch.Tensor, coords: torch.Tensor, window_size: int,
                lattice: CoordinateLattice | None = None) -> torch.Tensor:
        """`x`: `[B, H, W, C]`, `coords`: `[Bc, H, W, 2]` on `lattice` (None: unknown) -> `[B, H, W, C]`."""
        with record_function("swin.norm"):
            y = self.norm1(x)
        x = x + self.drop_path1(self._attend(y, coords, window_size, lattice))
        with record_function("swin.norm"):
            y = self.norm2(x)
        with record_function("swin.mlp"):
            x = x + self.drop_path2(self.mlp(y))
        return x


class ConvPatchMerging(nn.Module):
    """2x2 patch merging as the official UM-MAE code does it (`merge="conv"`): LayerNorm on each
    token, then a 2x2 stride-2 conv with bias. Not timm's `PatchMerging` (the Swin paper's: LayerNorm
    over the concatenated 2x2 neighbours, linear without bias), so written here; it exists to load
    the paper's released weights exactly (`ummae convert`). An odd grid is zero-padded by one row /
    column at the bottom / right after the norm, as timm's merging pads.
    """

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Conv2d(dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), C_out]`."""
        x = self.norm(x)
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SwinStage(nn.Module):
    """Optional 2x2 patch merging (`merge`: timm's LayerNorm + linear over the 2x2 neighbours, or
    the official UM-MAE conv, see `ConvPatchMerging`) + blocks."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, downsample: bool,
                 mlp_ratio: float, qkv_bias: bool, pos_hidden_dim: int, drop_path: Sequence[float],
                 merge: str = "linear", norm_eps: float = 1e-5):
        super().__init__()
        if not downsample:
            self.downsample = nn.Identity()
        elif merge == "conv":
            self.downsample = ConvPatchMerging(dim, out_dim, eps=norm_eps)
        else:
            self.downsample = PatchMerging(dim, out_dim, norm_layer=functools.partial(nn.LayerNorm, eps=norm_eps))
        self.blocks = nn.ModuleList([
            SwinBlock(out_dim, num_heads, shift=i % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      pos_hidden_dim=pos_hidden_dim, drop_path=drop_path[i])
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, coords: torch.Tensor, window_size: int,
                lattice: CoordinateLattice | None = None):
        """-> `(x, coords, lattice)` of this stage (merged if it downsamples)."""
        if not isinstance(self.downsample, nn.Identity):
            with record_function("swin.merging"):
                x = self.downsample(x)
                coords = merge_coordinates(coords)
            lattice = lattice.merged() if lattice is not None else None
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, coords, window_size, lattice,
                                                      use_reentrant=False)
            else:
                x = blk(x, coords, window_size, lattice)
        return x, coords, lattice


class SwinTransformer(PyramidBackbone):
    """Swin encoder that runs a full image or the compact image of a uniform mask.

    Args:
        patch_size: patch side in pixels (4 for Swin).
        embed_dim: channels of stage 1; doubled at every merge.
        depths, num_heads: blocks and heads per stage.
        window_size: attention window in tokens. Pre-training on the compact grid uses 8, the
            full image 16 (at 256 px); weights do not depend on it (`set_window_size`).
        pos_hidden_dim: hidden width of the coordinate MLP (32; Swin-L 64).
        num_classes: >0 adds a linear head (fine-tuning).
        global_pool: pooling before the head: "avg", "max" or "" (none).
        img_size: accepted for timm compatibility and recorded; no weight and no shape depends on
            it: any input size runs (sides not a multiple of the patch are padded, stage grids
            are padded to whole windows inside each block).
        mask_token: own the learnable token of masked patches (pre-training). A model that only
            ever sees full images (timm classifiers, feature extractors) leaves it out, so every
            parameter gets a gradient (DDP without `find_unused_parameters`).
        merge: patch merging, "linear" (timm's, the Swin paper's) or "conv" (the official UM-MAE
            code's LayerNorm + 2x2 conv with bias, `ConvPatchMerging`; for its released weights).
        norm_eps: eps of the LayerNorms outside the blocks (patch embedding, merging, final);
            the blocks' own norms keep PyTorch's 1e-5. The official UM-MAE code uses 1e-6.
        device, dtype: where to create the weights (timm's `create_model(device=, dtype=)`).
    """

    # Its masked path packs visible units into the compact image: only uniform masks fit.
    needs_uniform_mask = True

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pos_hidden_dim: int = 32, drop_path_rate: float = 0.0, num_classes: int = 0,
                 global_pool: str = "avg", img_size: int | tuple[int, int] | None = None,
                 mask_token: bool = True, merge: str = "linear", norm_eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ConfigError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        if merge not in MERGES:
            raise ConfigError(f"merge must be one of {list(MERGES)}, got {merge!r}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.img_size = img_size
        self.window_size = window_size
        self.num_stages = len(depths)
        self.embed_dims = [embed_dim * 2 ** i for i in range(self.num_stages)]
        self.num_features = self.embed_dims[-1]
        # Total stride of the last stage, in pixels.
        self.stride = patch_size * 2 ** (self.num_stages - 1)

        # Sides that are not a multiple of the patch are zero-padded at the bottom / right.
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, output_fmt="NHWC", strict_img_size=False,
                                      dynamic_img_pad=True)
        self.patch_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        # Replaces the embedding of hidden patches (UM's secondary masking, SimMIM's masking).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim)) if mask_token else None

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # stochastic depth, linear
        self.stages = nn.ModuleList()
        for i in range(self.num_stages):
            start = sum(depths[:i])
            self.stages.append(SwinStage(
                dim=self.embed_dims[max(i - 1, 0)], out_dim=self.embed_dims[i], depth=depths[i],
                num_heads=num_heads[i], downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                pos_hidden_dim=pos_hidden_dim, drop_path=rates[start:start + depths[i]],
                merge=merge, norm_eps=norm_eps))
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self._init_head(num_classes, global_pool)
        # timm's feature metadata (features_only, detection necks): one map per stage.
        self.feature_info = [dict(num_chs=c, reduction=patch_size * 2 ** i, module=f"stages.{i}")
                             for i, c in enumerate(self.embed_dims)]

        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def set_window_size(self, window_size: int) -> None:
        self.window_size = int(window_size)

    # -- trunk (`embed`, the feature API and the head are in PyramidBackbone) ------------------
    def forward_tokens(self, x: torch.Tensor, coords: torch.Tensor,
                       return_stages: bool = False, lattice: CoordinateLattice | None = None):
        """Run the stages on embedded tokens.

        Args:
            x: `[B, H, W, C]` embedded patches.
            coords: `[Bc, H, W, 2]` their true patch-centre coordinates.
            return_stages: also return every stage's output (before the final norm).
            lattice: where `coords` lie (`CoordinateLattice.full()` / `.compact(p)`): the
                position bias then gathers from a fixed table; None = any coordinates, the bias
                MLP runs on every pair.

        Returns:
            `[B, H/2^(S-1), W/2^(S-1), C_last]` after the final norm (and the list of stage maps).
        """
        stages = []
        for stage in self.stages:
            x, coords, lattice = stage(x, coords, self.window_size, lattice)
            stages.append(x)
        x = self.norm(x)
        return (x, stages) if return_stages else x

    def forward_features(self, x: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """Full image (fine-tuning / SimMIM): `[B, 3, H, W]` -> `[B, H/stride, W/stride, C_last]`."""
        with record_function("patch_embed"):
            tokens = self.embed(x, replace)
            coords = full_coordinates(tokens.shape[1], tokens.shape[2], tokens.device)
        return self.forward_tokens(tokens, coords, lattice=CoordinateLattice.full())

    def forward_masked(self, imgs: torch.Tensor, masks: MaskSample, unit: int) -> torch.Tensor:
        """UM-MAE encoder: only the visible units of a uniform mask, packed into the compact image.

        Args:
            imgs: `[B, 3, H, W]` full images.
            masks: a uniform `MaskSample` over the `(H/unit, W/unit)` grid (checked).
            unit: mask unit in pixels, a multiple of the patch size.

        Returns:
            `[B, H/2/stride, W/2/stride, C_last]` features of the compact image.
        """
        require_uniform(masks)  # no look at the values for masks drawn by UniformMasking
        if unit % self.patch_size:
            raise ConfigError(f"mask unit {unit} is not a multiple of the patch size {self.patch_size}")
        per_unit = unit // self.patch_size
        with record_function("compaction"):
            compact = compact_image(imgs, masks.ids_keep, unit)  # [B, 3, H/2, W/2]
            replace = None
            if masks.secondary is not None:
                replace = compact_unit_flags(masks.secondary, masks.ids_keep, masks.grid_size, per_unit)
            coords = compact_coordinates(masks.ids_keep, masks.grid_size, per_unit)
        with record_function("patch_embed"):
            tokens = self.embed(compact, replace)  # [B, H/2p, W/2p, C]
        return self.forward_tokens(tokens, coords, lattice=CoordinateLattice.compact(per_unit))

    # -- per-stage maps (timm's feature API, in PyramidBackbone) --------------------------------
    def _full_image_stages(self, x: torch.Tensor, stages):
        x = self.embed(x)  # [B, H/p, W/p, C]
        coords = full_coordinates(x.shape[1], x.shape[2], x.device)
        lattice = CoordinateLattice.full()
        for stage in stages:
            x, coords, lattice = stage(x, coords, self.window_size, lattice)
            yield x


# ---------------------------------------------------------------------------------------------
# registration: `model.arch: swin`

def _build(cfg) -> SwinTransformer:
    m = cfg.model
    return SwinTransformer(
        patch_size=m.patch_size, embed_dim=m.embed_dim, depths=m.depths, num_heads=m.num_heads,
        window_size=m.window_size, mlp_ratio=m.mlp_ratio, pos_hidden_dim=m.pos_hidden_dim,
        drop_path_rate=m.drop_path_rate, merge=m.merge, norm_eps=m.norm_eps)


def _full_image(cfg, compact: bool):
    """UM-MAE (and UM-EMAE) pre-train on the half-size compact grid: the full image's window is 2x."""
    if compact:
        cfg.model.window_size *= 2
    return cfg


def _timm_model(cfg) -> tuple[str, dict]:
    """`ummae_swin` (`models.registry`) with the full-image sizes; the official-checkpoint options
    only where they differ from the defaults, so ordinary cards stay as they were."""
    m = cfg.model
    args = dict(patch_size=m.patch_size, embed_dim=m.embed_dim, depths=list(m.depths),
                num_heads=list(m.num_heads), window_size=m.window_size, mlp_ratio=m.mlp_ratio,
                pos_hidden_dim=m.pos_hidden_dim)
    args.update(non_default_options(m, "merge", "norm_eps"))
    return "ummae_swin", args


def _finetune_defaults(m) -> dict:
    large = m.embed_dim >= 192  # Swin-L and wider
    return {"layer_decay": 0.7 if large else 0.85, "drop_path": 0.2 if large else 0.1}


register_backbone(BackboneSpec(
    name="swin", encoder_class=SwinTransformer, build=_build, classifier=PYRAMID_LAYOUT,
    needs_uniform_masks=SwinTransformer.needs_uniform_mask, masked_feature_map=True,
    full_image=_full_image, timm_model=_timm_model, timm_native=swin_timm.native_export,
    from_timm_native=swin_timm.from_timm_state, finetune_defaults=_finetune_defaults,
    read_init_weights=official.read_init_weights,
    ignored_keys={"model.embed_dims": "model.embed_dims is for per-stage widths; swin uses model.embed_dim",
                  "model.mlp_ratios": "model.mlp_ratios is for per-stage ratios; swin uses model.mlp_ratio",
                  "model.sr_ratios": "model.sr_ratios (spatial reduction) does not apply to model.arch swin"},
))
