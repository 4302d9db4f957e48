"""Run configuration: typed sections, YAML files and command-line overrides; no model code.

A configuration is resolved in layers, later ones winning (`ummae.resolve.resolve_config`):
    preset (`--preset`, default `demo`) < YAML file (`--config`) < `--set key=value` < named flags
Here: the sections, the key and type checks of every layer (`apply_overrides`: one line naming an
unknown key, torch-free), the checks of values any configuration has (`validate`), resuming.
What only a backbone or a method can judge, its spec does (`ummae.models.specs`). The resolved
configuration is written to the run directory as `config.yaml`; feeding that file back with
`--config` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "ModelConfig", "MaskingConfig", "EmaeConfig", "DataConfig", "OptimConfig", "TrainConfig", "PretrainConfig",
    "config_to_dict", "apply_overrides", "parse_set_option", "apply_set_options", "load_yaml", "validate", "absolute_paths",
    "check_resumable", "RESUMABLE_KEYS", "refuse_changed_keys", "register_model_options",
]


@dataclass
class ModelConfig:
    """The backbone and decoder. Its fields are the union of what the built-in backbones read
    (each backbone's spec, `ummae.models.specs`, says which ones it ignores). A backbone from
    outside the package adds its own options (`BackboneSpec.options`): they are set and saved as
    `model.NAME` like the others, kept in `options`, and read with `option(NAME)`."""

    arch: str = "swin"  # backbone family: swin | pvt | vit | hiera (timm's, method mae or emae) | registered
    embed_dim: int = 96  # Swin: stage-1 width (doubled per stage); ViT: the width
    embed_dims: list[int] | None = None  # PVT: width of every stage
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])  # ViT: one entry
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 8  # Swin: 8 on the compact grid (UM-MAE), 16 on the full image (SimMIM)
    patch_size: int = 4
    mlp_ratio: float = 4.0
    mlp_ratios: list[float] | None = None  # PVT: per stage
    sr_ratios: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # PVT, full image; halved when compact
    pos_hidden_dim: int = 32  # Swin: coordinate-MLP width of the position bias (Swin-L: 64)
    # Options for the official UM-MAE checkpoints (`ummae convert` sets them; docs/fidelity.md):
    merge: str = "linear"  # Swin patch merging: linear (timm's, the paper's) | conv (official: LayerNorm + 2x2 conv)
    embed_norm: bool = True  # PVT: LayerNorm after each patch embedding (official: none)
    sr_every_stage: bool = False  # PVT: reduction weights in every stage, ratio-1 ones too (official)
    norm_eps: float = 1e-5  # Swin, PVT: eps of the embedding, merging and final LayerNorms (official: 1e-6)
    decoder_norm_eps: float = 1e-5  # eps of the decoder's LayerNorms (official, MAE: 1e-6)
    drop_path_rate: float = 0.0
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    # Options of registered backbones outside the package (`register_model_options`); left out
    # of `config_to_dict` while empty, so configurations of the built-in backbones are unchanged.
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        """A registered backbone option: its set value, else its default."""
        if name not in _MODEL_OPTIONS:
            raise ConfigError(f"model.{name} is not a registered backbone option")
        return self.options.get(name, _MODEL_OPTIONS[name][1])


# Extra `model.NAME` options of registered backbones: name -> (arch, default); the type is the default's.
_MODEL_OPTIONS: dict[str, tuple[str, Any]] = {}


def register_model_options(arch: str, options: dict[str, Any]) -> None:
    """Let `model.NAME` (`--set`, YAML files, saved configurations) set backbone `arch`'s own option
    NAME; its type is its default's (bool, int, float, str or a list of one of them)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, default in options.items():
        if name in known or (name in _MODEL_OPTIONS and _MODEL_OPTIONS[name][0] != arch):
            raise ValueError(f"model option {name!r} of backbone {arch!r} exists already")
        _MODEL_OPTIONS[name] = (arch, default)


def _option_type(name: str) -> Any:
    default = _MODEL_OPTIONS[name][1]
    if isinstance(default, list):
        return list[type(default[0])] if default else list[str]
    return type(default)


@dataclass
class MaskingConfig:
    unit_size: int = 16  # pixels
    mask_ratio: float = 0.75  # random masking (mae, simmim); uniform masking is always 0.75
    secondary_ratio: float = 0.25  # ummae: visible units given the secondary mask token
    # How that count is rounded: round (ummae) | official (the official code's: visible -
    # int(visible x (1 - ratio)); 13 instead of 12 for ViT-B at 224 px, see docs/fidelity.md)
    secondary_rounding: str = "round"


@dataclass
class EmaeConfig:
    """EMAE only (method emae): each image is split into `num_parts` disjoint parts per step."""
    num_parts: int = 4  # K; each part masks 1 - 1/K of the units (masking.mask_ratio is unused)
    parts: str = "uniform"  # uniform (2x2 blocks dealt to 4 parts: swin, pvt, vit) | random (vit)
    consistency_weight: float = 1.0  # weight of the self-consistency term; 0 = off
    consistency_distance: str = "l1"  # l1 | l2, symmetric with stop-gradient on the other branch
    consistency_start_epoch: float = 0.0  # the term counts from this epoch on


@dataclass
class DataConfig:
    path: str | None = None  # folder tree of images; None = the built-in demo photographs
    img_size: int = 256
    min_crop_scale: float = 0.2  # RandomResizedCrop scale range (min_crop_scale, 1)
    demo_length: int = 512  # demo crops per epoch
    num_workers: int | None = None  # DataLoader workers per process; None: fitted to the CPUs (engine/cpus.py)
    # JPEGs: fast (decode at reduced scale when the crop allows) | plain | gpu (workers read bytes,
    # the training process decodes the batch on the device: ummae.data.gpu_decode)
    decode: str = "fast"


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 10.0
    clip_grad: float | None = None  # max gradient norm; None = no clipping


@dataclass
class TrainConfig:
    epochs: int = 200
    max_steps: int | None = None  # cap on the optimizer steps (never beyond epochs; schedule fitted to the shorter)
    batch_size: int = 64  # per device, per micro-step
    accum_steps: int = 1  # micro-steps per optimizer step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA, grad scaler)
    compile: bool = False  # torch.compile the model
    # Data parallelism under torchrun (engine/sharding.py): ddp (every rank holds the whole model,
    # its gradients and AdamW moments) | fsdp (FSDP2: parameters, gradients and moments sharded
    # over the ranks, one unit per transformer block plus the root; sharded checkpoints)
    strategy: str = "ddp"
    # fsdp: free each block's gathered parameters after its forward (ZeRO-3: least memory, one
    # more all-gather per block in backward) or keep them until backward (ZeRO-2 style: faster)
    reshard_after_forward: bool = True
    grad_checkpointing: bool = False  # recompute each encoder block's activations in backward
    out: str | None = None  # run directory; None = runs/<preset>-<timestamp>
    log_every: int = 10  # optimizer steps between metric lines
    save_every: int = 1000  # optimizer steps between checkpoints (also one at the end); 0 = end only
    keep_last: int = 3  # periodic checkpoints kept; 0 = all
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (default) or skip that optimizer step
    init_weights: str | None = None  # start from these weights (a checkpoint), fresh optimizer
    vis_images: int = 8  # images in the reconstruction picture


@dataclass
class PretrainConfig:
    preset: str = "demo"
    # ummae: MAE with uniform masking (Swin, PVT, ViT); mae: random masking (ViT);
    # simmim: full image with mask tokens, linear head, L1 (Swin, PVT);
    # emae: K disjoint parts per image + self-consistency (uniform parts: Swin, PVT, ViT; random: ViT)
    method: str = "ummae"
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    emae: EmaeConfig = field(default_factory=EmaeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def effective_batch(self) -> int:
        return self.train.batch_size * self.train.accum_steps

    @property
    def lr(self) -> float:
        """Peak learning rate of a one-process run (see `peak_lr`)."""
        return self.peak_lr(1)

    def peak_lr(self, world_size: int = 1) -> float:
        """Absolute `optim.lr`, else `blr x batch x accum x world_size / 256` (MAE's rule)."""
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.blr * self.effective_batch * world_size / 256


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass

def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON/checkpoint safe: only str, int, float, bool, None, lists)."""
    out = dataclasses.asdict(cfg)
    if not out["model"]["options"]:  # only backbones from outside the package have options
        del out["model"]["options"]
    return out


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/command-line value to the field's type, or raise naming the key."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML reads `--set k=1` as an int
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {typ} for {key}")


def _section_classes() -> dict[str, type]:
    hints = _field_types(PretrainConfig)
    return {name: hints[name] for name in hints if dataclasses.is_dataclass(hints[name])}


def apply_overrides(cfg: PretrainConfig, values: dict[str, Any], source: str) -> PretrainConfig:
    """Set nested `values` (`{"train": {"epochs": 3}}` or `{"train.epochs": 3}`) on `cfg`.

    Unknown sections or keys raise `ConfigError` naming them and where they came from.
    """
    sections = _section_classes()
    for top, value in values.items():
        if "." in top:  # dotted key
            section, _, key = top.partition(".")
            value = {key: value}
            top = section
        if top == "preset" and not isinstance(value, dict):
            continue  # a file's `preset: NAME`, chosen before the layers are applied
        if top == "method" and not isinstance(value, dict):
            cfg.method = _coerce(value, str, "method")
            continue
        if top not in sections:
            raise ConfigError(f"unknown config section '{top}' in {source} "
                              f"(known: preset, method, {', '.join(sections)})")
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{top}' in {source} must be a mapping of keys")
        section_obj = getattr(cfg, top)
        hints = _field_types(sections[top])
        for key, v in value.items():
            if top == "model" and (key == "options" or key in _MODEL_OPTIONS):
                _set_model_options(section_obj, v if key == "options" else {key: v}, source)
                continue
            if key not in hints:
                extra = f", {', '.join(_MODEL_OPTIONS)}" if top == "model" and _MODEL_OPTIONS else ""
                raise ConfigError(f"unknown config key '{top}.{key}' in {source} "
                                  f"(known: {', '.join(k for k in hints if k != 'options')}{extra})")
            try:
                setattr(section_obj, key, _coerce(v, hints[key], f"{top}.{key}"))
            except ConfigError as e:  # say where the bad value came from
                raise ConfigError(f"{e} (in {source})") from None
    return cfg


def _set_model_options(m: ModelConfig, values: Any, source: str) -> None:
    """`model.NAME` of registered backbone options (or a saved `options:` mapping of them)."""
    if not isinstance(values, dict):
        raise ConfigError(f"model.options in {source} must be a mapping of backbone options")
    for name, v in values.items():
        if name not in _MODEL_OPTIONS:
            raise ConfigError(f"unknown config key 'model.{name}' in {source} (registered backbone options: "
                              f"{', '.join(_MODEL_OPTIONS) or 'none'})")
        m.options[name] = _coerce(v, _option_type(name), f"model.{name}")


def parse_set_option(item: str) -> tuple[str, Any]:
    """`"optim.blr=1e-4"` -> `("optim.blr", 1e-4)`; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or ("." not in key and key.strip() != "method"):
        raise ConfigError(f"--set expects SECTION.KEY=VALUE (or method=NAME), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_set_options(cfg: PretrainConfig, items: list[str]) -> dict[str, str]:
    """Apply `--set SECTION.KEY=VALUE` items in order; returns `{dotted key: "--set ITEM"}`."""
    explicit = {}
    for item in items:
        key, value = parse_set_option(item)
        apply_overrides(cfg, {key: value}, f"--set {item}")
        explicit[key] = f"--set {item}"
    return explicit


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config: '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: '{path}' must hold a mapping of sections")
    return data


# ---------------------------------------------------------------------------------------------
# validation and warnings (the backbone's and method's own: `ummae.models.specs`)

def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check every value that needs no backbone or method to judge; raise `ConfigError` naming the
    first bad key. What only a backbone or method knows (`model.arch`, `method` themselves, stage
    lists, which method runs on which backbone) its spec checks: `models.specs.check_config`."""

    def positive(key: str, v: float | int | None, allow_none: bool = False, zero: bool = False):
        if v is None and allow_none:
            return
        if v is None or not math.isfinite(v) or v < 0 or (v == 0 and not zero):
            raise ConfigError(f"{key} must be {'>= 0' if zero else '> 0'}, got {v}")

    m, k, d, o, t = cfg.model, cfg.masking, cfg.data, cfg.optim, cfg.train
    for key in ("embed_dim", "window_size", "patch_size", "mlp_ratio", "pos_hidden_dim",
                "decoder_dim", "decoder_depth", "decoder_heads"):
        positive(f"model.{key}", getattr(m, key))
    if not m.depths or any(x < 1 for x in m.depths):
        raise ConfigError(f"model.depths must be a non-empty list of integers >= 1, got {m.depths}")
    if len(m.num_heads) != len(m.depths) or any(x < 1 for x in m.num_heads):
        raise ConfigError(f"model.num_heads must have one integer >= 1 per stage ({len(m.depths)}), got {m.num_heads}")
    if m.decoder_dim % m.decoder_heads or m.decoder_dim % 4:
        raise ConfigError(f"model.decoder_dim {m.decoder_dim} must be divisible by 4 and by model.decoder_heads")
    if not 0 <= m.drop_path_rate < 1:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    if m.merge not in ("linear", "conv"):
        raise ConfigError(f"model.merge must be linear or conv, got {m.merge!r}")
    for key in ("norm_eps", "decoder_norm_eps"):
        if not 0 < getattr(m, key) < 1:
            raise ConfigError(f"model.{key} must be in (0, 1), got {getattr(m, key)}")

    positive("masking.unit_size", k.unit_size)
    if not 0 <= k.mask_ratio < 1:
        raise ConfigError(f"masking.mask_ratio must be in [0, 1), got {k.mask_ratio}")
    if not 0 <= k.secondary_ratio < 1:
        raise ConfigError(f"masking.secondary_ratio must be in [0, 1), got {k.secondary_ratio}")
    if k.secondary_rounding not in ("round", "official"):
        raise ConfigError(f"masking.secondary_rounding must be round or official, got {k.secondary_rounding!r}")

    positive("data.img_size", d.img_size)
    if d.img_size % k.unit_size:
        raise ConfigError(f"data.img_size {d.img_size} is not divisible by masking.unit_size {k.unit_size}")
    if not 0 < d.min_crop_scale <= 1:
        raise ConfigError(f"data.min_crop_scale must be in (0, 1], got {d.min_crop_scale}")
    positive("data.demo_length", d.demo_length)
    positive("data.num_workers (--workers)", d.num_workers, zero=True, allow_none=True)
    if d.decode not in ("fast", "plain", "gpu"):
        raise ConfigError(f"data.decode must be 'fast', 'plain' or 'gpu', got {d.decode!r}")
    if d.path is not None and not str(d.path).strip():
        raise ConfigError("data.path (--data) is empty")

    positive("optim.blr", o.blr)
    positive("optim.lr", o.lr, allow_none=True)
    positive("optim.min_lr", o.min_lr, zero=True)
    positive("optim.weight_decay", o.weight_decay, zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    positive("optim.warmup_epochs", o.warmup_epochs, zero=True)
    positive("optim.clip_grad", o.clip_grad, allow_none=True)

    positive("train.epochs (--epochs)", t.epochs)
    positive("train.max_steps (--max-steps)", t.max_steps, allow_none=True)
    positive("train.batch_size (--batch-size)", t.batch_size)
    positive("train.accum_steps (--accum-steps)", t.accum_steps)
    positive("train.seed (--seed)", t.seed, zero=True)
    positive("train.log_every", t.log_every)
    positive("train.vis_images", t.vis_images, zero=True)
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device (--device) must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {t.precision!r}")
    if t.precision == "fp16" and not t.device.startswith("cuda"):
        raise ConfigError("train.precision fp16 needs --device cuda (use bf16 or fp32 on a CPU)")
    positive("train.save_every (--save-every)", t.save_every, zero=True)
    positive("train.keep_last (--keep-last)", t.keep_last, zero=True)
    if t.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"train.strategy (--strategy) must be ddp or fsdp, got {t.strategy!r}")
    if t.strategy == "fsdp" and t.precision == "fp16":
        raise ConfigError("train.precision fp16 does not go with --strategy fsdp (its grad scaler is DDP's); "
                          "use bf16 (the default on CUDA) or fp32")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    return cfg


def warn_ignored_overrides(cfg: PretrainConfig, explicit: dict[str, str], lower: dict[str, Any],
                           ignored: dict[str, str]) -> None:
    """An explicit override (--set, flag) of a key that another key makes irrelevant gets a
    one-line warning on stderr naming what wins, rather than silently doing nothing.

    Args:
        explicit: dotted key -> the option that set it.
        lower: the configuration below the explicit overrides (preset or checkpoint, and file).
        ignored: dotted key -> why the configured backbone and method do not read it.
    """
    import sys

    def refuse(key: str, why: str):
        print(f"ummae: warning: {explicit[key]} is ignored: {why}", file=sys.stderr)

    if "optim.blr" in explicit and "optim.lr" not in explicit and cfg.optim.lr is not None:
        source = f"preset '{cfg.preset}'" if lower["optim"]["lr"] == cfg.optim.lr else "the configuration"
        refuse("optim.blr", f"optim.lr={cfg.optim.lr} (from the {source}) wins over blr; "
                            "add --set optim.lr=none to use blr")
    for key, why in ignored.items():
        if key in explicit:
            refuse(key, why)


# ---------------------------------------------------------------------------------------------
# paths and resuming

_PATH_KEYS = (("data", "path"), ("train", "out"), ("train", "init_weights"))

# What may differ between a checkpoint's configuration and the run that resumes it. Anything
# else would make the continued run a different run, so it is refused naming the keys.
RESUMABLE_KEYS = (
    "train.epochs", "train.max_steps",  # extend (or shorten, not below the checkpoint's step) the run
    "train.save_every", "train.keep_last", "train.log_every", "train.vis_images",  # output
    "train.out",  # a checkpoint copied elsewhere continues there
    "train.device", "train.compile", "data.num_workers",  # the machine: same maths, other speed
    "train.strategy", "train.reshard_after_forward", "train.grad_checkpointing",  # also the machine
    "train.on_nonfinite",
    "train.init_weights",  # provenance only: a resumed run takes its weights from the checkpoint
)


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Make the configuration's paths absolute (against the current directory), so a run's
    config.yaml and checkpoints work from any working directory."""
    import os

    for section, key in _PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, os.path.abspath(os.path.expanduser(value)))
    return cfg


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(saved: dict[str, Any], cfg: PretrainConfig, source: str) -> None:
    """Refuse to continue a checkpoint with a configuration that differs in more than RESUMABLE_KEYS.

    Args:
        saved: the checkpoint's configuration dict.
    """
    old = _flat(config_to_dict(absolute_paths(apply_overrides(PretrainConfig(), saved, source))))
    refuse_changed_keys(old, _flat(config_to_dict(cfg)), RESUMABLE_KEYS, source, ("method", "model", "masking"))


def refuse_changed_keys(old: dict[str, Any], new: dict[str, Any], resumable: tuple[str, ...], source: str,
                        architecture: tuple[str, ...] = ()) -> None:
    """One-line ConfigError naming every key (old -> new) outside `resumable` that differs.

    Args:
        old, new: flat `{dotted key: value}` of the checkpoint's and this run's configuration.
        architecture: key prefixes that mean another architecture (said so in the message).
    """
    differ = [k for k in new if k != "preset" and k not in resumable and old.get(k) != new[k]]
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        kind = ("a checkpoint of another architecture: "
                if any(k.split(".")[0] in architecture for k in differ) else "")
        raise ConfigError(f"{source}: {kind}this configuration differs from the checkpoint's in {shown}{more}; "
                          f"only {', '.join(k.split('.')[-1] for k in resumable[:2])} and output/machine "
                          f"settings may change on resume (docs/reliability.md)")
