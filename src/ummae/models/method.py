"""What every pre-training model answers: MAE's five verbs, one signature for all methods.

    sample_masks     masks for a batch (the model's `masking` draws them: `MaskSample`, `PartsSample`)
    forward_encoder  (imgs, masks) -> features of what the encoder sees
    forward_decoder  (features, masks) -> pred, the pixels of every unit
    forward_loss     (imgs, pred, masks.mask) -> loss
    set_epoch        the training epoch, for objectives that change with it (a no-op by default)
    forward          all of the above: `(loss, pred, masks)`

A method's model (`mim.MaskedAutoencoder`, `simmim.SimMIM`, `hiera.HieraMAE`, `emae.*`) subclasses
`MaskedImageModel`, sets `masking`, `grid_size`, `unit`, `img_size`, `norm_pix_loss` and writes
the three middle verbs; the training loop, the benchmark and the pictures use nothing else.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.profiler import record_function

from ..errors import ConfigError

__all__ = ["MaskedImageModel"]


class MaskedImageModel(nn.Module):
    """The protocol of a pre-training model, and the `forward` that runs it."""

    masking = None  # draws the masks: `masking(B, generator, device)`; `masking.sample_type.from_batch`
    grid_size: tuple[int, int]  # the mask-unit grid
    unit: int  # mask unit in pixels
    img_size: tuple[int, int]  # the pre-training input size
    norm_pix_loss: bool  # targets normalised per unit (read by the reconstruction picture)

    def set_epoch(self, epoch: float) -> None:
        """Tell the model the training epoch (called by the training loop every epoch)."""

    def sample_masks(self, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None):
        """Masks for `batch_size` images, drawn by `self.masking`."""
        return self.masking(batch_size, generator=generator, device=device)

    def check_masks(self, imgs: torch.Tensor, masks) -> None:
        """Raise `ConfigError` if `masks` cannot go with `imgs` (nothing to check by default)."""

    def forward_encoder(self, imgs: torch.Tensor, masks) -> torch.Tensor:
        raise NotImplementedError

    def forward_decoder(self, features: torch.Tensor, masks) -> torch.Tensor:
        raise NotImplementedError

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, imgs: torch.Tensor, masks=None, generator: torch.Generator | None = None):
        """
        Args:
            imgs: `[B, 3, H, W]` normalised images of the pre-training size.
            masks: masks to use (`sample_masks`' type), or None to draw them (with `generator`).

        Returns:
            `(loss, pred [B, L, unit*unit*3] (EMAE: [B*K, ...]), masks)`.
        """
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ConfigError(f"model was built for {self.img_size} images, got {tuple(imgs.shape[-2:])}")
        if masks is None:
            with record_function("masks"):
                masks = self.sample_masks(imgs.shape[0], generator=generator, device=imgs.device)
        self.check_masks(imgs, masks)
        with record_function("encoder"):
            features = self.forward_encoder(imgs, masks)
        with record_function("decoder"):
            pred = self.forward_decoder(features, masks)
        with record_function("loss"):
            loss = self.forward_loss(imgs, pred, masks.mask)
        return loss, pred, masks
