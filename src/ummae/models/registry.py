"""UM-MAE backbones in timm's model registry: `ummae_swin`, `ummae_pvt`, `ummae_vit`.

Each name is a generic constructor: the architecture comes from keyword arguments (defaults:
Swin-T with the full-image window 16, PVT-S, ViT-B/16 at 224 px), so one name serves every size.
`ummae export` writes the arguments of a checkpoint's backbone next to its weights, and then

    import ummae, timm
    model = timm.create_model("ummae_swin", pretrained=True,
                              pretrained_cfg_overlay=dict(file="swin.safetensors"), **model_args)

rebuilds it with strict key matching (`ummae.export.create_exported` reads the JSON for you).
`features_only=True` gives the per-stage maps, NCHW: strides 4, 8, 16, 32 for Swin and PVT, the
last three blocks for ViT (timm's ViT default); `out_indices` picks others.

There are no hosted weights: `pretrained=True` without a `file` (or `state_dict`) overlay is an
error, never a download.

A model built here sees full images only (classification, detection, segmentation): it leaves
out the mask token (`mask_token=True` keeps it; the filter drops it from weight files), so every
parameter gets a gradient and DDP needs no `find_unused_parameters`; the ViT also trains its
position table, as MAE's fine-tuning does. Swin and PVT take any input size and have timm's
classifier API; `feature_cfg=dict(feature_cls="fx")` gives FX-traced feature extractors. timm's own
model tests run on these three names with `scripts/timm_model_tests.py`.

`import ummae` registers these names (when timm is imported, not before: see `ummae/__init__.py`).
The model classes are imported when a model is built, so registering costs nothing more than timm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet

__all__ = ["ummae_swin", "ummae_pvt", "ummae_vit", "checkpoint_filter_fn", "BackboneFeatures"]

# Which of these names a configuration exports to, its backbone's spec says (`BackboneSpec.timm_model`).


def _cfg(**kwargs) -> dict:
    # No url / hf_hub_id: weights only ever come from a local file or an in-memory state dict.
    # num_classes 0: an exported encoder has no head, so the default build loads it strictly.
    cfg = dict(num_classes=0, input_size=(3, 256, 256), pool_size=None, crop_pct=1.0,
               interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN,
               std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
               paper_ids="arXiv:2205.10063")
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({
    # Any input size runs (padding inside; see the model docstrings): 256 is the paper's
    # fine-tuning size, and pool_size is the final map there (stride 32).
    "ummae_swin": _cfg(pool_size=(8, 8)),
    "ummae_pvt": _cfg(pool_size=(8, 8)),
    "ummae_vit": _cfg(input_size=(3, 224, 224), fixed_input_size=True),  # its position table fixes the size
})


def _is_vit_sincos_table(pos: torch.Tensor) -> bool:
    """Whether `[1, 1+N, C]` is MAE's fixed table: zero class row + 2-D sin-cos of a square grid."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    side = math.isqrt(pos.shape[1] - 1)
    if pos.ndim != 3 or side * side != pos.shape[1] - 1 or pos.shape[2] % 4:
        return False
    table = build_sincos2d_pos_embed([side, side], pos.shape[2])
    return bool(pos[0, 0].abs().max() == 0) and torch.allclose(pos[0, 1:].float(), table, atol=1e-5)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a weight file to `model` before the (strict) load.

    - An `ummae pretrain` checkpoint's model dict: keep its encoder (`encoder.` prefix removed).
    - ViT at another input size: MAE's position table is a fixed sin-cos function of the patch
      grid, so the model's own table (built for its `img_size`) is the exact answer; a learned
      table is resampled as timm does.
    - A model built without the mask token (the default through timm) drops it.
    Swin and PVT have no weight that depends on the input size.
    """
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if getattr(model, "mask_token", None) is None:
        state_dict = {k: v for k, v in state_dict.items() if k != "mask_token"}
    pos, target = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    if isinstance(pos, torch.Tensor) and isinstance(target, torch.Tensor) and pos.shape != target.shape:
        if _is_vit_sincos_table(pos):
            pos = target.detach().clone()
        else:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                         num_prefix_tokens=model.num_prefix_tokens)
        state_dict = dict(state_dict, pos_embed=pos)
    return state_dict


def _fit_weights_hook(module, state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook of a timm-built ummae model: fit any weight file to it first,
    as the pretrained path's filter does, so `timm.create_model(..., checkpoint_path=FILE)`
    (timm's `train.py --initial-checkpoint`, mmpretrain's `TIMMBackbone`), which loads with no
    filter, takes an export or a pre-training checkpoint too: `encoder.` prefix removed, a
    mask token the model does not have dropped (see `checkpoint_filter_fn`). Only for a load
    into the model itself (`prefix` ""), never when it is a submodule of a larger model."""
    if prefix:
        return
    fitted = checkpoint_filter_fn(dict(state_dict), module)
    state_dict.clear()
    state_dict.update(fitted)


def _prefixed(pattern, add: str):
    """A `group_matcher` value with every `^name` anchor moved under the submodule `add`."""
    if isinstance(pattern, str):
        return pattern.replace("^", "^" + add.replace(".", r"\."))
    return [(_prefixed(p, add), order) for p, order in pattern]


class BackboneFeatures(FeatureGetterNet):
    """timm's `features_only` wrapper of ummae's backbones (its `FeatureGetterNet`, which calls
    `forward_intermediates` and prunes what the maps do not need), plus what a detector's
    training code asks of a backbone:

    - `load_state_dict` of the backbone's own files: an export, a pre-training checkpoint, or
      the wrapper's own state dict; the first two gain the wrapper's `model.` prefix, and keys
      of pruned parts (later stages, final norm, head, mask token) are dropped. This is what
      `timm.create_model(..., features_only=True, checkpoint_path=FILE)` does.
    - `group_matcher` (the backbone's, under `model.`): timm's layer-wise lr decay
      (`param_groups_layer_decay`) groups the stages instead of putting everything in one group.
    - `set_grad_checkpointing`: the backbone's.
    """

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.register_load_state_dict_pre_hook(self._fit_weights)

    def _fit_weights(self, module, state_dict, prefix, *args) -> None:
        if prefix or any(k.startswith("model.") for k in state_dict):
            return  # a load inside a larger model, or the wrapper's own keys
        fitted = checkpoint_filter_fn(dict(state_dict), self.model)
        own = set(self.model.state_dict())
        state_dict.clear()
        state_dict.update({"model." + k: v for k, v in fitted.items() if k in own})

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {name: _prefixed(p, "model.") for name, p in self.model.group_matcher(coarse).items()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def _create(model_cls, variant: str, pretrained: bool, default_out_indices, **kwargs) -> nn.Module:
    out_indices = kwargs.pop("out_indices", default_out_indices)
    feature_cfg = dict(feature_cls=BackboneFeatures, out_indices=out_indices)
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})  # e.g. feature_cls="fx"
    # A timm-built model sees full images only (classification, detection): without the mask
    # token every parameter gets a gradient, which DistributedDataParallel needs unless
    # `find_unused_parameters=True`. Pass `mask_token=True` to keep it (masked pre-training).
    kwargs.setdefault("mask_token", False)
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg, **kwargs)
    if isinstance(model, model_cls):  # the plain model (a features_only wrapper has its own hook)
        model.register_load_state_dict_pre_hook(_fit_weights_hook)
    return model


@register_model
def ummae_swin(pretrained: bool = False, **kwargs) -> nn.Module:
    """Swin with UM-MAE's coordinate-MLP position bias (`ummae.models.swin`); Swin-T sizes and the
    full-image window 16 by default. The window can be set freely: no weight depends on it."""
    from .swin import SwinTransformer

    model_args = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      window_size=16, mlp_ratio=4.0, pos_hidden_dim=32)
    model_args.update(kwargs)
    return _create(SwinTransformer, "ummae_swin", pretrained,
                   tuple(range(len(model_args["depths"]))), **model_args)


@register_model
def ummae_pvt(pretrained: bool = False, **kwargs) -> nn.Module:
    """PVT v1 with sin-cos positions and pooling spatial reduction (`ummae.models.pvt`); PVT-S
    sizes and full-image reduction ratios 8-4-2-1 by default."""
    from .pvt import PyramidVisionTransformer

    model_args = dict(patch_size=4, embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3),
                      num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
    model_args.update(kwargs)
    return _create(PyramidVisionTransformer, "ummae_pvt", pretrained,
                   tuple(range(len(model_args["depths"]))), **model_args)


@register_model
def ummae_vit(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ViT with MAE's fixed sin-cos positions and a mask token (`ummae.models.vit`); ViT-B/16
    at 224 px by default. Its keys are timm's plus `mask_token`."""
    from .vit import VisionTransformer

    # Trained position table: what MAE's fine-tuning does (a timm-built model sees full images only).
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                      train_pos_embed=True)
    model_args.update(kwargs)
    # timm's ViT default: the last 3 blocks (fewer in a shallower model).
    return _create(VisionTransformer, "ummae_vit", pretrained, min(3, model_args["depth"]), **model_args)
