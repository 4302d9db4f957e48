"""Image classification on a pre-trained encoder: global average pool + LayerNorm + linear (SPEC sec. 6).

`Classifier` wraps any of the encoders (Swin, PVT, ViT, timm's Hiera) built for full images. Its state
dict keeps the encoder under the same `encoder.` prefix as the pre-training model, so a
fine-tuned checkpoint is also a valid encoder source for every tool that reads pre-training
checkpoints (k-NN, linear probe, export, another fine-tuning).

The classification path is split at the last feature map, because RecursiveMix
(`ummae.engine.recursive_mix`) also classifies RoI-aligned regions of it with the same head:
    forward_feature_map   image -> `[B, C, h, w]` (ViT: patch tokens on their grid, class token dropped)
    forward_head_from_map `[B, C, h, w]` -> pool -> norm -> linear -> `[B, num_classes]`
    forward               both, plus optional RoI logits (one module call, so DDP sees every use)

`group_matcher` gives timm's layer-wise lr decay (`param_groups_layer_decay`) one layer per block:
the stem (patch embedding, its norm, mask token, ViT tokens) is layer 0, block k is layer k,
a pyramid stage's patch merging joins that stage's first block (as timm counts Swin), and the
encoder's final norm, `fc_norm` and `head` form the last layer (lr scale 1).

What differs between backbones (the encoder's output layout, its block names) is the backbone's
`ClassifierLayout`, declared with its spec (`specs.BackboneSpec.classifier`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.hiera import Hiera
from torchvision.ops import roi_align

from ..checkpoint_file import load_checkpoint
from ..config import PretrainConfig, apply_overrides
from ..errors import UmmaeError
from .loading import build_backbone
from .loading import encoder_source as load_source
from .specs import ClassifierLayout, backbone_for

__all__ = ["Classifier", "roi_align_map", "encoder_source", "build_classifier", "load_finetuned"]

# Weights a new classifier never takes from an encoder checkpoint.
HEAD_KEYS = ("fc_norm.", "head.")


def roi_align_map(fmap: torch.Tensor, rois: torch.Tensor, image_size: tuple[int, int],
                  output_size: tuple[int, int] | None = None) -> torch.Tensor:
    """RoI-align boxes given in image pixels on a feature map of that image.

    Args:
        fmap: `[B, C, h, w]` feature map of `[B, 3, H, W]` images.
        rois: `[K, 5]` rows `(batch_index, x1, y1, x2, y2)`, pixel coordinates (`x2`, `y2`
            exclusive, i.e. the box covers pixels `x1 .. x2 - 1`).
        image_size: `(H, W)` of the images.
        output_size: `(oh, ow)` of each aligned region; default the map's own `(h, w)`.

    Returns:
        `[K, C, oh, ow]`.
    """
    H, W = image_size
    h, w = fmap.shape[-2:]
    boxes = rois.to(device=fmap.device, dtype=torch.float32).clone()
    # Pixel -> feature-map coordinates, per axis (the map need not be square).
    boxes[:, 1::2] *= w / W
    boxes[:, 2::2] *= h / H
    # `aligned=True`: continuous coordinates, a box edge at pixel 0 is the map's edge.
    return roi_align(fmap.float(), boxes, output_size=output_size or (h, w), spatial_scale=1.0,
                     sampling_ratio=2, aligned=True).to(fmap.dtype)


class Classifier(nn.Module):
    """An encoder plus global average pool, LayerNorm and a linear head.

    Args:
        encoder: a full-image encoder of a registered backbone (no head of its own:
            `num_classes=0`).
        num_classes: classes of the head.
        layout: how to read the encoder (default: its backbone's, `backbone_for(encoder)`).

    The encoder's mask token is frozen: full images never use it, and a parameter without a
    gradient would stall DDP.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, layout: ClassifierLayout | None = None):
        super().__init__()
        if num_classes < 1:
            raise UmmaeError(f"a classifier needs at least one class, got {num_classes}")
        self.encoder = encoder
        self.num_classes = num_classes
        self.num_features = int(encoder.num_features)
        self.layout = layout or backbone_for(encoder).classifier
        self.is_hiera = isinstance(encoder, Hiera)  # kept for callers that report it
        self.fc_norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)  # a near-zero head, as MAE's fine-tuning
        nn.init.zeros_(self.head.bias)
        if getattr(encoder, "mask_token", None) is not None:
            encoder.mask_token.requires_grad_(False)

    # -- the timm model API -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in getattr(self.encoder, "no_weight_decay", set)()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes over parameter names -> layer ordinals (timm's convention, see module docstring).

        Names that match nothing (encoder's final norm, `fc_norm`, `head`) go to the last layer.
        """
        return self.layout.group_matcher(coarse)

    @property
    def num_blocks(self) -> int:
        """Transformer blocks of the encoder (the layers of layer-wise lr decay, stem and head aside)."""
        return self.layout.num_blocks(self.encoder)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    # -- forward ------------------------------------------------------------------------------
    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> last feature map `[B, C, h, w]` (encoder's final norm applied)."""
        return self.layout.feature_map(self.encoder, self.encoder.forward_features(x), x)

    def forward_head_from_map(self, fmap: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """`[B, C, h, w]` -> global average pool -> LayerNorm -> linear -> `[B, num_classes]`."""
        x = self.fc_norm(fmap.mean(dim=(2, 3)))  # [B, C]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, rois: torch.Tensor | None = None):
        """
        Args:
            x: `[B, 3, H, W]` images.
            rois: optional `[K, 5]` boxes `(batch_index, x1, y1, x2, y2)` in pixels.

        Returns:
            logits `[B, num_classes]`; with `rois`, `(logits, roi_logits [K, num_classes])`: the same
            head on the RoI-aligned regions of the last feature map.
        """
        fmap = self.forward_feature_map(x)
        logits = self.forward_head_from_map(fmap)
        if rois is None:
            return logits
        regions = roi_align_map(fmap, rois, (x.shape[-2], x.shape[-1]))
        return logits, self.forward_head_from_map(regions)


# ---------------------------------------------------------------------------------------------
# from a checkpoint

def encoder_source(path: str | Path) -> tuple[PretrainConfig, dict[str, torch.Tensor]]:
    """`(configuration, encoder weights without prefix)` of an encoder checkpoint: what `ummae
    pretrain` or `ummae finetune` writes (the encoder under `encoder.`), or an `ummae export`
    `.safetensors` file with its card (see `loading.encoder_source`)."""
    path = Path(path)
    if not path.is_file():
        raise UmmaeError(f"--checkpoint '{path}' does not exist")
    return load_source(path)


def build_classifier(cfg: PretrainConfig, weights: dict[str, torch.Tensor] | None, num_classes: int,
                     drop_path_rate: float | None = None,
                     img_size: int | None = None) -> tuple[Classifier, list[str]]:
    """The full-image classifier of a pre-training configuration, loaded with encoder `weights`.

    Args:
        cfg: the encoder's pre-training configuration (architecture, sizes).
        weights: encoder state dict (no prefix), or None for a randomly initialised model.
        num_classes: classes of the new head.
        drop_path_rate: stochastic depth (default: the configuration's).
        img_size: fine-tuning input size (default: the pre-training size).

    Returns:
        `(classifier, keys left at their initial values)`: the head and `fc_norm`, plus a ViT
        position table when the size changed (a fixed sin-cos table, rebuilt for the new grid).
        Any other key that does not fit raises `UmmaeError`.
    """
    encoder = build_backbone(cfg, 0, drop_path_rate, img_size)
    model = Classifier(encoder, num_classes)
    if weights is None:
        return model, sorted(model.state_dict())
    own = model.state_dict()
    loadable, rebuilt = {}, []
    for key, value in weights.items():
        name = f"encoder.{key}"
        if name in own and own[name].shape != value.shape:
            if key == "pos_embed" and model.layout.fixed_pos_embed:  # a fixed table of another grid
                rebuilt.append(name)
                continue
            raise UmmaeError(f"encoder weight '{key}' has shape {tuple(value.shape)}, the rebuilt "
                             f"model expects {tuple(own[name].shape)}")
        loadable[name] = value
    result = model.load_state_dict(loadable, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_KEYS) and k not in rebuilt]
    if missing or result.unexpected_keys:
        raise UmmaeError(f"encoder weights do not fit the rebuilt model (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    return model, sorted(result.missing_keys)


def load_finetuned(path: str | Path) -> tuple[Classifier, list[str]]:
    """`(classifier in eval mode, class names)` of an `ummae finetune` checkpoint (best.pt / last.pt)."""
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or "classes" not in state:
        raise UmmaeError(f"'{path}' is not an `ummae finetune` checkpoint (no classes)")
    cfg = apply_overrides(PretrainConfig(), dict(state["config"]), f"checkpoint '{path}'")
    classes = [str(c) for c in state["classes"]]
    model = Classifier(build_backbone(cfg, 0, 0.0), len(classes))
    model.load_state_dict(state["model"])
    return model.eval(), classes
