"""A run's configuration from its layers, checked as a whole (`ummae pretrain`, `ummae bench`, ...).

    preset (`--preset`, default `demo`) < YAML file (`--config`) < `--set key=value` < named flags

Keys and types are checked as each layer is applied (`config.apply_overrides`, no model code
needed); then the values: those any configuration has (`config.validate`) and those only the
configured backbone and method know (`models.specs.check_config` asks their specs for those,
then runs `config.validate`).

`layer_config` is the first half alone, torch-free: the command line checks a preset typo, an
unknown or ill-typed key and a bad `--config` file with it before importing any model code
(torch takes seconds to import; a typo should cost none of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import (PretrainConfig, apply_overrides, apply_set_options, config_to_dict, load_yaml,
                     warn_ignored_overrides)
from .presets import get_preset

__all__ = ["resolve_config", "layer_config"]


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   sets: list[str] | None = None, flags: dict[str, Any] | None = None,
                   base: dict[str, Any] | None = None) -> PretrainConfig:
    """Build and validate a configuration from its layers (see the module docstring).

    Args: as `layer_config`.
    """
    from .models.specs import check_config, ignored_overrides  # model code: imports torch

    cfg, explicit, lower = layer_config(preset, config_file, sets, flags, base)
    warn_ignored_overrides(cfg, explicit, lower, ignored_overrides(cfg))
    return check_config(cfg)


def layer_config(preset: str | None = None, config_file: str | Path | None = None,
                 sets: list[str] | None = None, flags: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None) -> tuple[PretrainConfig, dict[str, str], dict[str, Any]]:
    """The layers applied, keys and types checked, values not yet (no model code, no torch).

    Args:
        preset: preset name; None = the file's `preset:` key, else `demo`.
        config_file: YAML file of sections (a saved `config.yaml` works).
        sets: `--set SECTION.KEY=VALUE` items.
        flags: dotted keys from named command-line flags (None values are ignored).
        base: a whole configuration dict (e.g. from a checkpoint being resumed) used instead
            of a preset as the bottom layer.

    Returns:
        `(cfg, explicit, lower)`: the configuration; `{dotted key: option}` of what --set and the
        flags set; the configuration below them (preset or checkpoint, and file) as a dict.
    """
    file_values = load_yaml(config_file) if config_file else {}
    if base is not None:
        cfg = apply_overrides(PretrainConfig(), base, "the checkpoint's configuration")
        cfg.preset = str(base.get("preset", "resumed"))
    else:
        name = preset or file_values.get("preset") or "demo"
        cfg = get_preset(str(name))
        cfg.preset = str(name)
    if file_values:
        apply_overrides(cfg, file_values, f"config file '{config_file}'")
    lower = config_to_dict(cfg)  # preset/checkpoint + file: what the explicit overrides change
    explicit = apply_set_options(cfg, sets or [])  # dotted key -> the option that set it
    for key, value in (flags or {}).items():
        if value is not None:
            option = f"--{key.split('.')[-1].replace('_', '-')}"
            apply_overrides(cfg, {key: value}, option)
            explicit[key] = option
    return cfg, explicit, lower
