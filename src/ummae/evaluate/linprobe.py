"""Linear probing of frozen features (MAE's protocol).

He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022 (appendix A.2).

The head is `BatchNorm1d(affine=False, eps=1e-6)` followed by one linear layer (weights
trunc-normal std 0.01, bias 0). MAE features have very different scales per channel; the
BatchNorm whitens them so that one learning rate suits every channel. Without affine parameters
it is a fixed per-channel scale and shift after training, which folds into the linear layer: the
probe stays linear.

Training follows MAE's recipe with one substitution: SGD with momentum 0.9 and no weight decay,
`lr = blr * batch / 256` (blr 0.1), linear warm-up then half-cosine to 0, stepped per update, 90
epochs. MAE uses LARS, which it needs for its batch of 16384; at the batches one machine runs,
plain SGD is the usual stand-in, and that is what this is.

The encoder is frozen and there is no augmentation, so every epoch would compute the same
features: they are computed once (`features.py`) and the head trains on the cached tensors, which
takes seconds even on a CPU. Accuracies are percentages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.utils import accuracy

from ..engine.optim import build_scheduler, schedule_lengths
from ..errors import ConfigError

__all__ = ["LinearProbeHead", "ProbeResult", "linear_probe"]


class LinearProbeHead(nn.Module):
    """`[B, C]` features -> `[B, num_classes]` logits: BatchNorm without affine, then linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


@dataclass
class ProbeResult:
    """A trained probe and its curve.

    `history` holds one record per epoch: `epoch` (1-based), `lr` (of the epoch's last step), `loss`
    (mean training loss), `top1`, `top5` (validation %, top5 None with fewer than 5 classes).
    `head` is the head after the last epoch, on the CPU in eval mode; `best_top1` / `best_epoch`
    are the highest validation top-1 along the way (what MAE reports).
    """

    head: LinearProbeHead
    history: list[dict] = field(default_factory=list)
    lr: float = 0.0
    batch_size: int = 0

    @property
    def final(self) -> dict:
        return self.history[-1]

    @property
    def best(self) -> dict:
        return max(self.history, key=lambda r: r["top1"])  # the first epoch that reached it

    @property
    def best_top1(self) -> float:
        return self.best["top1"]

    @property
    def best_epoch(self) -> int:
        return self.best["epoch"]


@torch.no_grad()
def _evaluate(head: LinearProbeHead, features: torch.Tensor, labels: torch.Tensor,
              num_classes: int) -> tuple[float, float | None]:
    head.eval()
    logits = head(features)
    if num_classes >= 5:
        top1, top5 = accuracy(logits, labels, topk=(1, 5))
        return float(top1), float(top5)
    return float(accuracy(logits, labels, topk=(1,))[0]), None


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int | None = None, epochs: int = 90,
                 blr: float = 0.1, batch_size: int = 256, warmup_epochs: float = 10,
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 device: str | torch.device | None = None,
                 on_epoch: Callable[[dict], None] | None = None) -> ProbeResult:
    """Train a linear probe on cached features and evaluate it after every epoch.

    Args:
        train_features, train_labels: `[N, C]` features, `[N]` class indices.
        val_features, val_labels: `[Q, C]`, `[Q]`.
        num_classes: default: the largest label + 1.
        epochs: passes over the training features.
        blr: base learning rate; `lr = blr * batch / 256`, `batch = min(batch_size, N)`.
        batch_size: features per step. Incomplete batches are dropped, as MAE does (a batch of
            one would also break the BatchNorm); they are different samples every epoch.
        warmup_epochs: linear warm-up length (clipped so that at least one step follows it).
        momentum, weight_decay: of SGD (MAE: 0.9 and 0).
        seed: the head's initialisation and the shuffling.
        device: where to train (default: where the features are).
        on_epoch: called with each epoch's record as it is made (progress printing).

    Returns:
        a `ProbeResult`.
    """
    n, dim = train_features.shape
    if n < 2:
        raise ConfigError(f"linear probing needs at least 2 training features, got {n}")
    if len(train_labels) != n or len(val_labels) != len(val_features) or len(val_features) == 0:
        raise ConfigError("linear probing needs one label per feature and at least one validation feature")
    if epochs < 1 or batch_size < 2 or not blr > 0:
        raise ConfigError(f"need epochs >= 1, batch size >= 2 and blr > 0, got {epochs}, {batch_size}, {blr}")
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    device = torch.device(device) if device is not None else train_features.device
    train_x, train_y = train_features.float().to(device), train_labels.long().to(device)
    val_x, val_y = val_features.float().to(device), val_labels.long().to(device)

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        head = LinearProbeHead(dim, num_classes)
    head.to(device)
    batch = min(batch_size, n)
    lr = blr * batch / 256
    steps_per_epoch = n // batch
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, epochs, warmup_epochs, None)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, min_lr=0.0)

    generator = torch.Generator().manual_seed(seed)
    result = ProbeResult(head=head, lr=lr, batch_size=batch)
    step = 0
    for epoch in range(1, epochs + 1):
        head.train()
        order = torch.randperm(n, generator=generator).to(device)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            last_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            losses.append(loss.item())
        top1, top5 = _evaluate(head, val_x, val_y, num_classes)
        record = {"epoch": epoch, "lr": last_lr, "loss": sum(losses) / len(losses),
                  "top1": top1, "top5": top5}
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    result.head = head.cpu().eval()
    return result
