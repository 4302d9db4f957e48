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

from ..errors import ConfigError
from ..masking import MaskSample, RandomMasking
from ..objectives import masked_l1_loss, patchify
from .method import MaskedImageModel
from .specs import MethodSpec, backbone_names, backbone_spec, register_method

__all__ = ["SimMIM"]


class SimMIM(MaskedImageModel):
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

    @classmethod
    def from_config(cls, cfg, encoder: nn.Module) -> "SimMIM":
        """The model of a `PretrainConfig` around `encoder`."""
        return cls(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size,
                   mask_ratio=cfg.masking.mask_ratio)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", set)()}

    def patch_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """`[B, L]` unit mask -> `[B, H/p, W/p]` patch mask (each unit covers (unit/p)^2 patches)."""
        per_unit = self.unit // self.encoder.patch_size
        m = mask.reshape(-1, *self.grid_size)
        return m.repeat_interleave(per_unit, dim=1).repeat_interleave(per_unit, dim=2)

    def forward_encoder(self, imgs: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, H/stride, W/stride, C]`: every token, masked ones as the mask token."""
        return self.encoder.forward_features(imgs, replace=self.patch_mask(masks.mask))

    def forward_decoder(self, features: torch.Tensor, masks: MaskSample | None = None) -> torch.Tensor:
        """`[B, h, w, C]` -> `[B, L, unit*unit*3]` predicted pixels per unit (of every unit: the
        head needs no masks)."""
        x = self.decoder(features).permute(0, 3, 1, 2)  # [B, s*s*3, h, w]
        image = F.pixel_shuffle(x, self.encoder.stride)  # [B, 3, H, W]
        return patchify(image, self.unit)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 on the raw pixels of the masked units."""
        return masked_l1_loss(pred.float(), patchify(imgs, self.unit).float(), mask)


def _validate(cfg, backbone) -> None:
    if not backbone.masked_feature_map:
        able = " and ".join(n for n in backbone_names() if backbone_spec(n).masked_feature_map)
        other = "ummae" if backbone.needs_uniform_masks else "mae"
        raise ConfigError(f"method simmim is implemented for model.arch {able}, not {backbone.name} "
                          f"(pre-train it with method {other})")


register_method(MethodSpec(
    name="simmim", build=lambda cfg, backbone, encoder: SimMIM.from_config(cfg, encoder), validate=_validate,
    uniform_masks=lambda cfg: False,
    describe_masking=lambda cfg: (f"random {cfg.masking.mask_ratio:.0%} -> mask tokens, "
                                  f"{cfg.masking.unit_size}px units")))
