"""Which backbone, which method: one declaration each, made in its own file, asked by everyone else.

A backbone file (`swin.py`, `pvt.py`, `vit.py`, `hiera.py`) ends with `register_backbone(
BackboneSpec(...))`; a method file (`mim.py`: MAE and UM-MAE, `simmim.py`, `emae.py`) with
`register_method(MethodSpec(...))`. Configuration checks, model building, export, loading, the
classifier, the fine-tuning recipe, the engine and the profiler look the spec up by its name
(`model.arch`, `method`) and ask it; none of them tests a name. A new backbone or method is one
file that registers itself (importing it is enough: `tests/test_extending.py` does it in a test).

    spec = backbone_spec(cfg.model.arch)
    encoder = spec.build(cfg)                       # the encoder for masked pre-training
    model = method_spec(cfg.method).build(cfg, spec, encoder)

This module holds the two registries and the few functions built on them; it imports no model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from ..checkpoint_file import load_checkpoint
from ..config import ModelConfig, PretrainConfig, register_model_options, validate
from ..errors import ConfigError

__all__ = ["BackboneSpec", "MethodSpec", "ClassifierLayout", "register_backbone", "register_method",
           "backbone_spec", "method_spec", "backbone_for", "backbone_names", "method_names", "check_config",
           "ignored_overrides", "build_encoder", "build_pretrain_model", "full_image_config",
           "uses_uniform_masks", "non_default_options", "read_checkpoint_weights"]


def _no_checks(cfg: PretrainConfig) -> None:
    return None


def _doubling_widths(m) -> list[int]:
    return [m.embed_dim * 2 ** i for i in range(len(m.depths))]


def _same_config(cfg: PretrainConfig, compact: bool) -> PretrainConfig:
    return cfg


def non_default_options(m, *keys: str) -> dict[str, Any]:
    """The model options among `keys` that differ from their defaults (e.g. those of a converted
    official checkpoint): what an export card records beyond the sizes."""
    default = ModelConfig()
    return {k: getattr(m, k) for k in keys if getattr(m, k) != getattr(default, k)}


def read_checkpoint_weights(path: str, cfg: PretrainConfig) -> dict:
    """`--init-weights` of most backbones: an ummae checkpoint (`{"model": state dict, ...}`)."""
    return load_checkpoint(path)


@dataclass(frozen=True)
class ClassifierLayout:
    """How `models.classifier.Classifier` reads a full-image encoder.

    feature_map: `(encoder, forward_features output, images [B, 3, H, W])` -> `[B, C, h, w]`.
    group_matcher: `coarse` -> timm's `{"stem": regex, "blocks": ...}` over `encoder.` names
        (layer-wise lr decay: stem = layer 0, block k = layer k).
    num_blocks: encoder -> its transformer blocks (the layers of layer decay).
    fixed_pos_embed: a `pos_embed` of another grid is a fixed table rebuilt for the new size, not
        an error (ViT).
    """

    feature_map: Callable
    group_matcher: Callable[[bool], dict]
    num_blocks: Callable
    fixed_pos_embed: bool = False


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone family (`model.arch`): what the rest of ummae needs to know about it.

    Required:
        name: its `model.arch`.
        encoder_class: the encoder's class (the classifier finds the spec of an encoder by it).
        build: `cfg -> encoder` for masked pre-training (its sizes from `cfg.model`, input size
            `cfg.data.img_size`); `full_image_config` first makes it the full-image one.
        classifier: its `ClassifierLayout`.

    Optional (the default in brackets):
        validate: `cfg -> None`, raise `ConfigError` naming the key of a bad model value [none].
        stage_widths: `ModelConfig -> [channels of every stage]` [embed_dim doubling per stage].
        needs_uniform_masks: the encoder packs the visible units into a compact image and needs
            uniform masks (one visible unit per 2x2 block) [False].
        mask_token: the encoder can replace a visible unit's embedding by a learnable token
            (UM-MAE's secondary masking) [True].
        masked_feature_map: `forward_features(imgs, replace=patch_mask)` runs the whole image,
            masked patches replaced by the mask token, to a `[B, h, w, C]` map (SimMIM) [False].
        autoencoder: the MAE model class around it [None: `mim.MaskedAutoencoder`].
        full_image: `(cfg, compact) -> cfg` for full images, `compact` when the method trained on
            the compact grid of uniform masks (Swin doubles its window) [unchanged].
        timm_model: full-image `cfg -> (timm model name, create_model kwargs)` for `ummae export`
            [None: no export].
        timm_native: `(full-image backbone, full-image cfg, img_size) -> (timm name, kwargs,
            state dict, ummae-only tensors)` when the backbone can be exported as one of timm's
            own models under other keys (Swin: its coordinate MLPs evaluated as timm's tables),
            or a one-line reason why this configuration cannot (the export then falls back to
            `timm_model`) [None: `timm_model` is the export].
        from_timm_native: `(state dict, ummae-only tensors) -> the backbone's own weights`: the
            inverse, so ummae fine-tunes from such an export [None].
        finetune_defaults: `ModelConfig -> {"layer_decay": ..., "drop_path": ...}`
            [0.85 and 0.1].
        read_init_weights: `(path, cfg) -> state` for `pretrain --init-weights`: a checkpoint
            dict with `model`, or the backbone's own weights for `load_backbone_weights`
            [an ummae checkpoint].
        load_backbone_weights: `(model, weights, source)`: load a backbone's own weights (a state
            dict without `model`) into a pre-training model [None].
        profile_blocks: `(label prefix, block class)`: `ummae bench --profile` labels those
            blocks' attention / MLP / norms itself (code without labels of its own) [None].
        ignored_keys: `{dotted key: why}` of `model` keys it does not read: an explicit override
            of one gets a warning saying why [none].
        options: `{name: default}` of extra `model.NAME` options this backbone adds to the
            configuration (read with `cfg.model.option(NAME)`; see `config.ModelConfig.options`)
            [none].
    """

    name: str
    encoder_class: type
    build: Callable
    classifier: ClassifierLayout
    validate: Callable = _no_checks
    stage_widths: Callable = _doubling_widths
    needs_uniform_masks: bool = False
    mask_token: bool = True
    masked_feature_map: bool = False
    autoencoder: type | None = None
    full_image: Callable = _same_config
    timm_model: Callable | None = None
    timm_native: Callable | None = None
    from_timm_native: Callable | None = None
    finetune_defaults: Callable = lambda m: {"layer_decay": 0.85, "drop_path": 0.1}
    read_init_weights: Callable = read_checkpoint_weights
    load_backbone_weights: Callable | None = None
    profile_blocks: tuple[str, type] | None = None
    ignored_keys: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A pre-training method (`method`).

    name: its `method`.
    build: `(cfg, backbone spec, encoder) -> model`; the model answers `masks.MaskedImageModel`'s
        protocol (`sample_masks`, `forward_encoder`, `forward_decoder`, `forward_loss`,
        `set_epoch`, `forward`; `masking`, `grid_size`, `unit`, `norm_pix_loss`).
    validate: `(cfg, backbone spec) -> None`: its own values and whether it runs on that backbone.
    uniform_masks: `cfg -> bool`: its masks are uniform (the encoder sees the compact grid).
    describe_masking: `cfg -> str`, the masking column of `ummae presets`.
    images_note: `cfg -> str` after "effective batch N" in the run summary (EMAE: " images x 4 parts").
    ignored_keys: `cfg -> {dotted key: why}` of keys it does not read (warned when set explicitly).
    """

    name: str
    build: Callable
    validate: Callable
    uniform_masks: Callable[[PretrainConfig], bool]
    describe_masking: Callable[[PretrainConfig], str]
    images_note: Callable[[PretrainConfig], str] = lambda cfg: ""
    ignored_keys: Callable[[PretrainConfig], dict] = lambda cfg: {}


_BACKBONES: dict[str, BackboneSpec] = {}
_METHODS: dict[str, MethodSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Make `spec` the backbone `model.arch: <spec.name>` (a name registered twice is an error)."""
    if spec.name in _BACKBONES and _BACKBONES[spec.name] is not spec:
        raise ValueError(f"backbone {spec.name!r} is registered already")
    register_model_options(spec.name, spec.options)
    _BACKBONES[spec.name] = spec
    return spec


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make `spec` the method `method: <spec.name>`."""
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered already")
    _METHODS[spec.name] = spec
    return spec


def backbone_names() -> list[str]:
    return list(_BACKBONES)


def method_names() -> list[str]:
    return list(_METHODS)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in _BACKBONES:
        raise ConfigError(f"model.arch must be one of {', '.join(_BACKBONES)}, got {name!r}")
    return _BACKBONES[name]


def method_spec(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ConfigError(f"method must be one of {', '.join(_METHODS)}, got {name!r}")
    return _METHODS[name]


def backbone_for(encoder) -> BackboneSpec:
    """The spec of a built encoder (by its class)."""
    for spec in _BACKBONES.values():
        if isinstance(encoder, spec.encoder_class):
            return spec
    raise ConfigError(f"{type(encoder).__name__} is no registered backbone ({', '.join(_BACKBONES)})")


def uses_uniform_masks(cfg: PretrainConfig) -> bool:
    """Whether the configured method draws uniform masks (the encoder then sees the compact grid)."""
    return method_spec(cfg.method).uniform_masks(cfg)


def check_config(cfg: PretrainConfig) -> PretrainConfig:
    """Check every value of a configuration whose keys and types are checked already; raise
    `ConfigError` naming the first bad key. The method's and the backbone's own checks come
    first (whether they go together, then their sections), then those of any configuration
    (`config.validate`), then what needs both (stage widths, the uniform grid)."""
    method, backbone = method_spec(cfg.method), backbone_spec(cfg.model.arch)
    method.validate(cfg, backbone)
    backbone.validate(cfg)
    validate(cfg)
    m = cfg.model
    for i, (heads, width) in enumerate(zip(m.num_heads, backbone.stage_widths(m))):
        if width % heads:
            raise ConfigError(f"model.num_heads[{i}]={heads} does not divide the stage width {width}")
    grid = cfg.data.img_size // cfg.masking.unit_size
    if method.uniform_masks(cfg) and grid % 2:
        raise ConfigError(f"data.img_size {cfg.data.img_size} / masking.unit_size {cfg.masking.unit_size} gives an "
                          f"odd unit grid ({grid}); uniform masking needs it even")
    return cfg


def ignored_overrides(cfg: PretrainConfig) -> dict[str, str]:
    """`{dotted key: why}` of the keys this backbone and method do not read."""
    return {**backbone_spec(cfg.model.arch).ignored_keys, **method_spec(cfg.method).ignored_keys(cfg)}


def full_image_config(cfg: PretrainConfig) -> PretrainConfig:
    """A copy of `cfg` whose backbone runs full images (what fine-tuning, probing and export
    build); only the attention geometry changes, no weight depends on it."""
    return backbone_spec(cfg.model.arch).full_image(copy.deepcopy(cfg), uses_uniform_masks(cfg))


def build_encoder(cfg: PretrainConfig):
    """The encoder described by a `PretrainConfig`'s model section."""
    return backbone_spec(cfg.model.arch).build(cfg)


def build_pretrain_model(cfg: PretrainConfig):
    """The pre-training model of a `PretrainConfig`: its method around its encoder."""
    backbone = backbone_spec(cfg.model.arch)
    return method_spec(cfg.method).build(cfg, backbone, backbone.build(cfg))
