"""SimMIM: the full-image, mask-token baseline UM-MAE is compared with (SPEC sec. 5).

SimMIM: a Simple Framework for Masked Image Modeling, Xie et al., CVPR 2022.

The encoder processes the *whole* image: the patch embeddings of masked units are replaced by
the encoder's learnable mask token (the same `mask_token` and `embed` that UM-MAE's secondary
masking uses, so one backbone serves both methods and their encoder weights are interchangeable).
A single linear layer maps every stride-32 feature to the 32x32x3 pixels it covers (a pixel
shuffle), and the loss is L1 on the raw (ImageNet-normalised, not per-unit normalised) pixels of
the masked units. The cost UM-MAE saves is visible here: every token, masked or not, goes
through every encoder block, with Swin's larger full-image window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from ..errors import ConfigError
from ..masking import MaskSample, RandomMasking
from ..objectives import masked_l1_loss, patchify

__all__ = ["SimMIM"]


class SimMIM(nn.Module):
    """SimMIM around a pyramid encoder with `forward_features(imgs, replace)`.

    Args:
        encoder: Swin or PVT (needs `forward_features(x, replace)`, `stride`, `patch_size`,
            `num_features`, `mask_token`).
        img_size: input size (int or `(H, W)`).
        unit: mask unit in pixels (16).
        mask_ratio: fraction of units masked at random (0.75).
    """

    norm_pix_loss = False  # targets are raw pixels (read by the reconstruction picture)

    def __init__(self, encoder: nn.Module, img_size: int | tuple[int, int] = 256, unit: int = 16,
                 mask_ratio: float = 0.75):
        super().__init__()
        H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if H % unit or W % unit or H % encoder.stride or W % encoder.stride:
            raise ConfigError(f"image size {H}x{W} must be divisible by the mask unit {unit} and "
                              f"the encoder stride {encoder.stride}")
        if unit % encoder.patch_size:
            raise ConfigError(f"mask unit {unit} is not a multiple of the patch size {encoder.patch_size}")
        self.img_size = (H, W)
        self.unit = unit
        self.grid_size = (H // unit, W // unit)
        self.masking = RandomMasking(self.grid_size, mask_ratio)
        self.encoder = encoder
        stride = encoder.stride
        # SimMIM's one-layer head: a 1x1 conv (= linear) to stride^2 * 3 values, then pixel shuffle.
        self.decoder = nn.Linear(encoder.num_features, stride * stride * 3)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", set)()}

    def sample_masks(self, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> MaskSample:
        """Random masks (`mask_ratio` of the units) for `batch_size` images."""
        return self.masking(batch_size, generator=generator, device=device)

    def patch_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """`[B, L]` unit mask -> `[B, H/p, W/p]` patch mask (each unit covers (unit/p)^2 patches)."""
        per_unit = self.unit // self.encoder.patch_size
        m = mask.reshape(-1, *self.grid_size)
        return m.repeat_interleave(per_unit, dim=1).repeat_interleave(per_unit, dim=2)

    def forward_encoder(self, imgs: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, H/stride, W/stride, C]`: every token, masked ones as the mask token."""
        return self.encoder.forward_features(imgs, replace=self.patch_mask(masks.mask))

    def forward_decoder(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, h, w, C]` -> `[B, L, unit*unit*3]` predicted pixels per unit."""
        x = self.decoder(features).permute(0, 3, 1, 2)  # [B, s*s*3, h, w]
        image = F.pixel_shuffle(x, self.encoder.stride)  # [B, 3, H, W]
        return patchify(image, self.unit)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 on the raw pixels of the masked units."""
        return masked_l1_loss(pred.float(), patchify(imgs, self.unit).float(), mask)

    def forward(self, imgs: torch.Tensor, masks: MaskSample | None = None,
                generator: torch.Generator | None = None):
        """Same contract as `MaskedAutoencoder.forward`: returns `(loss, pred, masks)`."""
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ConfigError(f"model was built for {self.img_size} images, got {tuple(imgs.shape[-2:])}")
        if masks is None:
            with record_function("masks"):
                masks = self.sample_masks(imgs.shape[0], generator=generator, device=imgs.device)
        with record_function("encoder"):
            features = self.forward_encoder(imgs, masks)
        with record_function("decoder"):
            pred = self.forward_decoder(features)
        with record_function("loss"):
            loss = self.forward_loss(imgs, pred, masks.mask)
        return loss, pred, masks
