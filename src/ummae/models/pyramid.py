"""What the two pyramid backbones (Swin, PVT) share: timm's per-stage feature API and the head.

Each backbone supplies `_full_image_stages(x, stages)`, a generator of the output map
`[B, H_i, W_i, C_i]` of each of the given stages on a full image (the stages differ in what they
carry along: Swin its coordinates and window, PVT its reduction ratios); everything timm's
`features_only` wrapper and classification need is written once here.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices

from ..errors import ConfigError
from .specs import ClassifierLayout

__all__ = ["PyramidBackbone", "GLOBAL_POOLS", "PYRAMID_LAYOUT"]

# Pooling before the head: average (timm's Swin and PVT v2 default), max, or none ("": the head,
# if any, is applied to every position of the `[B, H, W, C]` map).
GLOBAL_POOLS = ("avg", "max", "")


class PyramidBackbone(nn.Module):
    """Base of `SwinTransformer` and `PyramidVisionTransformer` (attributes: `patch_embed`,
    `patch_norm`, `mask_token`, `stages`, `norm`, `head`, `embed_dims`, `patch_size`,
    `num_features`, `stride`).

    Maps stay channel-last between stages, and `forward_features` returns them so: `output_fmt`
    says "NHWC" (as timm's Swin does), so timm's hook-based feature tools and `test_models.py`
    read the channel axis correctly. `forward_intermediates` / `features_only` give NCHW.
    """

    output_fmt = "NHWC"

    def _init_head(self, num_classes: int, global_pool: str) -> None:
        """timm's classifier attributes: `num_classes`, `global_pool`, `head_hidden_size`, `head`."""
        if global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {global_pool!r}")
        if num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        self.global_pool = global_pool
        self.head_hidden_size = self.num_features  # what `forward_head(pre_logits=True)` returns
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """Stage-1 patch embedding, `replace`d patches swapped for the mask token before the norm
        (UM-MAE's secondary masking, SimMIM's masking: the token is normalised like real patches).

        Args:
            x: `[B, 3, H, W]`; sides that are not a multiple of the patch are zero-padded.
            replace: `[B, H/p, W/p]` bool, True = use the mask token, or None.

        Returns:
            `[B, H/p, W/p, C1]`.
        """
        tokens = self.patch_embed(x)  # [B, ceil(H/p), ceil(W/p), C1]: bottom / right zero-padded
        if replace is not None:
            if self.mask_token is None:
                raise ConfigError("this model was built with mask_token=False: it cannot replace patches")
            if replace.shape != tokens.shape[:3]:
                raise ConfigError(f"replace mask of shape {tuple(replace.shape)} does not match the "
                                  f"patch grid {tuple(tokens.shape[:3])}")
            w = replace.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        return self.patch_norm(tokens)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}  # positions are fixed (PVT) or computed (Swin): no parameters

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise tools (stem, then stage by stage, final norm last)."""
        return dict(stem=r"^patch_embed|^patch_norm|^mask_token",
                    blocks=r"^stages\.(\d+)" if coarse else [
                        (r"^stages\.(\d+)\.downsample", (0,)),
                        (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                        (r"^norm", (99999,)),
                    ])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _full_image_stages(self, x: torch.Tensor, stages: Sequence[nn.Module]) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Full image -> the output maps of chosen stages, with timm's contract (its `features_only`
        wrapper calls this).

        Args:
            x: `[B, 3, H, W]`.
            indices: stages to return: None = all, an int n = the last n, a sequence = those
                (negative counts from the end).
            norm: apply the final norm to the last stage's map (the only stage it is sized for).
            stop_early: do not run the stages after the last one asked for.
            output_fmt: "NCHW" (what detection necks take) or "NHWC" (the native layout).
            intermediates_only: return only the maps.

        Returns:
            the maps, stage order, stage i `[B, C_i, H/(p*2^i), W/(p*2^i)]` (NCHW); unless
            `intermediates_only`, as `(final, maps)` with `final` what `forward_features` returns.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        maps = []
        for i, x in enumerate(self._full_image_stages(x, stages)):
            if i in take:
                y = self.norm(x) if norm and i == last else x
                maps.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return maps
        if i == last:
            x = self.norm(x)
        return x, maps

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the chosen stage maps do not need (timm's contract; its `features_only`
        wrapper calls this): later stages, the final norm, the head. Returns the absolute indices."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage only
        if prune_head or prune_end:
            self.head = nn.Identity()
        if prune_end:
            self.num_features = self.embed_dims[max_index]
            self.stride = self.patch_size * 2 ** max_index
        return take

    # -- classification (timm's API) -----------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh linear head for `num_classes` (0: none), on the model's device and dtype;
        `global_pool` None keeps the current pooling."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ConfigError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = int(num_classes)
        ref = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)  # a new module is in training mode; follow the model

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """`[B, H, W, C]` -> pooled `[B, C]` (pre_logits) or logits `[B, num_classes]`; with
        `global_pool=""` the map is kept and the head applied at every position."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        elif self.global_pool == "max":
            x = x.amax(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# classification (`models.classifier`): the layout both pyramids register with their spec

def _feature_map(encoder: PyramidBackbone, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return feats.permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]


def _group_matcher(coarse: bool) -> dict:
    """Stem = layer 0; each block a layer; a stage's patch merging joins its first block (as timm
    counts Swin)."""
    stem = r"^encoder\.(?:patch_embed|patch_norm|mask_token)"
    if coarse:
        return dict(stem=stem, blocks=r"^encoder\.stages\.(\d+)")
    return dict(stem=stem, blocks=[
        (r"^encoder\.stages\.(\d+)\.downsample", (0,)),  # merging joins the stage's first block
        (r"^encoder\.stages\.(\d+)\.blocks\.(\d+)", None),
    ])


def _num_blocks(encoder: PyramidBackbone) -> int:
    return sum(len(stage.blocks) for stage in encoder.stages)


PYRAMID_LAYOUT = ClassifierLayout(feature_map=_feature_map, group_matcher=_group_matcher, num_blocks=_num_blocks)
