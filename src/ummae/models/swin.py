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

import functools
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_notrace_function, register_notrace_module
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse

from ..compaction import compact_coordinates, compact_image, compact_unit_flags, full_coordinates
from ..errors import ConfigError
from ..masking import MaskSample, check_uniform
from .pyramid import PyramidBackbone
from .weight_init import init_linear_and_norm

__all__ = ["SwinTransformer", "CoordinatePositionBias", "merge_coordinates"]


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


@functools.lru_cache(maxsize=32)
def _window_mask_cpu(H: int, W: int, win: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor | None:
    """`[nW, N, N]` bool (True = blocked) for an `H x W` grid padded to whole windows, then
    cyclically shifted by `shift` (or None when neither happened)."""
    Hp, Wp = H + -H % win[0], W + -W % win[1]
    if (Hp, Wp) == (H, W) and not any(shift):
        return None
    # Label the regions that the cyclic shift brings together; tokens of different regions
    # were not neighbours before the roll and must not attend to each other.
    img = torch.zeros(Hp, Wp, dtype=torch.long)
    if any(shift):
        cnt = 0
        for hs in (slice(0, -win[0]), slice(-win[0], -shift[0]), slice(-shift[0], None)):
            for ws in (slice(0, -win[1]), slice(-win[1], -shift[1]), slice(-shift[1], None)):
                img[hs, ws] = cnt
                cnt += 1
    labels = window_partition(img.view(1, Hp, Wp, 1), win).reshape(-1, win[0] * win[1])
    blocked = labels.unsqueeze(1) != labels.unsqueeze(2)  # [nW, N(query), N(key)]
    # Padding (bottom rows, right columns before the roll) is never a key of a real token.
    padded = torch.ones(Hp, Wp, dtype=torch.bool)
    padded[:H, :W] = False
    padded = torch.roll(padded, (-shift[0], -shift[1]), dims=(0, 1))
    padded = window_partition(padded.view(1, Hp, Wp, 1), win).reshape(-1, win[0] * win[1])
    return blocked | (padded.unsqueeze(1) & ~padded.unsqueeze(2))


def window_attention_mask(H: int, W: int, win: tuple[int, int], shift: tuple[int, int],
                          device: torch.device) -> torch.Tensor | None:
    """`[nW, N, N]` bool, True where (shifted, padded) window attention must be blocked, or None."""
    mask = _window_mask_cpu(H, W, win, shift)
    return None if mask is None else mask.to(device)


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


class CoordinatePositionBias(nn.Module):
    """Relative position bias as a function of true coordinate differences (SPEC sec. 3).

    `bias[h, i, j] = MLP(log_spaced(coord_i - coord_j))[h]`, MLP = Linear(2, hidden) - ReLU -
    Linear(hidden, heads).

    Evaluating the MLP for every pair of every window of every sample is costly, but the
    offsets take few distinct values (coordinates live on a lattice). So the MLP runs once per
    distinct offset and the results are gathered: the same numbers, far fewer FLOPs.
    """

    # Offsets are dyadic rationals (patch centres, averaged and halved at each merge: about
    # three fractional bits per stage), so 16 fractional bits hold them exactly and a pair of
    # offsets packs into one int64 key. A 1-D unique on the keys is a fast sort;
    # `torch.unique(dim=0)` on the pairs compares rows one by one and was 70% of a CPU step.
    _FRACTION_BITS = 16
    _FIELD = 1 << 31  # per-axis key range: |offset| < 2**14 tokens

    def __init__(self, num_heads: int, hidden_dim: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, num_heads))

    def distinct_offsets(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[P, 2]` offsets -> (`[U, 2]` distinct offsets, `[P]` index of each in them)."""
        scale = float(1 << self._FRACTION_BITS)
        q = torch.round(offsets.double() * scale).long() + self._FIELD // 2  # [P, 2], >= 0
        keys, inverse = torch.unique(q[:, 0] * self._FIELD + q[:, 1], return_inverse=True)
        rows = torch.div(keys, self._FIELD, rounding_mode="floor")
        cols = keys - rows * self._FIELD
        distinct = (torch.stack([rows, cols], dim=1) - self._FIELD // 2).double() / scale
        return distinct.float(), inverse

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """
        Args:
            coords: `[..., N, 2]` coordinates of the N tokens of each window.

        Returns:
            `[..., heads, N, N]` float32 bias.
        """
        lead, N = coords.shape[:-2], coords.shape[-2]
        offsets = coords.float().unsqueeze(-2) - coords.float().unsqueeze(-3)  # [..., N, N, 2]
        distinct, inverse = self.distinct_offsets(offsets.reshape(-1, 2))
        with torch.autocast(device_type=coords.device.type, enabled=False):
            table = self.mlp(log_spaced(distinct))  # [U, heads], float32 even under autocast
        bias = table[inverse].reshape(*lead, N, N, -1)
        return bias.movedim(-1, -3)


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

    def forward(self, x: torch.Tensor, coords: torch.Tensor,
                blocked: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: `[B, nW, N, C]` tokens grouped by window.
            coords: `[Bc, nW, N, 2]`, Bc = B or 1.
            blocked: `[nW, N, N]` bool, True = pair may not attend (shifted windows), or None.

        Returns:
            `[B, nW, N, C]`.
        """
        B, nW, N, C = x.shape
        qkv = self.qkv(x).reshape(B * nW, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*nW, heads, N, head_dim]

        bias = self.pos_bias(coords)  # [Bc, nW, heads, N, N]
        if blocked is not None:
            bias = bias.masked_fill(blocked[None, :, None], float("-inf"))
        bias = bias.expand(B, -1, -1, -1, -1).reshape(B * nW, self.num_heads, N, N).to(q.dtype)

        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, nW, N, C)
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

    def _attend(self, x: torch.Tensor, coords: torch.Tensor, window_size: int) -> torch.Tensor:
        B, H, W, C = x.shape
        # A window never exceeds the grid; when it covers a whole side there is nothing to shift.
        win = (min(window_size, H), min(window_size, W))
        shift = (win[0] // 2 if self.shift and win[0] < H else 0,
                 win[1] // 2 if self.shift and win[1] < W else 0)
        # A grid that is not a whole number of windows is padded at the bottom / right, before the
        # shift, as the original Swin does for detection. Unlike it (and timm), padded tokens are
        # never attended by real ones, so real outputs do not depend on the padding.
        pad = (-H % win[0], -W % win[1])
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
        x_win = self.attn(x_win, c_win, blocked)
        x = window_reverse(x_win.reshape(-1, win[0], win[1], C), win, Hp, Wp)  # [B, Hp, Wp, C]

        if any(shift):
            x = torch.roll(x, shift, dims=(1, 2))
        if any(pad):
            x = x[:, :H, :W].contiguous()
        return x

    def forward(self, x: torch.Tensor, coords: torch.Tensor, window_size: int) -> torch.Tensor:
        """`x`: `[B, H, W, C]`, `coords`: `[Bc, H, W, 2]` -> `[B, H, W, C]`."""
        x = x + self.drop_path1(self._attend(self.norm1(x), coords, window_size))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class SwinStage(nn.Module):
    """Optional 2x2 patch merging (timm's: LayerNorm + linear over the 2x2 neighbours) + blocks."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, downsample: bool,
                 mlp_ratio: float, qkv_bias: bool, pos_hidden_dim: int, drop_path: Sequence[float]):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            SwinBlock(out_dim, num_heads, shift=i % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      pos_hidden_dim=pos_hidden_dim, drop_path=drop_path[i])
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, coords: torch.Tensor, window_size: int):
        if not isinstance(self.downsample, nn.Identity):
            x = self.downsample(x)
            coords = merge_coordinates(coords)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, coords, window_size, use_reentrant=False)
            else:
                x = blk(x, coords, window_size)
        return x, coords


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
        device, dtype: where to create the weights (timm's `create_model(device=, dtype=)`).
    """

    # Its masked path packs visible units into the compact image: only uniform masks fit.
    needs_uniform_mask = True

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pos_hidden_dim: int = 32, drop_path_rate: float = 0.0, num_classes: int = 0,
                 global_pool: str = "avg", img_size: int | tuple[int, int] | None = None,
                 mask_token: bool = True, device=None, dtype=None):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ConfigError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
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
        self.patch_norm = nn.LayerNorm(embed_dim)
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
                pos_hidden_dim=pos_hidden_dim, drop_path=rates[start:start + depths[i]]))
        self.norm = nn.LayerNorm(self.num_features)
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
                       return_stages: bool = False):
        """Run the stages on embedded tokens.

        Args:
            x: `[B, H, W, C]` embedded patches.
            coords: `[Bc, H, W, 2]` their true patch-centre coordinates.
            return_stages: also return every stage's output (before the final norm).

        Returns:
            `[B, H/2^(S-1), W/2^(S-1), C_last]` after the final norm (and the list of stage maps).
        """
        stages = []
        for stage in self.stages:
            x, coords = stage(x, coords, self.window_size)
            stages.append(x)
        x = self.norm(x)
        return (x, stages) if return_stages else x

    def forward_features(self, x: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """Full image (fine-tuning / SimMIM): `[B, 3, H, W]` -> `[B, H/stride, W/stride, C_last]`."""
        tokens = self.embed(x, replace)
        coords = full_coordinates(tokens.shape[1], tokens.shape[2], tokens.device)
        return self.forward_tokens(tokens, coords)

    def forward_masked(self, imgs: torch.Tensor, masks: MaskSample, unit: int) -> torch.Tensor:
        """UM-MAE encoder: only the visible units of a uniform mask, packed into the compact image.

        Args:
            imgs: `[B, 3, H, W]` full images.
            masks: a uniform `MaskSample` over the `(H/unit, W/unit)` grid (checked).
            unit: mask unit in pixels, a multiple of the patch size.

        Returns:
            `[B, H/2/stride, W/2/stride, C_last]` features of the compact image.
        """
        check_uniform(masks.mask, masks.grid_size)
        if unit % self.patch_size:
            raise ConfigError(f"mask unit {unit} is not a multiple of the patch size {self.patch_size}")
        per_unit = unit // self.patch_size
        compact = compact_image(imgs, masks.ids_keep, unit)  # [B, 3, H/2, W/2]
        replace = None
        if masks.secondary is not None:
            replace = compact_unit_flags(masks.secondary, masks.ids_keep, masks.grid_size, per_unit)
        tokens = self.embed(compact, replace)  # [B, H/2p, W/2p, C]
        coords = compact_coordinates(masks.ids_keep, masks.grid_size, per_unit)
        return self.forward_tokens(tokens, coords)

    # -- per-stage maps (timm's feature API, in PyramidBackbone) --------------------------------
    def _full_image_stages(self, x: torch.Tensor, stages):
        x = self.embed(x)  # [B, H/p, W/p, C]
        coords = full_coordinates(x.shape[1], x.shape[2], x.device)
        for stage in stages:
            x, coords = stage(x, coords, self.window_size)
            yield x
