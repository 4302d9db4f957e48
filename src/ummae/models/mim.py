"""MAE and UM-MAE: the masked autoencoder around any encoder (SPEC sec. 2-4).

The whole method in five verbs, as in MAE:
    sample_masks     uniform masks (+ secondary masking) or random masks for a batch
    forward_encoder  encoder on the visible units only (pyramids: the compact image)
    forward_decoder  one token per visible unit -> pixels of every unit
    forward_loss     normalised-pixel MSE on the masked units only
    forward          all of the above: returns (loss, pred, masks)

UM-MAE = this model with uniform masking; plain MAE = random masking (ViT only: a windowed or
spatially reduced encoder needs the regular compact grid that only uniform masks give).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.profiler import record_function

from ..errors import ConfigError
from ..masking import MaskSample, RandomMasking, UniformMasking
from ..objectives import masked_mse_loss, pixel_targets
from .decoder import MAEDecoder

__all__ = ["MaskedAutoencoder"]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class MaskedAutoencoder(nn.Module):
    """MAE with uniform (UM-MAE) or random (MAE) masking.

    Args:
        encoder: an encoder with `forward_masked(imgs, masks, unit)`, `stride`, `num_features`,
            `patch_size`; `needs_uniform_mask = True` for encoders that compact (Swin, PVT).
        img_size: pre-training input size (int or `(H, W)`).
        unit: mask unit in pixels (16).
        masking: "uniform" (UM: 75% masked, one visible unit per 2x2 block) or "random".
        mask_ratio: fraction masked by random masking (uniform masking is always 0.75).
        secondary_ratio: uniform masking's fraction of visible units given the secondary token.
        norm_pix_loss: normalise each target unit (mean 0, unit variance) before the MSE.
        decoder_dim, decoder_depth, decoder_heads: the decoder ViT.
        decoder_norm_eps: eps of the decoder's LayerNorms.
    """

    def __init__(self, encoder: nn.Module, img_size: int | tuple[int, int] = 256, unit: int = 16,
                 masking: str = "uniform", mask_ratio: float = 0.75, secondary_ratio: float = 0.25,
                 norm_pix_loss: bool = True, decoder_dim: int = 512, decoder_depth: int = 2,
                 decoder_heads: int = 16, decoder_norm_eps: float = 1e-5):
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
            self.masking = UniformMasking(self.grid_size, secondary_ratio)
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

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", set)()}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    def sample_masks(self, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> MaskSample:
        """Masks for `batch_size` images (uniform with secondary masking, or random)."""
        return self.masking(batch_size, generator=generator, device=device)

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

    def forward(self, imgs: torch.Tensor, masks: MaskSample | None = None,
                generator: torch.Generator | None = None):
        """
        Args:
            imgs: `[B, 3, H, W]` normalised images of the pre-training size.
            masks: masks to use, or None to draw them (with `generator`).

        Returns:
            `(loss, pred [B, L, unit*unit*3], masks)`.
        """
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ConfigError(f"model was built for {self.img_size} images, got {tuple(imgs.shape[-2:])}")
        if masks is None:
            with record_function("masks"):
                masks = self.sample_masks(imgs.shape[0], generator=generator, device=imgs.device)
        with record_function("encoder"):
            features = self.forward_encoder(imgs, masks)
        with record_function("decoder"):
            pred = self.forward_decoder(features, masks)
        with record_function("loss"):
            loss = self.forward_loss(imgs, pred, masks.mask)
        return loss, pred, masks
