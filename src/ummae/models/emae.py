"""EMAE: K disjoint masked parts per image, reconstructed together, with self-consistency
(arXiv 2302.14431, SPEC sec. 7; no official code exists, the choices that are ours are listed
in docs/emae.md).

Every image is split by `DisjointPartsMasking` into K parts whose visible sets are disjoint and
cover the image; each part is an ordinary MAE sample of mask ratio `1 - 1/K`. With uniform parts
(K = 4: each 2x2 block's units dealt to the 4 parts) every part is a valid uniform mask, so the
compacting Swin and PVT encoders run EMAE unchanged.

What EMAE adds to a masked autoencoder is `EMAEMixin`, which changes its verbs:
    sample_masks                       K disjoint parts per image (`PartsSample`)
    forward_encoder / forward_decoder  take a `PartsSample`: the K parts of the B images run as
                                       ONE batch of B*K (image-major: row b*K + k is part k of
                                       image b), no loop over the parts
    forward_loss                       mean of the K parts' normalised-pixel MSE on their masked
                                       units + weight x self-consistency (`objectives`)
and `forward` returns `(loss, pred [B*K, L, D], parts)`. It serves two models:
    EfficientMaskedAutoencoder  = EMAEMixin + `MaskedAutoencoder` (Swin, PVT, ViT; random or
                                  uniform parts)
    HieraEMAE                   = EMAEMixin + `HieraMAE` (timm's Hiera; random parts only: Hiera
                                  has no mask token, so no secondary masking, and drops any set
                                  of mask units itself, so it needs no uniform parts)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..masking import DisjointPartsMasking, MaskSample, PartsSample
from ..objectives import CONSISTENCY_DISTANCES, masked_mse_loss, pixel_targets, self_consistency_loss
from .hiera import HieraMAE
from .mim import MaskedAutoencoder, random_masking_backbones
from .specs import MethodSpec, register_method

__all__ = ["EMAEMixin", "EfficientMaskedAutoencoder", "HieraEMAE"]


def _check_consistency(weight: float, distance: str, start_epoch: float) -> None:
    if distance not in CONSISTENCY_DISTANCES:
        raise ConfigError(f"consistency distance must be one of {', '.join(CONSISTENCY_DISTANCES)}, "
                          f"got {distance!r}")
    if not weight >= 0 or not start_epoch >= 0:
        raise ConfigError(f"consistency weight and start epoch must be >= 0, got {weight} and {start_epoch}")


class EMAEMixin:
    """EMAE's verbs over a masked autoencoder's (put before it in the bases: `super()` is the
    autoencoder, whose `forward_encoder` / `forward_decoder` take one `MaskSample`).

    The host class calls `_setup_emae` after its own `__init__`; it needs `grid_size`, `unit`,
    `norm_pix_loss` and `img_size`, as `MaskedAutoencoder` and `HieraMAE` both have.
    """

    def _setup_emae(self, num_parts: int, uniform: bool, secondary_ratio: float, consistency_weight: float,
                    consistency_distance: str, consistency_start_epoch: float,
                    secondary_rounding: str = "round") -> None:
        self.masking = DisjointPartsMasking(self.grid_size, num_parts, uniform, secondary_ratio, secondary_rounding)
        self.num_parts = self.masking.num_parts
        self.consistency_weight = float(consistency_weight)
        self.consistency_distance = consistency_distance
        self.consistency_start_epoch = float(consistency_start_epoch)
        self.epoch = 0.0  # set by the training loop; a plain attribute, not in the state dict

    def set_epoch(self, epoch: float) -> None:
        """Tell the model the training epoch (for `consistency_start_epoch`)."""
        self.epoch = float(epoch)

    def check_masks(self, imgs: torch.Tensor, masks: PartsSample) -> None:
        if not isinstance(masks, PartsSample) or masks.mask.shape[0] != imgs.shape[0]:
            raise ConfigError("EMAE needs a PartsSample (K disjoint parts) for every image")

    def forward_encoder(self, imgs: torch.Tensor, masks: PartsSample | MaskSample) -> torch.Tensor:
        """Features of every part's visible units, all parts in one batch.

        Args:
            imgs: `[B, 3, H, W]` with a `PartsSample` (each image repeated K times, image-major,
                to meet its flattened parts), or `[B*K, 3, H, W]` with an already flat `MaskSample`.

        Returns:
            the autoencoder's encoder output for the `B*K` part samples.
        """
        if isinstance(masks, PartsSample):
            imgs, masks = imgs.repeat_interleave(masks.num_parts, dim=0), masks.flatten()  # [B*K, 3, H, W]
        return super().forward_encoder(imgs, masks)

    def forward_decoder(self, features: torch.Tensor, masks: PartsSample | MaskSample) -> torch.Tensor:
        """Features of the `B*K` parts -> `[B*K, L, unit*unit*3]` predictions."""
        if isinstance(masks, PartsSample):
            masks = masks.flatten()
        return super().forward_decoder(features, masks)

    def loss_terms(self, imgs: torch.Tensor, pred: torch.Tensor, masks: PartsSample) -> dict[str, torch.Tensor]:
        """`reconstruction` (mean over the K parts of each part's masked-unit MSE) and `consistency`.

        Args:
            imgs: `[B, 3, H, W]`; pred: `[B*K, L, D]` image-major; masks: the `PartsSample`.
        """
        return self._loss_terms(imgs, pred, masks.mask)

    def _loss_terms(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        B, K = mask.shape[:2]
        target = pixel_targets(imgs, self.unit, self.norm_pix_loss)  # [B, L, D], once per image, not per part
        pred = pred.float().reshape(B, K, *pred.shape[1:])  # [B, K, L, D]
        # Every part masks the same number of units, so the masked-unit mean over all B*K parts
        # equals the mean over k of the K per-part losses.
        target = target.float().unsqueeze(1).expand_as(pred)
        return {"reconstruction": masked_mse_loss(pred, target, mask),
                "consistency": self_consistency_loss(pred, mask, self.consistency_distance)}

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """reconstruction + weight x consistency (weight 0 before `consistency_start_epoch`).

        Args:
            mask: `[B, K, L]`, the parts' masks (`PartsSample.mask`)."""
        terms = self._loss_terms(imgs, pred, mask)
        weight = self.consistency_weight if self.epoch >= self.consistency_start_epoch else 0.0
        return terms["reconstruction"] + weight * terms["consistency"]


class EfficientMaskedAutoencoder(EMAEMixin, MaskedAutoencoder):
    """EMAE around any encoder of `MaskedAutoencoder`.

    Args:
        encoder, img_size, unit, norm_pix_loss, decoder_dim, decoder_depth, decoder_heads,
            decoder_norm_eps: as `MaskedAutoencoder`.
        num_parts: K (4 = MAE's 75% mask ratio per part).
        uniform: uniform parts (Swin/PVT need them; K must be 4) or random parts (ViT).
        secondary_ratio: uniform parts: secondary masking of each part's visible units.
        secondary_rounding: how that count is rounded (`masking.secondary_count`).
        consistency_weight: weight of the self-consistency term (0 = off).
        consistency_distance: "l1" or "l2" (see `objectives.self_consistency_loss`).
        consistency_start_epoch: the term counts from this epoch on (`set_epoch`); before, its
            weight is 0 (it is still computed, so the graph and DDP's reduction do not change).
    """

    def __init__(self, encoder: nn.Module, img_size: int | tuple[int, int] = 256, unit: int = 16,
                 num_parts: int = 4, uniform: bool = True, secondary_ratio: float = 0.25,
                 consistency_weight: float = 1.0, consistency_distance: str = "l1",
                 consistency_start_epoch: float = 0.0, norm_pix_loss: bool = True,
                 decoder_dim: int = 512, decoder_depth: int = 2, decoder_heads: int = 16,
                 decoder_norm_eps: float = 1e-5, secondary_rounding: str = "round"):
        _check_consistency(consistency_weight, consistency_distance, consistency_start_epoch)
        # The parent checks sizes, refuses random masks for compacting encoders, freezes the
        # unused secondary token for random parts, and builds the decoder.
        super().__init__(encoder, img_size, unit, masking="uniform" if uniform else "random",
                         mask_ratio=0.75, secondary_ratio=secondary_ratio, norm_pix_loss=norm_pix_loss,
                         decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads,
                         decoder_norm_eps=decoder_norm_eps, secondary_rounding=secondary_rounding)
        self._setup_emae(num_parts, uniform, secondary_ratio, consistency_weight, consistency_distance,
                         consistency_start_epoch, secondary_rounding)

    @classmethod
    def from_config(cls, cfg, encoder: nn.Module, masking: str | None = None) -> "EfficientMaskedAutoencoder":
        """The model of a `PretrainConfig` (its `emae` section decides the parts; `masking` unused)."""
        e, m = cfg.emae, cfg.model
        return cls(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size, num_parts=e.num_parts,
                   uniform=e.parts == "uniform", secondary_ratio=cfg.masking.secondary_ratio,
                   consistency_weight=e.consistency_weight, consistency_distance=e.consistency_distance,
                   consistency_start_epoch=e.consistency_start_epoch, norm_pix_loss=m.norm_pix_loss,
                   decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                   decoder_norm_eps=m.decoder_norm_eps, secondary_rounding=cfg.masking.secondary_rounding)


class HieraEMAE(EMAEMixin, HieraMAE):
    """EMAE around timm's Hiera: K random disjoint parts of the mask-unit grid per image.

    Random parts only: every part is a plain set of visible mask units, which Hiera drops and
    runs as it does MAE's masks (it has no mask token, so uniform parts' secondary masking has
    nothing to act on, and it does not need the uniform layout the compacting encoders do).
    K parts mask `1 - 1/K` of the units each (K = 4: 75%, K = 2: 50%); K must divide the grid.

    Args:
        encoder, img_size, unit, norm_pix_loss, decoder_dim, decoder_depth, decoder_heads: as
            `HieraMAE`.
        num_parts, consistency_weight, consistency_distance, consistency_start_epoch: as
            `EfficientMaskedAutoencoder`.
    """

    def __init__(self, encoder: nn.Module, img_size: int, unit: int = 32, num_parts: int = 4,
                 consistency_weight: float = 1.0, consistency_distance: str = "l1",
                 consistency_start_epoch: float = 0.0, norm_pix_loss: bool = True,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16):
        _check_consistency(consistency_weight, consistency_distance, consistency_start_epoch)
        # The parent checks the encoder and unit and builds fusion and decoder; its RandomMasking
        # is replaced by the parts (the same ratio, 1 - 1/K, per part).
        super().__init__(encoder, img_size, unit, mask_ratio=0.75, norm_pix_loss=norm_pix_loss,
                         decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads)
        self._setup_emae(num_parts, False, 0.0, consistency_weight, consistency_distance,
                         consistency_start_epoch)

    @classmethod
    def from_config(cls, cfg, encoder: nn.Module, masking: str | None = None) -> "HieraEMAE":
        """The model of a `PretrainConfig` (random parts; `masking` unused)."""
        e, m = cfg.emae, cfg.model
        return cls(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size, num_parts=e.num_parts,
                   consistency_weight=e.consistency_weight, consistency_distance=e.consistency_distance,
                   consistency_start_epoch=e.consistency_start_epoch, norm_pix_loss=m.norm_pix_loss,
                   decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads)


# ---------------------------------------------------------------------------------------------
# registration: `method: emae`

# The backbone's autoencoder (`BackboneSpec.autoencoder`) -> EMAE around it.
EMAE_MODELS: dict[type, type] = {MaskedAutoencoder: EfficientMaskedAutoencoder, HieraMAE: HieraEMAE}


def _build(cfg, backbone, encoder: nn.Module) -> nn.Module:
    autoencoder = backbone.autoencoder or MaskedAutoencoder
    if autoencoder not in EMAE_MODELS:
        raise ConfigError(f"method emae has no model around {autoencoder.__name__} (model.arch {backbone.name})")
    return EMAE_MODELS[autoencoder].from_config(cfg, encoder)


def _validate(cfg, backbone) -> None:
    e, arch = cfg.emae, backbone.name
    if e.parts not in ("uniform", "random"):
        raise ConfigError(f"emae.parts must be uniform or random, got {e.parts!r}")
    if e.parts == "uniform" and not backbone.mask_token:
        raise ConfigError(f"emae.parts uniform does not apply to model.arch {arch} ({arch} has no mask token "
                          "for secondary masking and drops any units itself); use emae.parts=random")
    if e.parts == "random" and backbone.needs_uniform_masks:
        raise ConfigError(f"emae.parts random needs model.arch {random_masking_backbones()}: {arch} windows/"
                          "reductions need uniform parts; use emae.parts=uniform")
    if e.num_parts < 2:
        raise ConfigError(f"emae.num_parts must be >= 2, got {e.num_parts}")
    if e.parts == "uniform" and e.num_parts != 4:
        raise ConfigError(f"emae.parts uniform deals each 2x2 block to 4 parts: emae.num_parts must be 4, "
                          f"got {e.num_parts}")
    units = (cfg.data.img_size // max(cfg.masking.unit_size, 1)) ** 2
    if e.parts == "random" and units % e.num_parts:
        raise ConfigError(f"emae.num_parts {e.num_parts} does not divide the {units} mask units of a "
                          f"{cfg.data.img_size} px image with {cfg.masking.unit_size} px units")
    if e.consistency_distance not in ("l1", "l2"):
        raise ConfigError(f"emae.consistency_distance must be l1 or l2, got {e.consistency_distance!r}")
    if not (math.isfinite(e.consistency_weight) and e.consistency_weight >= 0):
        raise ConfigError(f"emae.consistency_weight must be >= 0, got {e.consistency_weight}")
    if not (math.isfinite(e.consistency_start_epoch) and e.consistency_start_epoch >= 0):
        raise ConfigError(f"emae.consistency_start_epoch must be >= 0, got {e.consistency_start_epoch}")


def _describe(cfg) -> str:
    e, k = cfg.emae, cfg.masking
    sm = f" + SM {k.secondary_ratio:g}" if e.parts == "uniform" else ""
    return f"{e.num_parts} disjoint {e.parts} parts{sm} + consistency, {k.unit_size}px units"


register_method(MethodSpec(
    name="emae", build=_build, validate=_validate, uniform_masks=lambda cfg: cfg.emae.parts == "uniform",
    describe_masking=_describe,
    # EMAE counts images (batch, images/s, lr rule); say that each is used K times.
    images_note=lambda cfg: f" images x {cfg.emae.num_parts} parts"))
