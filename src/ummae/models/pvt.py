"""Pyramid Vision Transformer (PVT v1) for UM-MAE: one backbone for compact and full images.

Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions,
Wang et al., ICCV 2021.
UM-MAE: Uniform Masking, Li et al., arXiv 2205.10063 (SPEC sec. 3).

A PVT stage is a non-overlapping patch embedding (conv + LayerNorm: 4x4 stride 4 for stage 1,
2x2 stride 2 after) followed by blocks of *spatial-reduction attention* (SRA): every token
queries a pooled, shrunken copy of the map, so global attention stays affordable at stride 4.

What UM-MAE changes, and why this file does not just call timm's PVT:
- Positions are a FIXED 2-D sin-cos table of the FULL stage-1 patch grid instead of learnable
  per-stage tables tied to one input size. Under uniform masking the encoder runs on the compact
  image, whose grid neighbours are not neighbours in the photograph; each compact token gets the
  table entry of its *true* patch (`compact_coordinates`), so it keeps its real position. The
  table is computed for whatever size comes in, so fine-tuning at another resolution needs no
  interpolation.
- Design choice: only stage 1 gets positions. Later stages inherit them through the patch
  merging (a 2x2 conv over tokens that already carry their positions), which also keeps the
  compact and full paths identical after stage 1.
- SRA reduces keys/values by average pooling (kernel = stride = ratio), then a linear map over
  channels (a 1x1 conv) and LayerNorm. Pooling has no weights, so the same weights run any
  ratio: `sr_ratios` (8, 4, 2, 1 for PVT-S) on the full image (fine-tuning, SimMIM), halved
  (4, 2, 1, 1) on the half-size compact grid (UM pre-training), and the two paths give the same
  state dict, so their checkpoints load into each other. A stage has the reduction weights iff
  its full-image ratio is > 1; on the compact grid a stage whose ratio falls to 1 still applies
  them, just without pooling. (PVT v1 reduces with a strided ratio x ratio conv, whose weights
  do depend on the ratio.)
- Visible units picked by secondary masking get a learnable token in place of their patch
  embedding, before the patch-embedding norm; their position is added like any other token's.
- No class token: classification is a global average pool + linear head, as for Swin.
Everything else (MLP, drop path, patch embedding convs) is timm's.

Shapes: tokens are kept channel-last, `[B, H, W, C]`, between blocks; attention flattens them.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch.fx import _symbolic_trace

from ..compaction import compact_coordinates, compact_image, compact_unit_flags
from ..errors import ConfigError
from ..masking import MaskSample, require_uniform
from . import official
from .pyramid import PYRAMID_LAYOUT, PyramidBackbone
from .specs import BackboneSpec, non_default_options, register_backbone
from .weight_init import init_linear_and_norm

__all__ = ["PyramidVisionTransformer", "SpatialReductionAttention", "masked_sr_ratio"]


def _is_fx_symbolic_tracing() -> bool:
    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    return check()


@torch.fx.wrap
def add_sincos_positions(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, H, W, C]` + the 2-D sin-cos table of its grid (what `embed_full` adds; used when FX
    traces the model, where the grid size is not known until it runs)."""
    H, W, C = tokens.shape[1:]
    table = build_sincos2d_pos_embed([H, W], C, device=tokens.device).reshape(H, W, C)
    return tokens + table.to(tokens.dtype)


def masked_sr_ratio(ratio: int) -> int:
    """The reduction ratio on the compact grid (half the full grid's side): `max(ratio // 2, 1)`."""
    return max(int(ratio) // 2, 1)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced copy of the map.

    reduce(x, r) = LayerNorm(Linear(avg_pool(x, kernel=r, stride=r))); with no reduction weights
    (`has_reduction=False`, a stage whose full-image ratio is 1) keys/values are the tokens
    themselves and only ratio 1 is allowed.

    Args:
        dim: channels.
        num_heads: attention heads (`dim` must be divisible by them).
        has_reduction: build the reduction linear + norm.
        qkv_bias: bias on the query and key/value projections.
    """

    def __init__(self, dim: int, num_heads: int, has_reduction: bool, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"channels {dim} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if has_reduction:
            self.sr = nn.Linear(dim, dim)  # a 1x1 conv on channel-last tokens
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None

    def reduce(self, x: torch.Tensor, ratio: int) -> torch.Tensor:
        """`[B, H, W, C]` -> `[B, ceil(H/ratio), ceil(W/ratio), C]` keys/values source."""
        if self.sr is None:
            if ratio != 1:
                raise ConfigError(f"spatial-reduction ratio {ratio} asked of an attention layer "
                                  "built without reduction weights (full-image ratio 1)")
            return x
        if ratio > 1:
            # A grid that is not a multiple of the ratio keeps its edge: the last row / column of
            # cells averages only the tokens it has (ceil_mode); divisible grids are unaffected.
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), ratio, ceil_mode=True)
            x = x.permute(0, 2, 3, 1)  # [B, ceil(H/r), ceil(W/r), C]
        return self.norm(self.sr(x))

    def forward(self, x: torch.Tensor, ratio: int) -> torch.Tensor:
        """`x`: `[B, H, W, C]`, `ratio`: spatial reduction of keys/values -> `[B, H, W, C]`."""
        B, H, W, C = x.shape
        heads, hd = self.num_heads, C // self.num_heads
        with record_function("pvt.qkv"):
            q = self.q(x).reshape(B, H * W, heads, hd).transpose(1, 2)  # [B, heads, N, hd]
        with record_function("pvt.spatial_reduction"):
            reduced = self.reduce(x, ratio)
        with record_function("pvt.qkv"):
            kv = self.kv(reduced).reshape(B, -1, 2, heads, hd)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, M, hd], M = N / ratio^2
        with record_function("pvt.attention"):
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
            x = x.transpose(1, 2).reshape(B, H, W, C)
        with record_function("pvt.proj"):
            return self.proj_drop(self.proj(x))


class PvtBlock(nn.Module):
    """Pre-norm spatial-reduction attention + MLP, each with a residual and drop path."""

    def __init__(self, dim: int, num_heads: int, has_reduction: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, has_reduction, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, sr_ratio: int) -> torch.Tensor:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        with record_function("pvt.norm"):
            y = self.norm1(x)
        x = x + self.drop_path1(self.attn(y, sr_ratio))
        with record_function("pvt.norm"):
            y = self.norm2(x)
        with record_function("pvt.mlp"):
            x = x + self.drop_path2(self.mlp(y))
        return x


class PvtStage(nn.Module):
    """Optional 2x2 stride-2 patch embedding (conv + LayerNorm, PVT's merging) + blocks.

    Stage 1's 4x4 embedding lives on the model, where the mask token and positions are applied.
    """

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, downsample: bool,
                 has_reduction: bool, mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float],
                 norm_layer=nn.LayerNorm):
        super().__init__()
        if downsample:  # norm_layer None: a bare conv (the official UM-MAE code's merging)
            self.downsample = PatchEmbed(img_size=None, patch_size=2, in_chans=dim, embed_dim=out_dim,
                                         norm_layer=norm_layer, output_fmt="NHWC",
                                         strict_img_size=False, dynamic_img_pad=True)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.ModuleList([
            PvtBlock(out_dim, num_heads, has_reduction, mlp_ratio, qkv_bias, drop_path[i])
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, sr_ratio: int) -> torch.Tensor:
        """`[B, H, W, C_in]` -> `[B, H/2, W/2, C_out]` (or `[B, H, W, C_out]` without merging)."""
        if not isinstance(self.downsample, nn.Identity):
            with record_function("pvt.merging"):
                x = self.downsample(x.permute(0, 3, 1, 2))  # [B, H/2, W/2, C_out]
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, sr_ratio, use_reentrant=False)
            else:
                x = blk(x, sr_ratio)
        return x


class PyramidVisionTransformer(PyramidBackbone):
    """PVT encoder that runs a full image or the compact image of a uniform mask.

    Args:
        patch_size: stage-1 patch side in pixels (4); later stages merge 2x2.
        embed_dims, depths, num_heads, mlp_ratios: per stage (PVT-Small defaults).
        sr_ratios: spatial-reduction ratios on the FULL image (fine-tuning, SimMIM). The compact
            path of UM pre-training uses `masked_sr_ratio(r)` = `max(r // 2, 1)`. A stage has
            reduction weights iff its ratio is > 1.
        qkv_bias: bias on the attention projections.
        drop_path_rate: stochastic depth, rising linearly to this over all blocks.
        num_classes: >0 adds a linear head (fine-tuning).
        global_pool: pooling before the head: "avg", "max" or "" (none).
        img_size: accepted for timm compatibility and recorded; nothing depends on it (any size
            runs: sides are padded to the patch, odd stage grids by one row / column).
        mask_token: own the learnable token of masked patches (pre-training); left out by models
            that only see full images, so every parameter gets a gradient (DDP).
        embed_norm: LayerNorm after every patch embedding (PVT's). False: bare convs, as the
            official UM-MAE code (for its released weights, `ummae convert`).
        sr_every_stage: reduction weights (Linear + LayerNorm) in every stage, ratio-1 stages
            too, where they act unpooled, as the official UM-MAE code. False: PVT's rule (only
            stages whose full-image ratio is > 1).
        norm_eps: eps of the LayerNorms outside the blocks (embedding norms, final norm); the
            official UM-MAE code's final norm uses 1e-6.
        device, dtype: where to create the weights (timm's `create_model(device=, dtype=)`).
    """

    needs_uniform_mask = True  # forward_masked packs visible units into a compact image

    def __init__(self, patch_size: int = 4, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, num_classes: int = 0, global_pool: str = "avg",
                 img_size: int | tuple[int, int] | None = None, mask_token: bool = True,
                 embed_norm: bool = True, sr_every_stage: bool = False, norm_eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        per_stage = dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads,
                         mlp_ratios=mlp_ratios, sr_ratios=sr_ratios)
        if len({len(v) for v in per_stage.values()}) != 1:
            raise ConfigError("per-stage settings differ in length: "
                              + ", ".join(f"{k}={list(v)}" for k, v in per_stage.items()))
        if embed_dims[0] % 4:
            raise ConfigError(f"embed_dims[0] = {embed_dims[0]} must be divisible by 4 "
                              "(2-D sin-cos position embedding)")
        if any(int(r) < 1 for r in sr_ratios):
            raise ConfigError(f"sr_ratios must be >= 1, got {list(sr_ratios)}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_stages = len(depths)
        self.embed_dims = [int(d) for d in embed_dims]
        self.num_features = self.embed_dims[-1]
        # Total stride of the last stage, in pixels.
        self.stride = patch_size * 2 ** (self.num_stages - 1)
        self.sr_ratios = tuple(int(r) for r in sr_ratios)
        self.masked_sr_ratios = tuple(masked_sr_ratio(r) for r in self.sr_ratios)

        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=self.embed_dims[0], output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True)
        norm_layer = functools.partial(nn.LayerNorm, eps=norm_eps)
        self.patch_norm = norm_layer(self.embed_dims[0]) if embed_norm else nn.Identity()
        # Replaces the embedding of hidden patches (UM's secondary masking, SimMIM's masking).
        self.mask_token = (nn.Parameter(torch.zeros(1, 1, 1, self.embed_dims[0])) if mask_token
                           else None)
        # Sin-cos table of the full stage-1 grid, `[H/p, W/p, C1]`: rebuilt for each new input
        # size (see `position_embedding`), never saved.
        self.register_buffer("pos_embed", torch.zeros(0, 0, self.embed_dims[0]), persistent=False)

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # stochastic depth, linear
        self.stages = nn.ModuleList()
        for i in range(self.num_stages):
            start = sum(depths[:i])
            self.stages.append(PvtStage(
                dim=self.embed_dims[max(i - 1, 0)], out_dim=self.embed_dims[i], depth=depths[i],
                num_heads=num_heads[i], downsample=i > 0,
                has_reduction=sr_every_stage or self.sr_ratios[i] > 1, mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias, drop_path=rates[start:start + depths[i]],
                norm_layer=norm_layer if embed_norm else None))
        self.norm = norm_layer(self.num_features)
        self._init_head(num_classes, global_pool)
        # timm's feature metadata (features_only, detection necks): one map per stage.
        self.feature_info = [dict(num_chs=c, reduction=patch_size * 2 ** i, module=f"stages.{i}")
                             for i, c in enumerate(self.embed_dims)]

        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        init_linear_and_norm(m)
        if isinstance(m, nn.Conv2d):  # fan-out normal, as PVT
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- positions and embedding -------------------------------------------------------------
    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Fixed 2-D sin-cos table of a `height x width` stage-1 patch grid: `[height, width, C1]`.

        Cached in the `pos_embed` buffer (so it follows `.to(device)`) until the size changes.
        """
        pe = self.pos_embed
        if tuple(pe.shape[:2]) != (height, width):
            # Built outside inference mode, so a table first made under `torch.inference_mode()`
            # can still be used in training afterwards.
            with torch.inference_mode(False):
                pe = build_sincos2d_pos_embed([height, width], self.embed_dims[0], device=pe.device)
                pe = pe.reshape(height, width, -1)  # rows of the table are row-major patches
            self.pos_embed = pe
        return pe

    def embed_full(self, x: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """`embed` + the position of every patch: `[B, 3, H, W]` -> `[B, H/p, W/p, C1]`."""
        with record_function("patch_embed"):
            tokens = self.embed(x, replace)
        with record_function("position_embedding"):
            if _is_fx_symbolic_tracing():  # the grid is symbolic: the table becomes one (wrapped) graph node
                return add_sincos_positions(tokens)
            pos = self.position_embedding(tokens.shape[1], tokens.shape[2])
            return tokens + pos.to(device=tokens.device, dtype=tokens.dtype)

    def embed_compact(self, imgs: torch.Tensor, masks: MaskSample, unit: int) -> torch.Tensor:
        """Stage-1 tokens of the compact image, each with the position of its TRUE patch.

        Secondary-masked units get the mask token (before the norm) and still their position.

        Args:
            imgs: `[B, 3, H, W]` full images.
            masks: a uniform `MaskSample` over the `(H/unit, W/unit)` grid (checked).
            unit: mask unit in pixels, a multiple of the patch size.

        Returns:
            `[B, H/2p, W/2p, C1]`; compact patch `(i, j)` carries the table entry of the full-grid
            patch it came from.
        """
        require_uniform(masks)  # no look at the values for masks drawn by UniformMasking
        if unit % self.patch_size:
            raise ConfigError(f"mask unit {unit} is not a multiple of the patch size {self.patch_size}")
        H, W = imgs.shape[-2:]
        h, w = masks.grid_size
        if (H, W) != (h * unit, w * unit):
            raise ConfigError(f"image size {H}x{W} does not match a {h}x{w} mask of {unit} px units")
        per_unit = unit // self.patch_size
        with record_function("compaction"):
            compact = compact_image(imgs, masks.ids_keep, unit)  # [B, 3, H/2, W/2]
            replace = None
            if masks.secondary is not None:
                replace = compact_unit_flags(masks.secondary, masks.ids_keep, masks.grid_size, per_unit)
        with record_function("patch_embed"):
            tokens = self.embed(compact, replace)  # [B, H/2p, W/2p, C1]

        with record_function("position_embedding"):
            coords = compact_coordinates(masks.ids_keep, masks.grid_size, per_unit)  # patch centres
            rc = coords.floor().long()  # [B, H/2p, W/2p, 2] true (row, col) patch indices
            table = self.position_embedding(H // self.patch_size, W // self.patch_size)
            table = table.to(device=tokens.device, dtype=tokens.dtype)
            return tokens + table[rc[..., 0], rc[..., 1]]  # [B, H/2p, W/2p, C1]

    # -- trunk -------------------------------------------------------------------------------
    def _check_size(self, H: int, W: int, what: str) -> None:
        if H % self.stride or W % self.stride:
            raise ConfigError(f"{what} size {H}x{W} is not divisible by the encoder's total stride "
                              f"{self.stride} (patch {self.patch_size}, {self.num_stages} stages)")

    def forward_tokens(self, x: torch.Tensor, sr_ratios: Sequence[int],
                       return_stages: bool = False):
        """Run the stages on embedded (and positioned) stage-1 tokens.

        Args:
            x: `[B, H, W, C1]`.
            sr_ratios: spatial-reduction ratio of each stage.
            return_stages: also return every stage's output (before the final norm).

        Returns:
            `[B, H/2^(S-1), W/2^(S-1), C_last]` after the final norm (and the list of stage maps).
        """
        stages = []
        for stage, ratio in zip(self.stages, sr_ratios):
            x = stage(x, ratio)
            stages.append(x)
        x = self.norm(x)
        return (x, stages) if return_stages else x

    def forward_features(self, x: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """Full image (fine-tuning / SimMIM), full-image SR ratios.

        Args:
            x: `[B, 3, H, W]`, any size (see the class docstring).
            replace: `[B, H/p, W/p]` bool, patches given the mask token, or None.

        Returns:
            `[B, ceil(H/stride), ceil(W/stride), C_last]`.
        """
        return self.forward_tokens(self.embed_full(x, replace), self.sr_ratios)

    def forward_masked(self, imgs: torch.Tensor, masks: MaskSample, unit: int) -> torch.Tensor:
        """UM-MAE encoder: only the visible units of a uniform mask, packed into the compact image,
        with halved SR ratios.

        Args:
            imgs: `[B, 3, H, W]` full images, H and W divisible by `2 * stride`.
            masks: a uniform `MaskSample` over the `(H/unit, W/unit)` grid (checked).
            unit: mask unit in pixels, a multiple of the patch size.

        Returns:
            `[B, H/2/stride, W/2/stride, C_last]` features of the compact image.
        """
        self._check_size(imgs.shape[-2] // 2, imgs.shape[-1] // 2, "compact image")
        tokens = self.embed_compact(imgs, masks, unit)
        return self.forward_tokens(tokens, self.masked_sr_ratios)

    # -- per-stage maps (timm's feature API, in PyramidBackbone) --------------------------------
    def _full_image_stages(self, x: torch.Tensor, stages):
        x = self.embed_full(x)  # [B, H/p, W/p, C1]
        for stage, ratio in zip(stages, self.sr_ratios):
            x = stage(x, ratio)
            yield x


# ---------------------------------------------------------------------------------------------
# registration: `model.arch: pvt`

def _build(cfg) -> PyramidVisionTransformer:
    m = cfg.model
    return PyramidVisionTransformer(
        patch_size=m.patch_size, embed_dims=m.embed_dims, depths=m.depths, num_heads=m.num_heads,
        mlp_ratios=m.mlp_ratios, sr_ratios=m.sr_ratios, drop_path_rate=m.drop_path_rate,
        embed_norm=m.embed_norm, sr_every_stage=m.sr_every_stage, norm_eps=m.norm_eps)


def _validate(cfg) -> None:
    m = cfg.model
    for key in ("embed_dims", "mlp_ratios", "sr_ratios"):
        value = getattr(m, key)
        if value is None or len(value) != len(m.depths) or any(not v > 0 for v in value):
            raise ConfigError(f"model.{key} must have one positive number per stage ({len(m.depths)}) "
                              f"for pvt, got {value}")


def _timm_model(cfg) -> tuple[str, dict]:
    """`ummae_pvt` (`models.registry`) with the full-image reduction ratios (the configured ones:
    the masked path halves them on the fly)."""
    m = cfg.model
    args = dict(patch_size=m.patch_size, embed_dims=list(m.embed_dims), depths=list(m.depths),
                num_heads=list(m.num_heads), mlp_ratios=list(m.mlp_ratios), sr_ratios=list(m.sr_ratios))
    args.update(non_default_options(m, "embed_norm", "sr_every_stage", "norm_eps"))
    return "ummae_pvt", args


register_backbone(BackboneSpec(
    name="pvt", encoder_class=PyramidVisionTransformer, build=_build, classifier=PYRAMID_LAYOUT,
    validate=_validate, stage_widths=lambda m: list(m.embed_dims),
    needs_uniform_masks=PyramidVisionTransformer.needs_uniform_mask, masked_feature_map=True,
    timm_model=_timm_model, read_init_weights=official.read_init_weights,
    ignored_keys={"model.embed_dim": "model.arch pvt uses model.embed_dims (one value per stage)",
                  "model.mlp_ratio": "model.arch pvt uses model.mlp_ratios (one value per stage)"},
))
