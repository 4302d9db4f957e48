"""UM-MAE: the masked autoencoder around a pyramid encoder (SPEC sec. 2-4).

The whole method in five verbs, as in MAE:
    sample_masks     uniform masks (+ secondary masking) for a batch
    forward_encoder  encoder on the compact image of the visible units
    forward_decoder  one token per visible unit -> pixels of every unit
    forward_loss     normalised-pixel MSE on the masked units only
    forward          all of the above: returns (loss, pred, masks)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..masking import MaskSample, UniformMasking
from ..objectives import masked_mse_loss, normalize_targets, patchify
from .decoder import MAEDecoder

__all__ = ["UMMAE"]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class UMMAE(nn.Module):
    """Uniform-Masking MAE for an encoder with `forward_compact` (Swin; PVT later).

    Args:
        encoder: pyramid encoder with `forward_compact(imgs, masks, unit)`, `stride`,
            `num_features`, `patch_size`.
        img_size: pre-training input size (int or `(H, W)`).
        unit: mask unit in pixels (16).
        secondary_ratio: fraction of visible units given the secondary mask token (0.25).
        norm_pix_loss: normalise each target unit (mean 0, unit variance) before the MSE.
        decoder_dim, decoder_depth, decoder_heads: the decoder ViT.
    """

    def __init__(self, encoder: nn.Module, img_size: int | tuple[int, int] = 256, unit: int = 16,
                 secondary_ratio: float = 0.25, norm_pix_loss: bool = True, decoder_dim: int = 512,
                 decoder_depth: int = 2, decoder_heads: int = 16):
        super().__init__()
        H, W = _pair(img_size)
        if H % unit or W % unit:
            raise ConfigError(f"image size {H}x{W} is not divisible by the mask unit {unit}")
        if unit % encoder.patch_size:
            raise ConfigError(f"mask unit {unit} is not a multiple of the patch size {encoder.patch_size}")
        # The compact image is H/2 x W/2; the encoder must reduce it to whole tokens, and one final
        # token must span a whole number of units so the pixel shuffle lands on unit boundaries.
        if (H // 2) % encoder.stride or (W // 2) % encoder.stride or encoder.stride % unit:
            raise ConfigError(
                f"image size {H}x{W} with mask unit {unit} does not fit an encoder of stride "
                f"{encoder.stride}: need H/2 and W/2 divisible by {encoder.stride} and the stride "
                f"a multiple of the unit")
        self.img_size = (H, W)
        self.unit = unit
        self.grid_size = (H // unit, W // unit)
        self.norm_pix_loss = norm_pix_loss
        self.masking = UniformMasking(self.grid_size, secondary_ratio)
        self.encoder = encoder
        self.decoder = MAEDecoder(self.grid_size, unit, encoder.num_features,
                                  upsample=encoder.stride // unit, decoder_dim=decoder_dim,
                                  depth=decoder_depth, num_heads=decoder_heads)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", set)()}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    def sample_masks(self, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> MaskSample:
        """Uniform masks with secondary masking for `batch_size` images."""
        return self.masking(batch_size, generator=generator, device=device)

    def forward_encoder(self, imgs: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, H/2/stride, W/2/stride, C]` features of the visible units."""
        return self.encoder.forward_compact(imgs, masks, self.unit)

    def forward_decoder(self, features: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """Features -> `[B, L, unit*unit*3]` predicted pixels of every unit."""
        return self.decoder(features, masks.ids_keep)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over masked units (`mask` `[B, L]`, True = masked); secondary units do not count."""
        target = patchify(imgs, self.unit)
        if self.norm_pix_loss:
            target = normalize_targets(target)
        return masked_mse_loss(pred.float(), target.float(), mask)

    def forward(self, imgs: torch.Tensor, masks: MaskSample | None = None,
                generator: torch.Generator | None = None):
        """
        Args:
            imgs: `[B, 3, H, W]` normalised images of the pre-training size.
            masks: uniform masks to use, or None to draw them (with `generator`).

        Returns:
            `(loss, pred [B, L, unit*unit*3], masks)`.
        """
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ConfigError(f"model was built for {self.img_size} images, got {tuple(imgs.shape[-2:])}")
        if masks is None:
            masks = self.sample_masks(imgs.shape[0], generator=generator, device=imgs.device)
        features = self.forward_encoder(imgs, masks)
        pred = self.forward_decoder(features, masks)
        loss = self.forward_loss(imgs, pred, masks.mask)
        return loss, pred, masks
