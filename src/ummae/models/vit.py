"""Plain ViT encoder for MAE and UM-MAE pre-training, as a subclass of timm's VisionTransformer.

An Image is Worth 16x16 Words (ViT), Dosovitskiy et al., ICLR 2021.
Masked Autoencoders Are Scalable Vision Learners (MAE), He et al., CVPR 2022.
UM-MAE: Uniform Masking, Li et al., arXiv 2205.10063 (SPEC sec. 3, ViT paragraph).

Why a subclass and not a new model: the parameters keep timm's names (`patch_embed.proj.*`,
`cls_token`, `pos_embed`, `blocks.N.*`, `norm.*`), so the pre-trained encoder loads into
`timm.create_model("vit_base_patch16_224", ...)` (and every tool built on timm) without key
surgery; only `mask_token` is extra.

What MAE / UM-MAE add on top of timm's ViT:
- The position embedding is a fixed 2-D sin-cos table of the patch grid (the class token's row
  is zeros), kept as a non-trainable parameter, as in MAE: the table is in the checkpoint
  under timm's key, but the optimiser never sees it.
- `forward_masked` runs only the visible units. Attention is global, so unlike the pyramid
  encoders (`swin.py`) nothing is compacted: the visible tokens are gathered, each keeping its
  own position embedding, in the order of `ids_keep`. That works the same for MAE's random
  masks and for UM-MAE's uniform masks.
- Secondary masking (UM): visible units chosen by it get `mask_token` instead of their patch
  embedding, plus their true position embedding.

Shapes: `B` batch, `N = (H/p) * (W/p)` patches, `N_vis` visible units, `C` = `embed_dim`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.profiler import record_function
from timm.layers import trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import vision_transformer as timm_vit
from timm.models._manipulate import checkpoint_seq
from torch.fx import _symbolic_trace

from ..errors import ConfigError
from ..masking import MaskSample
from . import official
from .specs import BackboneSpec, ClassifierLayout, register_backbone
from .weight_init import init_linear_and_norm

__all__ = ["VisionTransformer", "TIMM_VIT_NAMES", "timm_vit_model", "native_export", "from_timm_state"]

# timm options that the masked path relies on: exactly one prefix token (the class token) that
# has its own row in the position table, and a patch grid fixed at construction.
_FIXED_OPTIONS = {"class_token": True, "no_embed_class": False, "reg_tokens": 0, "pos_embed": "learn",
                  "dynamic_img_size": False, "dynamic_img_pad": False}


def _is_fx_symbolic_tracing() -> bool:
    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    return check()


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class VisionTransformer(timm_vit.VisionTransformer):
    """ViT encoder for MAE: full images, or only the visible units of a mask (random or uniform).

    Args:
        img_size: input size (int or `(H, W)`); fixes the patch grid and its position table.
        patch_size: square patch side in pixels (16 for ViT-B/16). One mask unit = one patch.
        embed_dim, depth, num_heads, mlp_ratio: the transformer (ViT-B: 768, 12, 12, 4).
        drop_path_rate: stochastic depth at the last block (linear from 0).
        num_classes: >0 adds a linear head on the average-pooled patch tokens (fine-tuning).
        weight_init: "mae" (xavier-uniform linears and patch projection, tokens trunc-normal .02, as
            MAE) or one of timm's modes ("", "jax", "moco", ...).
        mask_token: own the learnable token of masked patches (pre-training). Models that only
            see full images (timm classifiers, feature extractors) leave it out, so every
            parameter gets a gradient (DDP without `find_unused_parameters`).
        train_pos_embed: let the optimiser train the position table (it starts as the sin-cos
            table either way). False in pre-training (MAE's fixed table); timm-built models set
            it, as MAE's fine-tuning trains it (and timm expects a gradient for every parameter).
        **kwargs: other timm `VisionTransformer` options (e.g. `qkv_bias`, `fc_norm`,
            `global_pool`). Options that change the token layout are refused.

    The final norm stays timm's `norm` (applied to every token, before pooling) rather than
    timm's default `fc_norm` for average pooling: pre-training needs normalised tokens for the
    decoder, and the key then matches MAE checkpoints in timm. Pass `fc_norm=True` to build a
    MAE-style fine-tuning model (norm after pooling); its masked path then has no final norm.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 num_classes: int = 0, weight_init: str = "mae", mask_token: bool = True,
                 train_pos_embed: bool = False, **kwargs):
        for name, value in _FIXED_OPTIONS.items():
            if name in kwargs and kwargs[name] != value:
                raise ConfigError(f"ViT option {name}={kwargs[name]!r} is not supported by the MAE encoder "
                                  f"(it needs {name}={value!r})")
            kwargs.pop(name, None)
        if not isinstance(patch_size, int):
            raise ConfigError(f"ViT patch_size must be one int (square patches), got {patch_size!r}")
        if embed_dim % 4:
            raise ConfigError(f"ViT embed_dim must be divisible by 4 for the 2-D sin-cos position table, "
                              f"got {embed_dim}")
        H, W = _pair(img_size)
        if H % patch_size or W % patch_size:
            raise ConfigError(f"image size {H}x{W} is not divisible by the patch size {patch_size}")
        kwargs.setdefault("global_pool", "avg")
        kwargs.setdefault("fc_norm", False)
        super().__init__(img_size=(H, W), patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                         num_classes=num_classes, class_token=True,
                         weight_init="skip" if weight_init == "mae" else weight_init, **kwargs)
        self.patch_size = patch_size
        self.stride = patch_size  # one token per patch: the decoder needs no upsampling
        # Replaces the patch embedding of secondary-masked units (UM) or SimMIM-hidden patches.
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if mask_token else None

        if weight_init == "mae":
            self._init_mae()
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)
        self._init_pos_embed()
        self.pos_embed.requires_grad_(train_pos_embed)

    # -- initialisation ----------------------------------------------------------------------
    def _init_pos_embed(self) -> None:
        """Fixed 2-D sin-cos table of the patch grid; the class token's row is zeros."""
        gh, gw = self.patch_embed.grid_size
        # Same table (layout included) as the decoder's, so encoder and decoder agree on positions.
        table = build_sincos2d_pos_embed([gh, gw], self.embed_dim, device=self.pos_embed.device)  # [N, C]
        table = torch.cat([table.new_zeros(1, self.embed_dim), table], dim=0)  # [1+N, C]
        with torch.no_grad():
            self.pos_embed.copy_(table.unsqueeze(0).to(self.pos_embed.dtype))
        # Fixed in pre-training, as in MAE (see `train_pos_embed`), but saved under timm's key.

    def _init_mae(self) -> None:
        """MAE's initialisation: the patch projection as a linear layer, xavier-uniform linears."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(functools.partial(init_linear_and_norm, linear="xavier"))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set(super().no_weight_decay()) | {"mask_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # The mask token belongs with the embeddings (layer-wise lr decay puts it in the stem).
        groups = super().group_matcher(coarse)
        groups["stem"] = r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre|mask_token"
        return groups

    # -- helpers -----------------------------------------------------------------------------
    def _check_image(self, x: torch.Tensor) -> None:
        if _is_fx_symbolic_tracing():  # symbolic shapes; timm's patch embedding still asserts the size
            return
        expected = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            gh, gw = self.patch_embed.grid_size
            raise ConfigError(
                f"ViT was built for {expected[0]}x{expected[1]} images (its position table covers a "
                f"{gh}x{gw} patch grid), got {x.shape[-2]}x{x.shape[-1]}; build it with img_size equal "
                f"to the input size")

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm, blocks (with gradient checkpointing if enabled), final norm: `[B, T, C]`."""
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    # -- encoders ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, replace: torch.Tensor | None = None,
                         attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Full image (fine-tuning, SimMIM-style masking).

        Args:
            x: `[B, 3, H, W]`, the constructed `img_size`.
            replace: `[B, H/p, W/p]` bool, True = patch embedding replaced by `mask_token` (before
                the position embedding is added), or None.
            attn_mask, is_causal: passed to the blocks as in timm.

        Returns:
            `[B, 1+N, C]`: class token first, then patches in raster order.
        """
        self._check_image(x)
        if replace is None:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        grid = tuple(self.patch_embed.grid_size)
        if tuple(replace.shape) != (x.shape[0], *grid):
            raise ConfigError(f"replace must have shape [B, {grid[0]}, {grid[1]}] (one flag per patch), "
                              f"got {list(replace.shape)}")
        if self.mask_token is None:
            raise ConfigError("this ViT was built with mask_token=False: it cannot replace patches")
        tokens = self.patch_embed(x)  # [B, N, C]
        hidden = replace.reshape(x.shape[0], -1, 1).to(torch.bool)  # [B, N, 1]
        tokens = torch.where(hidden, self.mask_token.to(tokens.dtype), tokens)
        tokens = self.patch_drop(self._pos_embed(tokens))  # [B, 1+N, C]
        if attn_mask is not None or is_causal:
            tokens = self.norm_pre(tokens)
            for blk in self.blocks:
                tokens = blk(tokens, attn_mask=attn_mask, is_causal=is_causal)
            return self.norm(tokens)
        return self._trunk(tokens)

    def forward_masked(self, imgs: torch.Tensor, masks: MaskSample, unit: int) -> torch.Tensor:
        """MAE encoder: only the visible units, in the order of `masks.ids_keep`.

        Args:
            imgs: `[B, 3, H, W]` full images of the constructed `img_size`.
            masks: a `MaskSample` over the `(H/p, W/p)` grid, random (MAE) or uniform (UM-MAE);
                `secondary` units get `mask_token` in place of their patch embedding.
            unit: mask unit in pixels; must equal `patch_size` (one unit = one token).

        Returns:
            `[B, N_vis, C]` visible tokens, token `k` for unit `ids_keep[:, k]`, class token
            dropped.
        """
        if unit != self.patch_size:
            raise ConfigError(
                f"ViT masks whole tokens: the mask unit ({unit} px) must equal the patch size "
                f"({self.patch_size} px); set the mask unit to {self.patch_size} or build the ViT "
                f"with patch_size={unit}")
        self._check_image(imgs)
        grid = tuple(self.patch_embed.grid_size)
        if tuple(masks.grid_size) != grid:
            raise ConfigError(f"mask grid {tuple(masks.grid_size)} does not match the ViT patch grid {grid}")

        with record_function("patch_embed"):
            tokens = self.patch_embed(imgs)  # [B, N, C]
        B, _, C = tokens.shape
        ids_keep = masks.ids_keep
        index = ids_keep.unsqueeze(-1).expand(-1, -1, C)  # [B, N_vis, C]
        x = tokens.gather(1, index)  # [B, N_vis, C]: visible units only, in ids_keep order
        if masks.secondary is not None and self.mask_token is None:
            raise ConfigError("this ViT was built with mask_token=False: no secondary masking")
        if masks.secondary is not None:
            # Secondary-masked units keep their slot and position but not their content, so the
            # pretext task stays hard (UM-MAE); they are not in the loss (they count as visible).
            hidden = masks.secondary.gather(1, ids_keep).unsqueeze(-1)  # [B, N_vis, 1]
            x = torch.where(hidden, self.mask_token.to(x.dtype), x)
        # Each token takes the position of its own unit, whatever its place in the sequence.
        pos = self.pos_embed[:, 1:].expand(B, -1, -1).gather(1, index)  # [B, N_vis, C]
        x = x + pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # [B, 1, C]
        x = self.pos_drop(torch.cat([cls, x], dim=1))  # [B, 1+N_vis, C]
        with record_function("vit.blocks"):
            x = self._trunk(x)
        # The class token is dropped: the shared decoder has one slot per unit and scatters the
        # tokens to `ids_keep`, so a token without a unit has nowhere to go. (MAE's own decoder
        # carries the class token through and drops it at the end, which predicts nothing.)
        return x[:, self.num_prefix_tokens:]


# ---------------------------------------------------------------------------------------------
# registration: `model.arch: vit`

def _build(cfg) -> VisionTransformer:
    m = cfg.model
    return VisionTransformer(
        img_size=cfg.data.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depths[0],
        num_heads=m.num_heads[0], mlp_ratio=m.mlp_ratio, drop_path_rate=m.drop_path_rate)


def _validate(cfg) -> None:
    if len(cfg.model.depths) != 1:
        raise ConfigError(f"model.depths for vit is one number of blocks, e.g. [12], got {cfg.model.depths}")


def _timm_model(cfg) -> tuple[str, dict]:
    """`ummae_vit` (`models.registry`, `ummae export --format ummae`); its position table fixes
    the input size."""
    m = cfg.model
    return "ummae_vit", dict(img_size=cfg.data.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                             depth=m.depths[0], num_heads=m.num_heads[0], mlp_ratio=m.mlp_ratio)


# -- timm's own ViT (`ummae export`'s default) -------------------------------------------------
# timm's registered sizes: (patch_size, embed_dim, depth, num_heads) -> name; MAE's tag where timm
# has one (its pretrained config has no classifier, as an MAE encoder has none). The arguments
# are always complete, so the name only picks timm's defaults: other sizes use ViT-B's.
TIMM_VIT_NAMES = {
    (16, 192, 12, 3): "vit_tiny_patch16_224",
    (16, 384, 12, 6): "vit_small_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224.mae",
    (16, 1024, 24, 16): "vit_large_patch16_224.mae",
    (14, 1280, 32, 16): "vit_huge_patch14_224.mae",
}


def timm_vit_model(m, img_size) -> tuple[str, dict]:
    """`(timm model name, create_model kwargs)` of timm's own `VisionTransformer` holding this
    encoder (`m` a ModelConfig): the same module under the same keys, so only the options that
    differ from timm's defaults need saying. `global_pool="avg"` with `fc_norm=False`: the final
    norm on every token, then the average of the patch tokens (ummae's layout, see the class
    docstring; timm would move the norm after the pooling). No head (`num_classes=0`). timm's
    defaults are ummae's already: class token, qkv bias, LayerNorm eps 1e-6, learned `pos_embed`
    (the file holds the sin-cos values)."""
    name = TIMM_VIT_NAMES.get((m.patch_size, m.embed_dim, m.depths[0], m.num_heads[0]),
                              "vit_base_patch16_224.mae")
    size = int(img_size) if isinstance(img_size, int) else [int(v) for v in img_size]
    args = dict(img_size=size, patch_size=int(m.patch_size), embed_dim=int(m.embed_dim), depth=int(m.depths[0]),
                num_heads=int(m.num_heads[0]), mlp_ratio=float(m.mlp_ratio), global_pool="avg", fc_norm=False,
                num_classes=0)
    return name, args


def native_export(backbone: VisionTransformer, cfg, img_size):
    """`BackboneSpec.timm_native` of ViT: `(name, model_args, timm state, ummae-only tensors)`.
    The keys are timm's already; the mask token (no timm key) goes to the ummae-only tensors."""
    if _pair(img_size) != tuple(backbone.patch_embed.img_size):
        h, w = backbone.patch_embed.img_size
        raise ConfigError(f"--img-size {img_size}: a ViT export is at its pre-training size {h}x{w} (its "
                          f"position table); build timm's vit_* with another img_size to resample it")
    name, args = timm_vit_model(cfg.model, cfg.data.img_size)
    state = backbone.state_dict()
    extra = {k: state.pop(k) for k in ("mask_token",) if k in state}
    return name, args, state, extra


def from_timm_state(state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ummae `VisionTransformer` weights from a timm-format export: timm's keys plus the mask token."""
    return {**state, **extra}


def _feature_map(encoder: VisionTransformer, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`[B, 1+N, C]` -> the patch tokens on their grid `[B, C, gh, gw]` (prefix tokens dropped)."""
    tokens = feats[:, encoder.num_prefix_tokens:]
    gh, gw = encoder.patch_embed.grid_size
    return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], gh, gw)


register_backbone(BackboneSpec(
    name="vit", encoder_class=VisionTransformer, build=_build, validate=_validate,
    stage_widths=lambda m: [m.embed_dim],
    classifier=ClassifierLayout(
        feature_map=_feature_map,
        group_matcher=lambda coarse: dict(
            stem=r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre|mask_token)",
            blocks=r"^encoder\.blocks\.(\d+)"),
        num_blocks=lambda encoder: len(encoder.blocks), fixed_pos_embed=True),
    timm_model=_timm_model, timm_native=native_export, from_timm_native=from_timm_state,
    finetune_defaults=lambda m: {"layer_decay": 0.8, "drop_path": 0.1},
    read_init_weights=official.read_init_weights, profile_blocks=("vit", timm_vit.Block),
    ignored_keys={"model.embed_dims": "model.embed_dims is for per-stage widths; vit uses model.embed_dim",
                  "model.mlp_ratios": "model.mlp_ratios is for per-stage ratios; vit uses model.mlp_ratio",
                  "model.sr_ratios": "model.sr_ratios (spatial reduction) does not apply to model.arch vit"},
))
