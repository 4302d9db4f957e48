"""RecursiveMix: paste the previous iteration's (already mixed) batch into the current one (SPEC sec. 8).

RecursiveMix, Yang et al., arXiv 2203.06844.

Every iteration keeps its mixed input batch, its soft targets and its (detached) logits. From the
second iteration on, a box of `r*W x r*H` with `r = sqrt(U(0, alpha))` and a uniform centre
(clipped to the image) receives the WHOLE previous batch, resized; so an image holds a shrinking
copy of every earlier batch, recursively. The targets follow the areas,

    lam = 1 - box_area / image_area,   target = lam * y + (1 - lam) * y_prev,

and a consistency term asks the model to recognise the pasted batch where it now sits: the last
feature map is RoI-aligned over the box, classified by the model's own head, and compared with
`softmax(prev_logits)` by soft cross-entropy, weighted `omega * (1 - lam)`.

Use (one call per micro-batch, targets already soft):

    rm = RecursiveMix(alpha=0.5, omega=0.5)
    batch = rm.mix(images, targets)                      # MixedBatch
    logits, roi_logits = model(batch.images, batch.rois)  # (roi_logits None when batch.rois is None)
    loss = soft_cross_entropy(logits, batch.targets) + rm.consistency_loss(roi_logits, batch)
    rm.remember(batch, logits)

or `logits, batch, consistency = rm.step(model, images, targets)` for the middle three lines.
The model must be a `ummae.models.classifier.Classifier` (or a DDP wrapper of one): its forward
takes the RoI boxes, so the RoI head runs inside the module call that DDP watches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["RecursiveMix", "MixedBatch", "soft_cross_entropy", "smooth_one_hot"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of `-sum_k targets_k * log_softmax(logits)_k` (float32)."""
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """`[B]` class indices -> `[B, K]` soft targets: `1 - smoothing + smoothing/K` on the class,
    `smoothing/K` elsewhere (timm's convention)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


@dataclass
class MixedBatch:
    """One iteration's input after RecursiveMix.

    images: `[B, 3, H, W]` the mixed images.
    targets: `[B, K]` fused soft targets.
    lam: fraction of the image area still showing the current batch (1.0: nothing pasted).
    box: `(x1, y1, x2, y2)` pixels (exclusive ends) holding the previous batch, or None.
    prev_logits: `[B, K]` detached logits of the pasted batch (sample i shows previous sample
        `source[i]`), or None.
    """

    images: torch.Tensor
    targets: torch.Tensor
    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None
    prev_logits: torch.Tensor | None = None

    @property
    def rois(self) -> torch.Tensor | None:
        """`[B, 5]` `(batch_index, x1, y1, x2, y2)`: the box in every image, or None."""
        if self.box is None:
            return None
        B = self.images.shape[0]
        rows = torch.tensor(self.box, dtype=torch.float32, device=self.images.device).expand(B, 4)
        index = torch.arange(B, dtype=torch.float32, device=self.images.device).unsqueeze(1)
        return torch.cat([index, rows], dim=1)


class RecursiveMix:
    """The history and the draws of RecursiveMix (one instance per training process).

    Args:
        alpha: box side ratio `r = sqrt(U(0, alpha))`, in (0, 1] (ImageNet 0.5).
        omega: weight of the RoI consistency loss (ImageNet 0.5, CIFAR 0.1; 0 turns it off).
        generator: draws of box sizes and centres (default: a fresh one seeded 0).
    """

    def __init__(self, alpha: float = 0.5, omega: float = 0.5, generator: torch.Generator | None = None):
        if not (math.isfinite(alpha) and 0 < alpha <= 1):
            raise ConfigError(f"--rm-alpha must be in (0, 1], got {alpha}")
        if not (math.isfinite(omega) and omega >= 0):
            raise ConfigError(f"--rm-omega must be >= 0, got {omega}")
        self.alpha = float(alpha)
        self.omega = float(omega)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._images: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the history: the next `mix` returns its inputs unchanged."""
        self._images = self._targets = self._logits = None

    def state_dict(self) -> dict:
        """The history (previous mixed batch, targets, logits) on the CPU, for a checkpoint; {} if none."""
        if self._images is None:
            return {}
        return {"images": self._images.cpu(), "targets": self._targets.cpu(), "logits": self._logits.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the history of `state_dict()` (the next `mix` pastes that batch)."""
        if not state:
            self.reset()
            return
        self._images, self._targets, self._logits = state["images"], state["targets"], state["logits"]

    @property
    def has_history(self) -> bool:
        return self._images is not None

    def draw_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """`(x1, y1, x2, y2)`: side ratio `sqrt(U(0, alpha))`, uniform centre, clipped to the image."""
        r = math.sqrt(torch.rand((), generator=self.generator).item() * self.alpha)
        bw, bh = int(round(r * width)), int(round(r * height))
        cx = int(torch.randint(width, (), generator=self.generator))
        cy = int(torch.randint(height, (), generator=self.generator))
        x1, y1 = cx - bw // 2, cy - bh // 2
        x1c, y1c = min(max(x1, 0), width), min(max(y1, 0), height)
        x2c, y2c = min(max(x1 + bw, 0), width), min(max(y1 + bh, 0), height)
        return x1c, y1c, x2c, y2c

    def mix(self, images: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        """Paste the previous mixed batch (resized) into a box of `images`; fuse the targets.

        Args:
            images: `[B, 3, H, W]`.
            targets: `[B, K]` soft targets of `images` (one-hot, smoothed).

        Returns:
            the `MixedBatch`; the first call (or one after `reset`) returns the inputs unchanged.
            A previous batch of another size is cycled: sample i receives previous sample
            `i mod B_prev`.
        """
        if self._images is None:
            return MixedBatch(images, targets.float())
        B, _, H, W = images.shape
        x1, y1, x2, y2 = self.draw_box(H, W)
        if x2 <= x1 or y2 <= y1:  # an empty box (r ~ 0): nothing to paste
            return MixedBatch(images, targets.float())
        source = torch.arange(B, device=images.device) % self._images.shape[0]
        prev = self._images.to(images.device)[source]
        pasted = F.interpolate(prev.float(), size=(y2 - y1, x2 - x1), mode="bilinear",
                               align_corners=False, antialias=True)
        mixed = images.clone()
        mixed[:, :, y1:y2, x1:x2] = pasted.to(images.dtype)
        lam = 1.0 - (x2 - x1) * (y2 - y1) / (H * W)
        fused = lam * targets.float() + (1.0 - lam) * self._targets.to(targets.device)[source]
        return MixedBatch(mixed, fused, lam, (x1, y1, x2, y2), self._logits.to(images.device)[source])

    def consistency_loss(self, roi_logits: torch.Tensor | None, batch: MixedBatch) -> torch.Tensor:
        """`omega * (1 - lam) * soft_CE(roi_logits, softmax(prev_logits))`; 0 without a pasted box."""
        if batch.box is None or roi_logits is None or self.omega == 0:
            return torch.zeros((), device=batch.images.device)
        soft = F.softmax(batch.prev_logits.float(), dim=-1)
        return self.omega * (1.0 - batch.lam) * soft_cross_entropy(roi_logits, soft)

    def remember(self, batch: MixedBatch, logits: torch.Tensor) -> None:
        """Keep this iteration's mixed images, targets and detached logits for the next one."""
        self._images = batch.images.detach()
        self._targets = batch.targets.detach().float()
        self._logits = logits.detach().float()

    def step(self, model, images: torch.Tensor, targets: torch.Tensor):
        """mix -> one model call (with the RoI boxes) -> consistency -> remember.

        Returns:
            `(logits, batch, consistency_loss)`; the classification loss against `batch.targets`
            is the caller's.
        """
        batch = self.mix(images, targets)
        rois = batch.rois if self.omega > 0 else None
        if rois is None:
            logits, roi_logits = model(batch.images), None
        else:
            logits, roi_logits = model(batch.images, rois)
        consistency = self.consistency_loss(roi_logits, batch)
        self.remember(batch, logits)
        return logits, batch, consistency
