"""ummae's Swin as timm's own `swin_*` model: the weights a process without ummae can load.

ummae's Swin differs from timm's `SwinTransformer` in one place: the relative position bias is
a small MLP of true coordinate offsets (`swin.CoordinatePositionBias`, needed for the compact
image of uniform masks) instead of timm's table indexed by the offset inside a window. On a full
image at a fixed window the offsets between two tokens of a window are the integers
`[-(W-1), W-1]` per axis, so the MLP evaluated there *is* timm's `relative_position_bias_table`
(`[(2Wh-1)(2Ww-1), heads]`, row `(dr + Wh-1)(2Ww-1) + (dc + Ww-1)`, offset = query - key):
the same rows ummae's own full-image path gathers from (`CoordinatePositionBias.table`).
Everything else is the same module under another name (timm's `PatchMerging` included, so the
2x2 concatenation order is the same by construction):

    ummae                                 timm
    patch_embed.proj                      patch_embed.proj
    patch_norm                            patch_embed.norm
    stages.i.downsample.{norm,reduction}  layers.i.downsample.{norm,reduction}
    stages.i.blocks.j.{norm1,attn.qkv,attn.proj,norm2,mlp}   layers.i.blocks.j.(same)
    stages.i.blocks.j.attn.pos_bias.mlp   layers.i.blocks.j.attn.relative_position_bias_table
    norm                                  norm

What has no timm key (the coordinate MLPs, which make the window free to choose again, and the
mask token) travels in the safetensors metadata (`EXTRA_KEY`), so `ummae finetune` and
`load_backbone` rebuild ummae's own backbone from the export exactly; timm never reads it.

Where timm's Swin cannot express a configuration (the official checkpoints' conv merging,
LayerNorm eps 1e-6), `timm_incompatibility` says why in one line and the export stays
`ummae_swin`.

What timm does differently at run time (documented in docs/export.md): it fixes each stage's
window and shift at construction from `img_size` (ummae picks them per input), and on a grid
that is not a whole number of windows it rolls before padding and attends the zero padding
(ummae pads, then rolls, and never attends padding). Sizes whose stage grids are whole windows
(or at most one window) give the same features either way.
"""

from __future__ import annotations

import base64
import re

import torch

__all__ = ["TIMM_SWIN_NAMES", "timm_incompatibility", "timm_swin_model", "to_timm_state",
           "from_timm_state", "position_bias_table", "pack_extra", "unpack_extra", "EXTRA_KEY"]

EXTRA_KEY = "ummae_extra"  # safetensors metadata: ummae-only tensors, base64 of a safetensors blob

# timm's registered sizes: (embed_dim, depths, num_heads) -> name. All arguments are passed
# explicitly anyway (window, image size...), so the name only picks timm's pretrained config.
TIMM_SWIN_NAMES = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): "swin_base_patch4_window7_224",
    (192, (2, 2, 18, 2), (6, 12, 24, 48)): "swin_large_patch4_window7_224",
}


def timm_incompatibility(m) -> str | None:
    """Why timm's `SwinTransformer` cannot hold this Swin (`m` a ModelConfig), or None if it can."""
    if m.merge != "linear":
        return (f"model.merge={m.merge} (the official UM-MAE conv merging) has no timm equivalent: "
                "timm's Swin merges with LayerNorm + linear")
    if m.norm_eps != 1e-5:
        return (f"model.norm_eps={m.norm_eps:g} has no timm equivalent: timm's Swin builds every "
                "LayerNorm with eps 1e-5")
    return None


def timm_swin_model(m, window: int, img_size) -> tuple[str, dict]:
    """`(timm model name, create_model kwargs)` of timm's Swin for ModelConfig `m`.

    `num_classes=0`: the export has no head (timm then loads it whatever the name's default
    head); `strict_img_size=False`: any input size runs, as ummae's does (timm builds the
    shifted-window masks per input).
    """
    name = TIMM_SWIN_NAMES.get((m.embed_dim, tuple(m.depths), tuple(m.num_heads)),
                               "swin_tiny_patch4_window7_224")
    size = int(img_size) if isinstance(img_size, int) else [int(v) for v in img_size]
    args = dict(img_size=size, patch_size=int(m.patch_size), embed_dim=int(m.embed_dim),
                depths=[int(d) for d in m.depths], num_heads=[int(h) for h in m.num_heads],
                window_size=int(window), mlp_ratio=float(m.mlp_ratio), num_classes=0,
                strict_img_size=False)
    return name, args


def position_bias_table(pos_bias, window: tuple[int, int]) -> torch.Tensor:
    """timm's `relative_position_bias_table` of one block: the coordinate MLP at the integer
    offsets of a `(rows, cols)` window, in timm's row order (rows outer, columns inner), made by
    the same code path as ummae's full-image table, so the numbers are the same bits."""
    rows = torch.arange(-(window[0] - 1), window[0], dtype=torch.float32)
    cols = torch.arange(-(window[1] - 1), window[1], dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        return pos_bias._mlp(grid.to(pos_bias.mlp[0].weight.device)).detach()


def _timm_key(key: str) -> str | None:
    """ummae key -> timm key (None: no timm counterpart)."""
    if key == "mask_token" or ".pos_bias." in key:
        return None
    if key.startswith("patch_norm."):
        return "patch_embed.norm." + key[len("patch_norm."):]
    return re.sub(r"^stages\.", "layers.", key)


def _ummae_key(key: str) -> str:
    if key.startswith("patch_embed.norm."):
        return "patch_norm." + key[len("patch_embed.norm."):]
    return re.sub(r"^layers\.", "stages.", key)


def to_timm_state(backbone, timm_model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(timm state dict, ummae-only tensors)` of a full-image ummae `SwinTransformer`.

    `timm_model` is timm's Swin built from the card (pretrained=False): each block's table is
    evaluated at *its* window (timm clips a window to a smaller stage grid at construction, so a
    late stage can have a smaller table than the others), and its keys are the target.
    """
    state, extra = {}, {}
    for key, value in backbone.state_dict().items():
        target = _timm_key(key)
        if target is None:
            extra[key] = value
        else:
            state[target] = value
    for i, layer in enumerate(timm_model.layers):
        for j, block in enumerate(layer.blocks):
            table = position_bias_table(backbone.stages[i].blocks[j].attn.pos_bias, block.attn.window_size)
            state[f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"] = table
    expected = set(timm_model.state_dict()) - {k for k in timm_model.state_dict() if k.startswith("head.")}
    if set(state) != expected:  # a programming error, not bad input: the key maps must agree
        raise AssertionError(f"timm key mismatch: {sorted(set(state) ^ expected)[:4]}")
    return state, extra


def from_timm_state(state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ummae `SwinTransformer` weights from a timm-format export: its tensors renamed back, the
    tables dropped (they are the MLPs, evaluated), the MLPs and mask token from `extra`."""
    out = {_ummae_key(k): v for k, v in state.items() if not k.endswith("relative_position_bias_table")}
    out.update(extra)
    return out


def pack_extra(extra: dict[str, torch.Tensor]) -> str:
    """Tensors -> one metadata string (a safetensors blob, base64: exact bits, no new file)."""
    from safetensors.torch import save

    return base64.b64encode(save({k: v.contiguous() for k, v in extra.items()})).decode("ascii")


def unpack_extra(text: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(base64.b64decode(text))


def native_export(backbone, cfg, img_size: int):
    """`BackboneSpec.timm_native` of Swin: `(name, model_args, timm state, ummae-only tensors)`
    of timm's own Swin at the backbone's current window and `img_size`, or the one-line reason
    why timm's Swin cannot hold this configuration."""
    import timm

    why = timm_incompatibility(cfg.model)
    if why is not None:
        return why
    name, args = timm_swin_model(cfg.model, backbone.window_size, img_size)
    target = timm.create_model(name, pretrained=False, **args)
    state, extra = to_timm_state(backbone, target)
    return name, args, state, extra
