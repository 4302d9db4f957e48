"""MAE and UM-MAE: the masked autoencoder around any encoder (SPEC sec. 2-4).

The whole method in five verbs, as in MAE:
    sample_masks     uniform masks (+ secondary masking) or random masks for a batch
    forward_encoder  encoder on the visible units only (pyramids: the compact image)
    forward_decoder  one token per visible unit -> pixels of every unit
    forward_loss     normalised-pixel MSE on the masked units only
    forward          all of the above: returns (loss, pred, masks)

UM-MAE = this model with uniform masking; plain MAE = random masking (ViT only: a windowed or
spatially reduced encoder needs the regular compact grid that only uniform masks give).

Both methods are registered at the end of the file (`ummae.models.specs`): `method: ummae` and
`method: mae` build `BackboneSpec.autoencoder` (this class unless the backbone brings its own, as
timm's Hiera does: `hiera.HieraMAE`) around the configured encoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..masking import MaskSample, RandomMasking, UniformMasking
from ..objectives import masked_mse_loss, pixel_targets
from .decoder import MAEDecoder
from .method import MaskedImageModel
from .specs import MethodSpec, backbone_names, backbone_spec, register_method

__all__ = ["MaskedAutoencoder", "random_masking_backbones"]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class MaskedAutoencoder(MaskedImageModel):
    """MAE with uniform (UM-MAE) or random (MAE) masking.

    Args:
        encoder: an encoder with `forward_masked(imgs, masks, unit)`, `stride`, `num_features`,
            `patch_size`; `needs_uniform_mask = True` for encoders that compact (Swin, PVT).
        img_size: pre-training input size (int or `(H, W)`).
        unit: mask unit in pixels (16).
        masking: "uniform" (UM: 75% masked, one visible unit per 2x2 block) or "random".
        mask_ratio: fraction masked by random masking (uniform masking is always 0.75).
        secondary_ratio: uniform masking's fraction of visible units given the secondary token.
        secondary_rounding: how that count is rounded, "round" or "official" (`masking.secondary_count`).
        norm_pix_loss: normalise each target unit (mean 0, unit variance) before the MSE.
        decoder_dim, decoder_depth, decoder_heads: the decoder ViT.
        decoder_norm_eps: eps of the decoder's LayerNorms.
    """

    def __init__(self, encoder: nn.Module, img_size: int | tuple[int, int] = 256, unit: int = 16,
                 masking: str = "uniform", mask_ratio: float = 0.75, secondary_ratio: float = 0.25,
                 norm_pix_loss: bool = True, decoder_dim: int = 512, decoder_depth: int = 2,
                 decoder_heads: int = 16, decoder_norm_eps: float = 1e-5,
                 secondary_rounding: str = "round"):
        super().__init__()
        H, W = _pair(img_size)
        if H % unit or W % unit:
            raise ConfigError(f"image size {H}x{W} is not divisible by the mask unit {unit}")
        if unit % encoder.patch_size:
            raise ConfigError(f"mask unit {unit} is not a multiple of the patch size {encoder.patch_size}")
        compacts = getattr(encoder, "needs_uniform_mask", False)
        # A compacting encoder runs on the H/2 x W/2 compact image and must reduce it to whole
        # tokens; one final token must span a whole number of units so that the decoder's pixel
        # shuffle lands on unit boundaries.
        size = (H // 2, W // 2) if compacts else (H, W)
        if size[0] % encoder.stride or size[1] % encoder.stride or encoder.stride % unit:
            raise ConfigError(
                f"image size {H}x{W} with mask unit {unit} does not fit an encoder of stride "
                f"{encoder.stride}: need {'H/2 and W/2' if compacts else 'H and W'} divisible by "
                f"{encoder.stride} and the stride a multiple of the unit")
        self.img_size = (H, W)
        self.unit = unit
        self.grid_size = (H // unit, W // unit)
        self.norm_pix_loss = norm_pix_loss
        if masking == "uniform":
            self.masking = UniformMasking(self.grid_size, secondary_ratio, secondary_rounding)
        elif masking == "random":
            if compacts:
                raise ConfigError(f"{type(encoder).__name__} packs visible units into a compact image "
                                  "and needs uniform masking, not random")
            self.masking = RandomMasking(self.grid_size, mask_ratio)
            # Random masking has no secondary masking: the encoder's mask token is never used.
            # Frozen, it stays out of the optimiser and out of DDP's gradient reduction (which
            # would otherwise wait for a gradient that never comes).
            if isinstance(getattr(encoder, "mask_token", None), nn.Parameter):
                encoder.mask_token.requires_grad_(False)
        else:
            raise ConfigError(f"masking must be 'uniform' or 'random', got {masking!r}")
        self.encoder = encoder
        self.decoder = MAEDecoder(self.grid_size, unit, encoder.num_features,
                                  upsample=encoder.stride // unit, decoder_dim=decoder_dim,
                                  depth=decoder_depth, num_heads=decoder_heads, norm_eps=decoder_norm_eps)

    @classmethod
    def from_config(cls, cfg, encoder: nn.Module, masking: str) -> "MaskedAutoencoder":
        """The model of a `PretrainConfig` around `encoder`, with "uniform" or "random" masking."""
        m = cfg.model
        return cls(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size, masking=masking,
                   mask_ratio=cfg.masking.mask_ratio, secondary_ratio=cfg.masking.secondary_ratio,
                   norm_pix_loss=m.norm_pix_loss, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                   decoder_heads=m.decoder_heads, decoder_norm_eps=m.decoder_norm_eps,
                   secondary_rounding=cfg.masking.secondary_rounding)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", set)()}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    def forward_encoder(self, imgs: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """Features of the visible units only.

        Returns:
            compacting encoders: `[B, H/2/stride, W/2/stride, C]` map of the compact image;
            ViT: `[B, N_vis, C]` visible tokens in the order of `masks.ids_keep`.
        """
        return self.encoder.forward_masked(imgs, masks, self.unit)

    def forward_decoder(self, features: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """Features -> `[B, L, unit*unit*3]` predicted pixels of every unit."""
        return self.decoder(features, masks.ids_keep)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over masked units (`mask` `[B, L]`, True = masked); secondary units do not count."""
        target = pixel_targets(imgs, self.unit, self.norm_pix_loss)
        return masked_mse_loss(pred.float(), target.float(), mask)


# ---------------------------------------------------------------------------------------------
# registration: `method: ummae` and `method: mae`

def random_masking_backbones() -> str:
    """The registered backbones that run any set of visible units ("vit or hiera")."""
    return " or ".join(n for n in backbone_names() if not backbone_spec(n).needs_uniform_masks)


def _build(masking: str):
    def build(cfg, backbone, encoder: nn.Module) -> nn.Module:
        return (backbone.autoencoder or MaskedAutoencoder).from_config(cfg, encoder, masking)
    return build


def _validate_ummae(cfg, backbone) -> None:
    if not backbone.mask_token:
        raise ConfigError(f"method ummae needs a backbone with a mask token for secondary masking; model.arch "
                          f"{backbone.name} has none (and drops masked units itself): use method mae or emae")


def _validate_mae(cfg, backbone) -> None:
    if backbone.needs_uniform_masks:
        raise ConfigError(f"method mae (random masking) needs model.arch {random_masking_backbones()}: "
                          f"{backbone.name} windows/reductions need uniform masking; use method ummae")


register_method(MethodSpec(
    name="ummae", build=_build("uniform"), validate=_validate_ummae, uniform_masks=lambda cfg: True,
    describe_masking=lambda cfg: (f"uniform 75% + SM {cfg.masking.secondary_ratio:g}, "
                                  f"{cfg.masking.unit_size}px units"),
    ignored_keys=lambda cfg: {"masking.mask_ratio": "method ummae uses uniform masking, which always masks 75%"}))
register_method(MethodSpec(
    name="mae", build=_build("random"), validate=_validate_mae, uniform_masks=lambda cfg: False,
    describe_masking=lambda cfg: f"random {cfg.masking.mask_ratio:.0%}, {cfg.masking.unit_size}px units"))
