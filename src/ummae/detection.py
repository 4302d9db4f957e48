"""A torchvision detection backbone from an export: `backbone_with_fpn(path)`.

torchvision's detectors (`FasterRCNN`, `MaskRCNN`, ...) take a backbone module with an
`out_channels` attribute whose forward returns an `OrderedDict` of maps; its own
`BackboneWithFPN` expects a network made of named child modules, which timm's feature
extractors are not. This is that wrapper, written once:

    from torchvision.models.detection import MaskRCNN
    from ummae.detection import backbone_with_fpn
    detector = MaskRCNN(backbone_with_fpn("swin_t.safetensors"), num_classes=91)

Any export works (timm's own Swin / Hiera, ummae_swin / ummae_pvt), or a `features_only` model
already built. The maps are made NCHW whatever the body returns (timm's own Swin features are
NHWC; ummae's and Hiera's NCHW).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

__all__ = ["BackboneWithFPN", "backbone_with_fpn"]


class BackboneWithFPN(nn.Module):
    """A timm `features_only` body + torchvision's FPN (+ a max-pooled extra level, "pool"),
    shaped like torchvision's `BackboneWithFPN`: `forward(images) -> OrderedDict` of
    `"0".."k"` and `"pool"`, each `out_channels` wide."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = body
        self.channels = list(body.feature_info.channels())
        # timm's feature wrappers say their layout (`output_fmt`): NHWC for timm's own Swin.
        self.nhwc = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        self.fpn = FeaturePyramidNetwork(self.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # read by torchvision's detectors

    def forward(self, x: torch.Tensor) -> OrderedDict:
        maps = [m.permute(0, 3, 1, 2).contiguous() if self.nhwc else m for m in self.body(x)]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def backbone_with_fpn(source: str | Path | nn.Module, out_channels: int = 256, **kwargs) -> BackboneWithFPN:
    """`BackboneWithFPN` over an export (`NAME.safetensors` with its card; `kwargs` go to
    `timm.create_model`, e.g. `out_indices=(1, 2, 3)`) or over a `features_only` model."""
    if isinstance(source, nn.Module):
        body = source
    else:
        from .export import create_exported

        body = create_exported(source, features_only=True, **kwargs)
    return BackboneWithFPN(body, out_channels)
