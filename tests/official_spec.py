"""The official UM-MAE checkpoint layouts (implus/UM-MAE), tiny: key names and shapes, as a spec.

Read off the official `models_mae_swin.py`, `models_mae_pvt.py` and `models_mae.py` (names and
shapes only). `fill(spec)` gives random values of those shapes (fixed sin-cos tables as the official
code builds them), for the converter's tests (tests/models/test_official.py, tests/cli/test_convert.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# -- the official layouts, tiny -----------------------------------------------------------------
# The tiny models: 64 px images, 4 px mask units (a 16 x 16 unit grid), 2-stage pyramids of
# stride 8, so one final token spans 2 x 2 units, as the official decoder's PixelShuffle(2) needs.
COMMON_SETS = ["data.img_size=64", "masking.unit_size=4", "model.decoder_dim=16", "model.decoder_depth=1",
               "model.decoder_heads=2"]
SWIN = dict(C=8, depths=(2, 2), heads=(1, 2), pmd=4, window=2)  # full-image window 4
SWIN_SETS = COMMON_SETS + ["model.embed_dim=8", "model.depths=[2,2]", "model.num_heads=[1,2]",
                           "model.pos_hidden_dim=4", "model.window_size=2"]
PVT = dict(dims=(8, 16), depths=(2, 1), heads=(1, 2), mlp=(2, 2), sr=(2, 1))
PVT_SETS = COMMON_SETS + ["model.embed_dims=[8,16]", "model.depths=[2,1]", "model.num_heads=[1,2]",
                          "model.mlp_ratios=[2,2]", "model.sr_ratios=[2,1]"]
VIT = dict(C=16, depth=2, patch=16)
VIT_SETS = ["data.img_size=64", "masking.unit_size=16", "model.embed_dim=16", "model.depths=[2]",
            "model.num_heads=[2]", "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2"]
D, UNIT, IMG = 16, 4, 64


def mae_sincos(side: int, dim: int) -> torch.Tensor:
    """MAE's `get_2d_sincos_pos_embed` as its layout is documented: token `h * side + w` gets
    `[sin(w w_k), cos(w w_k), sin(h w_k), cos(h w_k)]`, w_k = 10000^(-k / (dim/4)), float64."""
    q = dim // 4
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    h, w = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    h, w = h.reshape(-1, 1) * omega, w.reshape(-1, 1) * omega
    return torch.from_numpy(np.concatenate([np.sin(w), np.cos(w), np.sin(h), np.cos(h)], 1)).float()


def _linear(spec: dict, name: str, out: int, inp: int) -> None:
    spec[f"{name}.weight"], spec[f"{name}.bias"] = (out, inp), (out,)


def _norm(spec: dict, name: str, dim: int) -> None:
    spec[f"{name}.weight"], spec[f"{name}.bias"] = (dim,), (dim,)


def _vit_block(spec: dict, p: str, dim: int, mlp: int) -> None:  # timm's Block, as the official decoders use
    _norm(spec, p + "norm1", dim)
    _linear(spec, p + "attn.qkv", 3 * dim, dim)
    _linear(spec, p + "attn.proj", dim, dim)
    _norm(spec, p + "norm2", dim)
    _linear(spec, p + "mlp.fc1", mlp * dim, dim)
    _linear(spec, p + "mlp.fc2", dim, mlp * dim)


def _pyramid_decoder(spec: dict, enc_out: int) -> None:
    _linear(spec, "decoder_embed", 4 * D, enc_out)
    spec["mask_token"] = (1, 1, D)
    spec["decoder_pos_embed"] = (1, (IMG // UNIT) ** 2, D)
    _vit_block(spec, "decoder_blocks.0.", D, 4)
    _norm(spec, "decoder_norm", D)
    _linear(spec, "decoder_pred", UNIT * UNIT * 3, D)


def swin_spec() -> dict[str, tuple]:
    """`models_mae_swin.py`'s keys and shapes (MaskedAutoencoderSwin with vis_mask_ratio > 0)."""
    C, pmd = SWIN["C"], SWIN["pmd"]
    spec = {"patch_embed.proj.weight": (C, 3, 4, 4), "patch_embed.proj.bias": (C,), "vis_mask_token": (1, 1, C)}
    _norm(spec, "patch_embed.norm", C)
    K = 0
    for i, (depth, heads) in enumerate(zip(SWIN["depths"], SWIN["heads"])):
        dim = C * 2 ** i
        for j in range(depth):
            p = f"blocks.{K}."
            if i > 0 and j == 0:  # PatchMerge inside the first block of a stage
                _norm(spec, p + "downsample.norm", dim // 2)
                spec[p + "downsample.proj.weight"], spec[p + "downsample.proj.bias"] = (dim, dim // 2, 2, 2), (dim,)
            _norm(spec, p + "norm1", dim)
            _linear(spec, p + "attn.qkv", 3 * dim, dim)
            _linear(spec, p + "attn.proj", dim, dim)
            spec[p + "attn.posmlp.0.weight"], spec[p + "attn.posmlp.0.bias"] = (pmd, 2, 1, 1), (pmd,)
            spec[p + "attn.posmlp.2.weight"], spec[p + "attn.posmlp.2.bias"] = (heads, pmd, 1, 1), (heads,)
            _norm(spec, p + "norm2", dim)
            _linear(spec, p + "mlp.fc1", 4 * dim, dim)
            _linear(spec, p + "mlp.fc2", dim, 4 * dim)
            K += 1
    _norm(spec, "norm", C * 2 ** (len(SWIN["depths"]) - 1))
    _pyramid_decoder(spec, C * 2 ** (len(SWIN["depths"]) - 1))
    return spec


def pvt_spec() -> dict[str, tuple]:
    """`models_mae_pvt.py`'s keys and shapes: no embedding norms, sr + norm in every block."""
    dims = PVT["dims"]
    spec = {"patch_embed.proj.weight": (dims[0], 3, 4, 4), "patch_embed.proj.bias": (dims[0],),
            "vis_mask_token": (1, 1, dims[0]), "pos_embed": (1, (IMG // 4) ** 2, dims[0])}
    K = 0
    for i, depth in enumerate(PVT["depths"]):
        dim = dims[i]
        for j in range(depth):
            p = f"blocks.{K}."
            if i > 0 and j == 0:
                spec[p + "downsample.proj.weight"], spec[p + "downsample.proj.bias"] = (dim, dims[i - 1], 2, 2), (dim,)
            _norm(spec, p + "norm1", dim)
            _linear(spec, p + "attn.q", dim, dim)
            _linear(spec, p + "attn.kv", 2 * dim, dim)
            _linear(spec, p + "attn.proj", dim, dim)
            spec[p + "attn.sr.weight"], spec[p + "attn.sr.bias"] = (dim, dim, 1, 1), (dim,)
            _norm(spec, p + "attn.norm", dim)
            _norm(spec, p + "norm2", dim)
            _linear(spec, p + "mlp.fc1", PVT["mlp"][i] * dim, dim)
            _linear(spec, p + "mlp.fc2", dim, PVT["mlp"][i] * dim)
            K += 1
    _norm(spec, "norm", dims[-1])
    _pyramid_decoder(spec, dims[-1])
    return spec


def vit_spec() -> dict[str, tuple]:
    """`models_mae.py`'s keys and shapes (MaskedAutoencoderViT, vis_mask_ratio > 0)."""
    C, n = VIT["C"], (IMG // VIT["patch"]) ** 2
    spec = {"cls_token": (1, 1, C), "pos_embed": (1, n + 1, C), "vis_mask_token": (1, 1, C),
            "patch_embed.proj.weight": (C, 3, VIT["patch"], VIT["patch"]), "patch_embed.proj.bias": (C,)}
    for b in range(VIT["depth"]):
        _vit_block(spec, f"blocks.{b}.", C, 4)
    _norm(spec, "norm", C)
    _linear(spec, "decoder_embed", D, C)
    spec["mask_token"], spec["decoder_pos_embed"] = (1, 1, D), (1, n + 1, D)
    _vit_block(spec, "decoder_blocks.0.", D, 4)
    _norm(spec, "decoder_norm", D)
    _linear(spec, "decoder_pred", VIT["patch"] ** 2 * 3, D)
    return spec


def fill(spec: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of those shapes; LayerNorm gains near 1, fixed tables as the official code
    builds them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in spec.items():
        t = torch.randn(shape, generator=g) * 0.2
        if "norm" in key and key.endswith(".weight"):
            t = 1 + t
        sd[key] = t
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd:
            n = sd[key].shape[1]
            side = math.isqrt(n)
            table = mae_sincos(side, sd[key].shape[2])
            sd[key] = (torch.cat([torch.zeros(1, table.shape[1]), table]) if side * side != n else table)[None]
    return sd
