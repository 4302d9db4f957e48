"""UM-MAE (and SimMIM) on timm's Swin Transformer V2: the encoder is timm's model itself.

Swin Transformer V2: Scaling Up Capacity and Resolution, Liu et al., CVPR 2022.
UM-MAE: Uniform Masking, Li et al., arXiv 2205.10063 (SPEC sec. 3).

Swin V2 already has what UM-MAE needs from a position bias: a *continuous* one. Each window
attention evaluates a small MLP (`cpb_mlp`) on the log-spaced relative coordinates of two tokens
instead of reading a table indexed by their integer offset. Fed the true coordinates of the
compact image (the visible unit of every 2x2 block packed into a half-size image), the same MLP
with the same weights gives the bias UM-MAE needs: no new parameter, and the weights stay timm's.

The encoder is `SwinV2Encoder`, timm's `SwinTransformerV2` built with the arguments of a
registered `swinv2_*` variant (`swinv2_timm_model`); the subclass adds methods only, and the
learnable mask token of UM-MAE's secondary masking and SimMIM (which a model built for full
images leaves out, `model.swinv2_mask_token`). Its state dict without the mask token is the timm
model's, so `ummae export` writes plain `swinv2_*` weights and `--init-weights` reads them.

- Full images (fine-tuning, probing, export, `forward_features`): timm's own forward. SimMIM
  swaps the embeddings of masked patches for the mask token between the patch conv and its norm
  (as ummae's Swin does), then runs timm's own stages.
- The compact image (`forward_masked`): timm's modules (patch embedding, merging, blocks'
  qkv, cosine attention scale, `cpb_mlp`, projection, post-norms, MLP, final norm) driven by
  `forward_tokens`, which carries each token's true coordinates along (ummae's Swin machinery:
  `compact_coordinates`, `merge_coordinates`). Every block runs half its window on the half-size
  grid, i.e. the same extent of the photograph, and half its shift. A pair's bias is
  `16 * sigmoid(cpb_mlp(f(true offset)))` with `f` exactly timm's normalisation of an integer
  offset (divide by the block's window - 1, or its pretrained window - 1; times 8;
  `sign * log2(1 + |x|) / log2(8)`), so on the full grid it is timm's table.
- Static shapes: the true offsets lie on a lattice known from the sizes alone
  (`swin.CoordinateLattice`), so the MLP runs once per block on that lattice and each pair gathers
  its entry by an integer index (no `unique`, no host sync; `torch.compile(fullgraph=True)`).

`model.window_size` is the timm model's (full-image) window, e.g. 16 for
`swinv2_tiny_window16_256`; the compact image runs 8 over the same 16 patches of the photograph.
Unlike `model.arch: swin`, nothing doubles for fine-tuning: the model is the same.

Shapes: tokens channel-last `[B, H, W, C]`; coordinates `[Bc, H, W, 2]` (Bc = B on compact
images, 1 on full ones), in units of the current stage's tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models.swin_transformer_v2 import SwinTransformerV2, window_partition, window_reverse

from ..compaction import compact_coordinates, compact_image, compact_unit_flags
from ..errors import ConfigError
from ..masking import MaskSample, require_uniform
from .hiera import read_init_weights as read_weights_file
from .specs import BackboneSpec, ClassifierLayout, register_backbone, uses_uniform_masks
from .swin import CoordinateLattice, merge_coordinates, window_attention_mask, windowed_sdpa

__all__ = ["SwinV2Encoder", "swinv2_timm_model", "build_swinv2", "position_bias", "direct_position_bias",
           "load_backbone_weights", "SWINV2_VARIANTS"]

# timm's registered sizes: (embed_dim, depths, num_heads, window_size) -> name.
SWINV2_VARIANTS = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24), 8): "swinv2_tiny_window8_256",
    (96, (2, 2, 6, 2), (3, 6, 12, 24), 16): "swinv2_tiny_window16_256",
    (96, (2, 2, 18, 2), (3, 6, 12, 24), 8): "swinv2_small_window8_256",
    (96, (2, 2, 18, 2), (3, 6, 12, 24), 16): "swinv2_small_window16_256",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 8): "swinv2_base_window8_256",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 16): "swinv2_base_window16_256",
}
MASK_BLOCKED = -100.0  # what timm's shifted-window mask adds to blocked pairs (so full grids match it)
OPTION = "swinv2_mask_token"


def swinv2_timm_model(m, img_size: int) -> tuple[str, dict]:
    """`(timm model name, create_model kwargs)` of the configured Swin V2 (`m` a ModelConfig).

    The name is timm's registered variant of the same sizes (`swinv2_tiny_window16_256`, ...),
    else `swinv2_tiny_window8_256`; the arguments are always complete (plain JSON values), so the
    name only picks the defaults. No classifier (`num_classes=0`), as a pre-trained encoder has none.
    """
    key = (m.embed_dim, tuple(m.depths), tuple(m.num_heads), m.window_size)
    name = SWINV2_VARIANTS.get(key, "swinv2_tiny_window8_256")
    args = dict(img_size=int(img_size), patch_size=int(m.patch_size), embed_dim=int(m.embed_dim),
                depths=[int(d) for d in m.depths], num_heads=[int(h) for h in m.num_heads],
                window_size=int(m.window_size), mlp_ratio=float(m.mlp_ratio), num_classes=0)
    return name, args


def _drop_mask_token(module, state_dict, prefix, *args) -> None:
    # A full-image model has no mask token; a pre-training checkpoint's is not an error (it is
    # never used on full images), so it is dropped before loading (strictly or not).
    if module.mask_token is None:
        state_dict.pop(prefix + "mask_token", None)


class SwinV2Encoder(SwinTransformerV2):
    """timm's `SwinTransformerV2` with ummae's masked forward passes (see the module docstring).

    Args:
        mask_token: own the learnable token of hidden patches (pre-training); a model that only
            sees full images leaves it out, so that its state dict is exactly timm's.
        **kwargs: `SwinTransformerV2`'s (what `swinv2_timm_model` gives).
    """

    needs_uniform_mask = True  # its masked path packs the visible units into the compact image

    def __init__(self, mask_token: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(self.patch_embed.patch_size[0])
        self.stride = self.patch_size * 2 ** (self.num_layers - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim)) if mask_token else None
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)
        self.register_load_state_dict_pre_hook(_drop_mask_token)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"mask_token"} if self.mask_token is not None else set())

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the timm model (no mask token)."""
        return {k: v for k, v in self.state_dict().items() if k != "mask_token"}

    # -- embedding -----------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """timm's patch embedding (conv, NHWC, norm) of any input size, `replace`d patches swapped
        for the mask token between the conv and the norm (normalised like real patches).

        Args:
            x: `[B, 3, H, W]`, sides multiples of the patch.
            replace: `[B, H/p, W/p]` bool, True = use the mask token, or None.

        Returns:
            `[B, H/p, W/p, C1]`.
        """
        pe = self.patch_embed
        tokens = pe.proj(x).permute(0, 2, 3, 1)  # [B, H/p, W/p, C1]
        if replace is not None:
            if self.mask_token is None:
                raise ConfigError("this Swin V2 was built without a mask token (full images only): "
                                  "it cannot replace patches")
            if replace.shape != tokens.shape[:3]:
                raise ConfigError(f"replace mask of shape {tuple(replace.shape)} does not match the "
                                  f"patch grid {tuple(tokens.shape[:3])}")
            w = replace.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        return pe.norm(tokens)

    def forward_features(self, x: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """Full image: timm's own forward; with `replace` (SimMIM) the masked patches enter timm's
        stages as the mask token. `[B, 3, H, W]` -> `[B, H/32, W/32, C_last]`."""
        if replace is None:
            return super().forward_features(x)
        return self.norm(self.layers(self.embed(x, replace)))

    # -- the compact image ---------------------------------------------------------------------
    def forward_masked(self, imgs: torch.Tensor, masks: MaskSample, unit: int) -> torch.Tensor:
        """UM-MAE encoder: only the visible units of a uniform mask, packed into the compact image.

        Args:
            imgs: `[B, 3, H, W]` full images (the size the model was built for).
            masks: a uniform `MaskSample` over the `(H/unit, W/unit)` grid.
            unit: mask unit in pixels, a multiple of the patch size.

        Returns:
            `[B, H/2/stride, W/2/stride, C_last]` features of the compact image (final norm applied).
        """
        require_uniform(masks)
        if unit % self.patch_size:
            raise ConfigError(f"mask unit {unit} is not a multiple of the patch size {self.patch_size}")
        per_unit = unit // self.patch_size
        compact = compact_image(imgs, masks.ids_keep, unit)  # [B, 3, H/2, W/2]
        replace = None
        if masks.secondary is not None:
            replace = compact_unit_flags(masks.secondary, masks.ids_keep, masks.grid_size, per_unit)
        coords = compact_coordinates(masks.ids_keep, masks.grid_size, per_unit)
        tokens = self.embed(compact, replace)
        return self.forward_tokens(tokens, coords, CoordinateLattice.compact(per_unit), compact=True)

    def forward_tokens(self, x: torch.Tensor, coords: torch.Tensor, lattice: CoordinateLattice | None,
                       compact: bool) -> torch.Tensor:
        """timm's stages on embedded tokens at true coordinates, then the final norm.

        Args:
            x: `[B, H, W, C1]` embedded patches.
            coords: `[Bc, H, W, 2]` their true patch-centre coordinates (in patches).
            lattice: where `coords` lie (`CoordinateLattice.full()` / `.compact(p)`: the bias MLP
                runs once on it per block), or None (any coordinates: the MLP runs per pair).
            compact: the tokens are the half-size compact grid (every block runs half its window
                and shift); False: the full grid (timm's windows; with full coordinates this is
                timm's `forward_features`).
        """
        for stage in self.layers:
            if not isinstance(stage.downsample, nn.Identity):
                x = stage.downsample(x)
                coords = merge_coordinates(coords)
                lattice = lattice.merged() if lattice is not None else None
            for blk in stage.blocks:
                if stage.grad_checkpointing and self.training:
                    x = torch.utils.checkpoint.checkpoint(_block_forward, blk, x, coords, lattice, compact,
                                                          use_reentrant=False)
                else:
                    x = _block_forward(blk, x, coords, lattice, compact)
        return self.norm(x)


def block_geometry(blk: nn.Module, compact: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """`(window, shift)` of a timm block on the full grid or on the half-size compact grid (half
    of each: the same extent of the image)."""
    win, shift = tuple(blk.window_size), tuple(blk.shift_size)
    if not compact:
        return win, shift
    if any(w % 2 for w in win) or any(s % 2 for s in shift):
        raise ConfigError(f"a Swin V2 block with window {win} and shift {shift} has no half-size window "
                          "for the compact image: use an even model.window_size (a multiple of 4 where "
                          "windows shift) that fits each stage")
    return (win[0] // 2, win[1] // 2), (shift[0] // 2, shift[1] // 2)


def _block_forward(blk: nn.Module, x: torch.Tensor, coords: torch.Tensor, lattice: CoordinateLattice | None,
                   compact: bool) -> torch.Tensor:
    """`SwinTransformerV2Block.forward` at true coordinates: (shifted) window attention with the
    bias of its `cpb_mlp` at the true offsets, then timm's post-norm residuals and MLP."""
    B, H, W, C = x.shape
    win, shift = block_geometry(blk, compact)
    if H % win[0] or W % win[1]:
        raise ConfigError(f"the masked Swin V2 path runs whole windows: a {H}x{W} grid with window {win} "
                          "(choose data.img_size so that every stage is a whole number of windows)")
    y = x
    if any(shift):
        y = torch.roll(y, (-shift[0], -shift[1]), dims=(1, 2))
        coords = torch.roll(coords, (-shift[0], -shift[1]), dims=(1, 2))
    N = win[0] * win[1]
    y_win = window_partition(y, win).reshape(B, -1, N, C)  # [B, nW, N, C]
    c_win = window_partition(coords, win).reshape(coords.shape[0], -1, N, 2)
    blocked = window_attention_mask(H, W, win, shift, x.device)  # [nW, N, N] or None
    y_win = _window_attention(blk.attn, y_win, c_win, lattice, win, blocked)
    y = window_reverse(y_win.reshape(-1, win[0], win[1], C), win, (H, W))
    if any(shift):
        y = torch.roll(y, shift, dims=(1, 2))
    x = x + blk.drop_path1(blk.norm1(y))
    return x + blk.drop_path2(blk.norm2(blk.mlp(x)))


def _window_attention(attn: nn.Module, x: torch.Tensor, coords: torch.Tensor, lattice: CoordinateLattice | None,
                      window: tuple[int, int], blocked: torch.Tensor | None) -> torch.Tensor:
    """timm's `WindowAttention.forward` (cosine attention, learnt logit scale, `16 sigmoid(cpb)`
    bias), its bias from true coordinates. `x` `[B, nW, N, C]`, `coords` `[Bc, nW, N, 2]`."""
    B, nW, N, C = x.shape
    heads = attn.num_heads
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + qkv_bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(B, nW, N, 3, heads, -1).permute(3, 0, 1, 4, 2, 5).unbind(0)  # [B, nW, heads, N, hd]
    scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()  # [heads, 1, 1]
    q = F.normalize(q, dim=-1) * scale
    k = F.normalize(k, dim=-1)

    bias = position_bias(attn, coords, lattice, window)  # [Bc, nW, heads, N, N]
    if blocked is not None:
        bias = bias + blocked.to(bias.dtype).mul(MASK_BLOCKED)[:, None]
    bias = bias.to(q.dtype)
    out = windowed_sdpa(q, k, v, bias, attn.attn_drop.p if attn.training else 0.0, scale=1.0)  # q carries the scale
    return attn.proj_drop(attn.proj(out))


# -- the position bias -------------------------------------------------------------------------

def _normaliser(attn: nn.Module) -> tuple[int, int]:
    """What timm divides an offset by: its pretrained window - 1 if set, else its window - 1."""
    ref = attn.pretrained_window_size if attn.pretrained_window_size[0] > 0 else attn.window_size
    return max(ref[0] - 1, 1), max(ref[1] - 1, 1)


def cpb_inputs(attn: nn.Module, offsets: torch.Tensor) -> torch.Tensor:
    """timm's normalisation of relative coordinates (`_make_pair_wise_relative_positions`), in its
    order of operations, applied to any offsets `[..., 2]` (float32)."""
    n_r, n_c = _normaliser(attn)
    t = torch.stack([offsets[..., 0] / n_r, offsets[..., 1] / n_c], dim=-1) * 8
    return torch.sign(t) * torch.log2(torch.abs(t) + 1.0) / math.log2(8)


def _bias_of(attn: nn.Module, offsets: torch.Tensor) -> torch.Tensor:
    """`[..., 2]` offsets -> `[..., heads]`: `16 * sigmoid(cpb_mlp(normalised offsets))`."""
    return 16 * torch.sigmoid(attn.cpb_mlp(cpb_inputs(attn, offsets.float())))


def direct_position_bias(attn: nn.Module, coords: torch.Tensor) -> torch.Tensor:
    """The bias evaluated on every pair: `[..., N, 2]` coordinates -> `[..., heads, N, N]`."""
    offsets = coords.float().unsqueeze(-2) - coords.float().unsqueeze(-3)  # [..., N(i), N(j), 2]
    return _bias_of(attn, offsets).movedim(-1, -3)


def position_bias(attn: nn.Module, coords: torch.Tensor, lattice: CoordinateLattice | None,
                  window: tuple[int, int]) -> torch.Tensor:
    """The bias of every pair of every window, `[Bc, nW, N, 2]` -> `[Bc, nW, heads, N, N]`.

    With a lattice, `cpb_mlp` runs once on the lattice of possible offsets and each pair gathers
    its entry by the integer index of its offset (coordinates are dyadic: exact in float32), the
    same numbers as `direct_position_bias`; where the lattice would have more entries than there
    are pairs (late stages of the compact grid), or without a lattice, it runs per pair. Either
    way a static choice, from the sizes alone.
    """
    if lattice is None or lattice.table_size(window) > coords[..., 0].numel() * coords.shape[-2]:
        return direct_position_bias(attn, coords)
    (step_r, k_r), (step_c, k_c) = lattice.axis(window[0]), lattice.axis(window[1])
    dev = coords.device
    rows = torch.arange(-k_r, k_r + 1, device=dev, dtype=torch.float32) * step_r
    cols = torch.arange(-k_c, k_c + 1, device=dev, dtype=torch.float32) * step_c
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    table = _bias_of(attn, grid)  # [(2k_r+1)(2k_c+1), heads]
    offsets = coords.float().unsqueeze(-2) - coords.float().unsqueeze(-3)  # [Bc, nW, N, N, 2]
    ir = torch.round(offsets[..., 0] * (1 / step_r)).long().clamp_(-k_r, k_r) + k_r
    ic = torch.round(offsets[..., 1] * (1 / step_c)).long().clamp_(-k_c, k_c) + k_c
    return F.embedding(ir * (2 * k_c + 1) + ic, table).movedim(-1, -3)


# -- building and loading ----------------------------------------------------------------------

def build_swinv2(m, img_size: int, mask_token: bool = True) -> SwinV2Encoder:
    """The encoder of a ModelConfig: timm's Swin V2 of `swinv2_timm_model`, no classifier."""
    _, args = swinv2_timm_model(m, img_size)
    return SwinV2Encoder(mask_token=mask_token, drop_path_rate=float(m.drop_path_rate), **args)


# Keys of other checkpoints that are not the backbone's.
_NOT_BACKBONE = ("head.", "mask_token", "decoder")


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load timm's Swin V2 weights (`timm.create_model("swinv2_*").state_dict()`, an `ummae
    export`, or the formats timm's `checkpoint_filter_fn` converts) into `model.encoder`
    (continued pre-training). Every backbone weight must be there with its shape; the classifier
    and a mask token are left out (the mask token keeps its fresh initialisation).

    Returns:
        the keys of `state_dict` that were left out.
    """
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn

    from .loading import load_timm_backbone_weights

    encoder = model.encoder
    return load_timm_backbone_weights(encoder, checkpoint_filter_fn(state_dict, encoder), encoder.timm_state_dict(),
                                      lambda k: k.startswith(_NOT_BACKBONE), source, "Swin V2")


# ---------------------------------------------------------------------------------------------
# registration: `model.arch: swinv2`

def _stage_geometry(m, img_size: int) -> list[tuple[int, int, int]]:
    """`(grid side, window, shift)` of each stage as timm builds them (window clamped to the grid,
    no shift where one window covers it)."""
    out, side = [], math.ceil(img_size / m.patch_size)
    for i in range(len(m.depths)):
        if i > 0:
            side = (side + 1) // 2
        win = min(m.window_size, side)
        out.append((side, win, win // 2 if side > m.window_size else 0))
    return out


def _validate(cfg) -> None:
    """Four-stage timm Swin V2; with uniform masks every stage's window must halve onto the compact
    grid (even windows, even shifts, whole windows)."""
    m, size = cfg.model, cfg.data.img_size
    if len(m.depths) != len(m.num_heads):
        raise ConfigError(f"model.depths {m.depths} and model.num_heads {m.num_heads} differ in length")
    if size % m.patch_size:
        raise ConfigError(f"swinv2: data.img_size {size} is not a multiple of model.patch_size {m.patch_size}")
    if uses_uniform_masks(cfg):
        for i, (side, win, shift) in enumerate(_stage_geometry(m, size)):
            if side % 2 or win % 2 or shift % 2 or (side // 2) % (win // 2):
                raise ConfigError(
                    f"swinv2 with uniform masks: stage {i + 1} ({side}x{side} tokens, window {win}, shift "
                    f"{shift}) has no half-size window on the compact image; use an even model.window_size "
                    f"(a multiple of 4) and a data.img_size whose stages are whole windows (e.g. 256 with 16)")


def _build(cfg) -> SwinV2Encoder:
    return build_swinv2(cfg.model, cfg.data.img_size, mask_token=cfg.model.option(OPTION))


def _full_image(cfg, compact: bool):
    """The same timm model (its window is the full image's already), without the mask token."""
    cfg.model.options[OPTION] = False
    return cfg


def _timm_model(cfg) -> tuple[str, dict]:
    return swinv2_timm_model(cfg.model, cfg.data.img_size)


def _feature_map(encoder: nn.Module, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return feats.permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]


def _group_matcher(coarse: bool) -> dict:
    """timm's `SwinTransformerV2.group_matcher`, under the `encoder.` prefix (a stage's patch
    merging joins its first block)."""
    stem = r"^encoder\.(?:patch_embed|mask_token)"
    if coarse:
        return dict(stem=stem, blocks=r"^encoder\.layers\.(\d+)")
    return dict(stem=stem, blocks=[(r"^encoder\.layers\.(\d+)\.downsample", (0,)),
                                   (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)", None)])


register_backbone(BackboneSpec(
    name="swinv2", encoder_class=SwinV2Encoder, build=_build, validate=_validate,
    classifier=ClassifierLayout(feature_map=_feature_map, group_matcher=_group_matcher,
                                num_blocks=lambda encoder: sum(len(s.blocks) for s in encoder.layers)),
    needs_uniform_masks=True, masked_feature_map=True, full_image=_full_image,
    # timm's own Swin V2: plain `swinv2_*` weights, no ummae needed to load them
    timm_model=_timm_model,
    read_init_weights=lambda path, cfg: read_weights_file(path),
    load_backbone_weights=load_backbone_weights,
    options={OPTION: True},
    ignored_keys={"model.embed_dims": "model.arch swinv2 reads model.embed_dim (doubled per stage)",
                  "model.mlp_ratios": "model.arch swinv2 reads model.mlp_ratio",
                  "model.sr_ratios": "model.sr_ratios does not apply to model.arch swinv2",
                  "model.pos_hidden_dim": "swinv2's position MLP is timm's (512 wide)",
                  "model.merge": "swinv2 merges patches as timm's Swin V2 does",
                  "model.norm_eps": "swinv2's LayerNorms are timm's"},
))
