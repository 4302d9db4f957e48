"""A run's configuration from its layers, checked as a whole (`ummae pretrain`, `ummae bench`, ...).

    preset (`--preset`, default `demo`) < YAML file (`--config`) < `--set key=value` < named flags

Keys and types are checked as each layer is applied (`config.apply_overrides`, no model code
needed); then the values: those any configuration has (`config.validate`) and those only the
configured backbone and method know (`models.specs.check_config` asks their specs for those,
then runs `config.validate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import (PretrainConfig, apply_overrides, apply_set_options, config_to_dict, load_yaml,
                     warn_ignored_overrides)
from .models.specs import check_config, ignored_overrides
from .presets import get_preset

__all__ = ["resolve_config"]


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   sets: list[str] | None = None, flags: dict[str, Any] | None = None,
                   base: dict[str, Any] | None = None) -> PretrainConfig:
    """Build and validate a configuration from its layers (see the module docstring).

    Args:
        preset: preset name; None = the file's `preset:` key, else `demo`.
        config_file: YAML file of sections (a saved `config.yaml` works).
        sets: `--set SECTION.KEY=VALUE` items.
        flags: dotted keys from named command-line flags (None values are ignored).
        base: a whole configuration dict (e.g. from a checkpoint being resumed) used instead
            of a preset as the bottom layer.
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
    warn_ignored_overrides(cfg, explicit, lower, ignored_overrides(cfg))
    return check_config(cfg)
