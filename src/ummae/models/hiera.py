"""MAE pre-training of timm's Hiera: the encoder is `timm.models.hiera.Hiera` itself.

Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles, Ryali et al., ICML 2023.
Masked Autoencoders Are Scalable Vision Learners (MAE), He et al., CVPR 2022.

Hiera was designed for MAE: its tokens are unrolled so that every *mask unit* (32 px at 224 px,
8x8 tokens of 4 px) is a contiguous block, and `Hiera.forward_features(x, mask=keep)` drops the
hidden units before the first block and runs only the visible ones, through every stage (mask-
unit attention in stages 1-2, global attention after). Nothing here copies or patches that
model: it is built with `timm.create_model` and masked through its own API, so its state dict
is timm's and an export is plain `hiera_*` weights.

What this file adds around it (the parts of MAE that are not the backbone):
- masks: ummae's `RandomMasking` over the mask-unit grid (seeded per sample in the data loader,
  so resume and multi-process runs stay exact), turned into Hiera's format here (`[B, L]`
  bool, True = KEEP, the opposite of ummae's and MAE's convention);
- multi-scale fusion, as in the Hiera paper's MAE: each earlier stage's tokens of a visible unit
  (rerolled by Hiera to `[B, N_vis, m, m, C_i]`) are pooled to the last stage's resolution by a
  strided conv (kernel = stride = the unit's side at that stage / at the last stage) projecting
  to the last width, and added to the last stage's tokens; then Hiera's own final norm
  (`head.norm`, the key timm maps the `.mae` checkpoints' `encoder_norm` to);
- ummae's MAE decoder (`decoder.py`) and normalised-pixel MSE on the masked units
  (`objectives.py`), one decoder token per mask unit.

The mask unit is fixed by Hiera's design: its token unrolling makes exactly 8x8 tokens (2^3 for
three 2x2 q-pools) contiguous, and its masking relies on that, so a unit is 8 x the patch stride:
32 px with the standard stride 4 (16 px with `model.patch_size: 2`, which timm's 7x7 patch conv
also runs). The mask ratio is free.

One deviation from the paper, on purpose: Hiera pre-trains with `q_pool=2` (the last stage at
stride 16, four tokens per unit, 16 px prediction targets); here the model is exactly timm's
`hiera_*_224` (`q_pool=3`: the last stage at stride 32, one token per 32 px unit, the geometry the
exported weights are used with) and the decoder predicts each unit's 32x32 pixels. That keeps
one mask-unit grid for masks, decoder and loss, and pre-trains the very forward pass that is
exported (q-pooling has no weights, so either geometry loads the other's weights).

EMAE on Hiera (K random disjoint parts per image in one batch of B*K) is `emae.HieraEMAE`, this
class with EMAE's verbs; `visible_units` accepts its parts' ids in any order.

Shapes: `B` batch, `L` mask units, `N_vis` visible units, `C` the last stage's width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from timm.models.hiera import Hiera

from ..errors import ConfigError, UmmaeError
from ..masking import MaskSample, RandomMasking
from ..objectives import masked_mse_loss, pixel_targets
from .decoder import MAEDecoder
from .method import MaskedImageModel
from .specs import BackboneSpec, ClassifierLayout, register_backbone

__all__ = ["build_hiera", "HieraMAE", "hiera_timm_model", "load_backbone_weights", "HIERA_VARIANTS"]

UNIT_TOKENS = 8  # tokens along a mask unit's side: Hiera unrolls 3 x (2x2) strides, 2^3 = 8

# timm's registered sizes: (embed_dim, num_heads of stage 1, stages) -> name.
HIERA_VARIANTS = {
    (96, 1, (1, 2, 7, 2)): "hiera_tiny_224",
    (96, 1, (1, 2, 11, 2)): "hiera_small_224",
    (96, 1, (2, 3, 16, 3)): "hiera_base_224",
    (112, 2, (2, 3, 16, 3)): "hiera_base_plus_224",
    (144, 2, (2, 6, 36, 4)): "hiera_large_224",
    (256, 4, (2, 6, 36, 4)): "hiera_huge_224",
}


def hiera_timm_model(m, img_size: int, unit: int) -> tuple[str, dict]:
    """`(timm model name, create_model kwargs)` of the configured Hiera (`m` a ModelConfig).

    The name is timm's registered variant of the same size (`hiera_tiny_224`, ...) with its `.mae`
    tag, whose pretrained config has no classifier (`num_classes=0`), as an MAE encoder has none;
    other sizes use `hiera_tiny_224.mae` with every size argument given. The arguments are always
    complete (plain JSON values), so the name only picks the defaults.
    """
    key = (m.embed_dim, m.num_heads[0], tuple(m.depths))
    name = HIERA_VARIANTS.get(key, "hiera_tiny_224") + ".mae"
    args = dict(img_size=int(img_size), embed_dim=int(m.embed_dim), num_heads=int(m.num_heads[0]),
                stages=[int(d) for d in m.depths], mask_unit_size=[unit // m.patch_size] * 2,
                mlp_ratio=float(m.mlp_ratio))
    if m.patch_size != 4:  # timm's default stride; the 7x7 kernel (and so the weights) stay
        args["patch_stride"] = [int(m.patch_size)] * 2
    return name, args


def build_hiera(m, img_size: int, unit: int) -> nn.Module:
    """timm's Hiera for a ModelConfig: `timm.create_model(name, num_classes=0, ...)`, no head."""
    import timm

    name, args = hiera_timm_model(m, img_size, unit)
    return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=m.drop_path_rate, **args)


def _stage_unit_sides(encoder: nn.Module) -> list[int]:
    """Side, in tokens, of one mask unit at the output of each stage (8, 4, 2, 1 for 32 px units)."""
    side, q = encoder.mask_unit_size[0], encoder.q_stride[0]
    return [side // q ** min(i, encoder.q_pool) for i in range(len(encoder.stage_ends))]


class HieraMAE(MaskedImageModel):
    """MAE around timm's Hiera (see the module docstring).

    Args:
        encoder: a `timm.models.hiera.Hiera` (2-D, `num_classes=0`), e.g. from `build_hiera`.
        img_size: pre-training input size (the encoder's).
        unit: mask unit in pixels; must be the encoder's (`mask_unit_size` x patch stride).
        mask_ratio: fraction of units masked (0.6 in the Hiera paper).
        norm_pix_loss: normalise each target unit (mean 0, unit variance) before the MSE.
        decoder_dim, decoder_depth, decoder_heads: the decoder ViT.

    The attributes the training loop, benchmark and pictures use are those of
    `MaskedAutoencoder`: `masking`, `grid_size`, `unit`, `img_size`, `norm_pix_loss`, and the
    five verbs `sample_masks`, `forward_encoder`, `forward_decoder`, `forward_loss`, `forward`.
    """

    def __init__(self, encoder: nn.Module, img_size: int, unit: int = 32, mask_ratio: float = 0.6,
                 norm_pix_loss: bool = True, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16):
        super().__init__()
        if len(encoder.mask_spatial_shape) != 2 or getattr(encoder.head, "fc", None) is None \
                or not isinstance(encoder.head.fc, nn.Identity):
            raise ConfigError("HieraMAE needs a 2-D timm Hiera without a classifier (num_classes=0)")
        encoder_unit = encoder.mask_unit_size[0] * encoder.patch_stride[0]
        if unit != encoder_unit or encoder.mask_unit_size[0] != encoder.mask_unit_size[1]:
            raise ConfigError(f"mask unit {unit} px does not match the Hiera's mask units "
                              f"({encoder.mask_unit_size} tokens of {encoder.patch_stride[0]} px)")
        sides = _stage_unit_sides(encoder)
        if sides[-1] != 1 or encoder.mask_unit_size[0] != encoder.q_stride[0] ** (len(sides) - 1):
            raise ConfigError(f"Hiera's mask unit must be {UNIT_TOKENS}x{UNIT_TOKENS} tokens pooled to one "
                              f"last-stage token (4 stages, 3 q-pools), got {encoder.mask_unit_size}")
        self.img_size = (int(img_size), int(img_size))
        self.unit = unit
        self.grid_size = tuple(encoder.mask_spatial_shape)  # units
        if self.grid_size != (img_size // unit, img_size // unit):
            raise ConfigError(f"the Hiera was built for another image size than {img_size}")
        self.norm_pix_loss = norm_pix_loss
        self.masking = RandomMasking(self.grid_size, mask_ratio)
        self.encoder = encoder

        # Multi-scale fusion: stage i's `[m_i, m_i, C_i]` tokens of a unit -> one `C` vector.
        widths = [f["num_chs"] for f in encoder.feature_info]
        self.fusion = nn.ModuleList([
            nn.Conv2d(width, widths[-1], kernel_size=side, stride=side)
            for width, side in zip(widths[:-1], sides[:-1])
        ])
        self.decoder = MAEDecoder(self.grid_size, unit, widths[-1], upsample=1,
                                  decoder_dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads)

    @classmethod
    def from_config(cls, cfg, encoder: nn.Module, masking: str) -> "HieraMAE":
        """The model of a `PretrainConfig` (method mae: random masks of Hiera's mask units)."""
        if masking != "random":
            raise ConfigError(f"Hiera drops masked units itself: it takes random masks, not {masking}")
        m = cfg.model
        return cls(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size,
                   mask_ratio=cfg.masking.mask_ratio, norm_pix_loss=m.norm_pix_loss, decoder_dim=m.decoder_dim,
                   decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    @staticmethod
    def visible_units(masks: MaskSample) -> tuple[torch.Tensor, torch.Tensor]:
        """`(keep [B, L] bool, True = visible, ids [B, N_vis] ascending)` of any MaskSample.

        Hiera returns the visible units in ascending unit order whatever order `ids_keep` lists
        them in (EMAE's parts, uniform masks' block order), so the decoder gets the sorted ids.
        """
        # Decided on the flag, not the values: reading them back would sync with the device.
        if masks.secondary is not None:
            raise UmmaeError("Hiera has no mask token: secondary masking (UM-MAE) does not apply to it")
        ids = masks.ids_keep.sort(dim=1).values
        keep = torch.zeros_like(masks.mask).scatter(1, ids, True)
        return keep, ids

    def forward_encoder(self, imgs: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """Hiera on the visible units only, stages fused.

        Returns:
            `[B, N_vis, C]`, one token per visible unit (the last stage has one per unit), in
            ascending unit order.
        """
        if tuple(masks.grid_size) != self.grid_size:
            raise ConfigError(f"mask grid {tuple(masks.grid_size)} does not match Hiera's mask units {self.grid_size}")
        keep, ids = self.visible_units(masks)
        # stages[i]: [B, N_vis, m_i, m_i, C_i], each visible unit's tokens in spatial order.
        stages = self._masked_stages(imgs, keep, ids)
        B, N, _, _, C = stages[-1].shape  # [B, N_vis, 1, 1, C]
        x = stages[-1].reshape(B, N, C)
        for fuse, feat in zip(self.fusion, stages[:-1]):
            m, width = feat.shape[2], feat.shape[-1]
            pooled = fuse(feat.reshape(B * N, m, m, width).permute(0, 3, 1, 2))  # [B*N_vis, C, 1, 1]
            x = x + pooled.reshape(B, N, C)
        return self.encoder.head.norm(x)  # Hiera's final norm, per token

    def _masked_stages(self, imgs: torch.Tensor, keep: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        """`Hiera.forward_features(imgs, mask=keep, return_intermediates=True)[1]`, computed with
        timm's own modules, except for one line.

        timm drops the hidden units with a boolean index (`x[mask.tile(...)]`): a shape that
        depends on the mask's values, which makes a GPU wait for the mask (a host sync) and breaks
        `torch.compile(fullgraph=True)`. The same tokens in the same order come from a gather with
        the static count N_vis: after Hiera's unroll, token j (of `mu_size`) of unit u (of L)
        sits at `j * L + u`, and the boolean index keeps them in that order, units ascending
        (`ids` is sorted). Tested equal to timm's own call.
        """
        enc = self.encoder
        B, L = keep.shape
        x = enc.patch_embed(imgs, mask=keep.view(B, 1, *enc.mask_spatial_shape))  # hidden units zeroed
        x = enc.unroll(enc._pos_embed(x))  # [B, mu_size * L, C]
        index = torch.arange(enc.mu_size, device=x.device).view(1, -1, 1) * L + ids.unsqueeze(1)
        x = x.gather(1, index.reshape(B, -1, 1).expand(-1, -1, x.shape[-1]))  # [B, mu_size * N_vis, C]
        stages = []
        for i, blk in enumerate(enc.blocks):
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if enc.grad_checkpointing else blk(x)
            if i in enc.stage_ends:
                stages.append(enc.reroll(x, i, mask=keep))
        return stages

    def forward_decoder(self, features: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """`[B, N_vis, D_enc]` -> `[B, L, unit*unit*3]` predicted pixels of every unit."""
        _, ids = self.visible_units(masks)
        return self.decoder(features, ids)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over the masked units (`mask` `[B, L]`, True = masked), as `MaskedAutoencoder`'s."""
        target = pixel_targets(imgs, self.unit, self.norm_pix_loss)
        return masked_mse_loss(pred.float(), target.float(), mask)


# Keys of Hiera's own MAE checkpoints that belong to the MAE head, not the backbone.
_MAE_ONLY = ("multi_scale_fusion_heads.", "decoder", "mask_token", "fusion.")


def load_backbone_weights(model: HieraMAE, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load a Hiera backbone's weights into `model.encoder` (continued pre-training).

    Accepts timm's Hiera state dict (what `timm.create_model("hiera_*").state_dict()` or an
    `ummae export` holds) and the formats timm's own `checkpoint_filter_fn` converts (the official
    `.mae` checkpoints: `model_state`, `encoder_norm.` / `norm.`). Fusion, decoder and mask-token
    weights of such files are left out: the MAE head starts fresh. Every backbone weight must be
    there with its shape (a classifier `head.fc` is ignored).

    Returns:
        the keys of `state_dict` that were left out.
    """
    from timm.models.hiera import checkpoint_filter_fn

    from .loading import load_timm_backbone_weights

    return load_timm_backbone_weights(model.encoder, checkpoint_filter_fn(state_dict, model.encoder),
                                      model.encoder.state_dict(),
                                      lambda k: k.startswith(_MAE_ONLY) or k.startswith("head.fc."), source, "Hiera")


def read_init_weights(path: str) -> dict:
    """`--init-weights` of a Hiera run: an ummae checkpoint (returned as is, with its `model`) or
    a Hiera backbone's own weights (returned as a bare state dict for `load_backbone_weights`):
    a `.safetensors` file (timm's hub format, `ummae export`) or a torch file of tensors, optionally
    under `model_state` (the official `.mae` checkpoints). Loaded with `weights_only`: no code runs.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise UmmaeError(f"--init-weights: '{path}' is not a readable safetensors file "
                             f"({str(e).splitlines()[0][:120]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused pickles and junk files alike
        raise UmmaeError(f"--init-weights: cannot load '{path}' as weights only "
                         f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]})") from None
    if not isinstance(state, dict):
        raise UmmaeError(f"--init-weights: '{path}' holds no state dict")
    return state


# ---------------------------------------------------------------------------------------------
# registration: `model.arch: hiera`

def _validate(cfg) -> None:
    """timm's Hiera: 4 stages (3 q-pools: stride 32), heads doubling per stage as its width does,
    mask units of 8x8 tokens (what its unrolling makes contiguous) that tile the image. (Which
    methods run on it, the methods say: it has no mask token and takes no uniform masks.)"""
    m, unit, size = cfg.model, cfg.masking.unit_size, cfg.data.img_size
    if len(m.depths) != 4:
        raise ConfigError(f"model.depths for hiera has 4 stages, e.g. [1, 2, 7, 2], got {m.depths}")
    if len(m.num_heads) == 4 and list(m.num_heads) != [m.num_heads[0] * 2 ** i for i in range(4)]:
        raise ConfigError(f"model.num_heads for hiera doubles per stage (timm's head_mul 2), e.g. "
                          f"[1, 2, 4, 8], got {m.num_heads}")
    if unit != UNIT_TOKENS * m.patch_size or unit < 1 or size % unit:
        raise ConfigError(f"hiera: masking.unit_size must be 8 x model.patch_size ({8 * m.patch_size} px: "
                          f"Hiera's mask units are 8x8 tokens) and divide data.img_size; got unit {unit} "
                          f"for {size} px")


def _feature_map(encoder: nn.Module, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`[B, h*w, C]` tokens in raster order -> its final norm per token (as in pre-training) -> map."""
    tokens = encoder.head.norm(feats)
    stride = encoder.feature_info[-1]["reduction"]
    gh, gw = x.shape[-2] // stride, x.shape[-1] // stride
    return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], gh, gw)


register_backbone(BackboneSpec(
    name="hiera", encoder_class=Hiera,
    build=lambda cfg: build_hiera(cfg.model, cfg.data.img_size, cfg.masking.unit_size),
    validate=_validate, mask_token=False, autoencoder=HieraMAE,
    classifier=ClassifierLayout(  # timm's Hiera.group_matcher, under the `encoder.` prefix
        feature_map=_feature_map,
        group_matcher=lambda coarse: dict(stem=r"^encoder\.(?:pos_embed|patch_embed)",
                                          blocks=r"^encoder\.blocks\.(\d+)"),
        num_blocks=lambda encoder: len(encoder.blocks)),
    # timm's own Hiera: plain `hiera_*` weights, no ummae needed to load them
    timm_model=lambda cfg: hiera_timm_model(cfg.model, cfg.data.img_size, cfg.masking.unit_size),
    # also timm's / Hiera's own backbone weights (`.mae`)
    read_init_weights=lambda path, cfg: read_init_weights(path),
    load_backbone_weights=load_backbone_weights,
    ignored_keys={"model.embed_dims": "model.arch hiera reads model.embed_dim (doubled per stage)",
                  "model.mlp_ratios": "model.arch hiera reads model.mlp_ratio",
                  "model.sr_ratios": "model.sr_ratios does not apply to model.arch hiera"},
))
