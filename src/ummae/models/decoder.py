"""MAE-style decoder shared by every encoder (SPEC sec. 4).

Input: the encoder's visible tokens plus `ids_keep`, the unit each of them stands for.
1. `embed`: a linear map to the decoder width. A pyramid encoder ends at a stride coarser than
   the mask unit (Swin: 32 px on the compact image = 2x2 compact units), so the map goes to
   `r*r*D` and a pixel shuffle spreads it into one token per visible unit (`r = stride / unit`).
   The shuffled tokens come out in compact-grid raster order = block row-major order, the order
   of `ids_keep` for uniform masks.
2. Every unit of the full grid gets a slot: visible tokens are *scattered* to their own unit
   (`ids_keep`), the rest hold the shared mask token. Adding the full grid's position embedding
   afterwards pairs each visible token with its own unit's position by construction.
   (Gathering the position embeddings in unit row-major order instead, while the tokens are in
   block order, pairs most visible tokens with another unit's position; tests guard this.)
3. A few timm ViT blocks, a norm, and a linear prediction of each unit's `unit*unit*3` pixels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from .weight_init import init_linear_and_norm

__all__ = ["MAEDecoder"]


class MAEDecoder(nn.Module):
    """Light ViT decoder predicting the pixels of every unit.

    Args:
        grid_size: `(h, w)` full unit grid.
        unit: mask unit in pixels.
        encoder_dim: channels of the encoder output.
        upsample: `r`, how many units one encoder token spans along a side (1 for ViT).
        decoder_dim, depth, num_heads, mlp_ratio: the decoder ViT (default 512-d, 2 blocks, 16 heads).
        in_chans: image channels to predict.
        norm_eps: eps of its LayerNorms (PyTorch's 1e-5; MAE's and the official UM-MAE decoders
            use 1e-6).
    """

    def __init__(self, grid_size: tuple[int, int], unit: int, encoder_dim: int, upsample: int = 1,
                 decoder_dim: int = 512, depth: int = 2, num_heads: int = 16, mlp_ratio: float = 4.0,
                 in_chans: int = 3, norm_eps: float = 1e-5):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.upsample = upsample
        self.embed = nn.Linear(encoder_dim, upsample * upsample * decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed 2-D sin-cos embedding of the full unit grid, unit row-major order: [1, L, D].
        pos = build_sincos2d_pos_embed(list(self.grid_size), decoder_dim)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([
            Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=functools.partial(nn.LayerNorm, eps=norm_eps)) for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(decoder_dim, eps=norm_eps)
        self.pred = nn.Linear(decoder_dim, unit * unit * in_chans)

        trunc_normal_(self.mask_token, std=0.02)
        self.apply(functools.partial(init_linear_and_norm, linear="xavier"))  # as MAE's decoder

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def embed_visible(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output -> one decoder token per visible unit.

        Args:
            features: `[B, h, w, C]` feature map (pyramid encoders) or `[B, N, C]` tokens (ViT,
                `upsample` 1).

        Returns:
            `[B, N_vis, D]`, for a map in raster order of the upsampled `(h*r, w*r)` grid.
        """
        x = self.embed(features)
        if x.dim() == 4 and self.upsample > 1:
            x = F.pixel_shuffle(x.permute(0, 3, 1, 2), self.upsample)  # [B, D, h*r, w*r]
            x = x.permute(0, 2, 3, 1)
        return x.flatten(1, -2) if x.dim() == 4 else x

    def forward(self, features: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: encoder output (see `embed_visible`), one token per visible unit after
                upsampling, in the order of `ids_keep`.
            ids_keep: `[B, N_vis]` unit index (full grid, row-major) of each visible token.

        Returns:
            `[B, L, unit*unit*3]` predicted pixels for every unit.
        """
        visible = self.embed_visible(features)  # [B, N_vis, D]
        B, n_vis, D = visible.shape
        if ids_keep.shape != (B, n_vis):
            raise ValueError(f"{n_vis} visible tokens per sample but ids_keep has shape {tuple(ids_keep.shape)}")
        L = self.pos_embed.shape[1]
        x = self.mask_token.to(visible.dtype).expand(B, L, D)
        x = x.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), visible)  # [B, L, D]
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))
