"""From a pre-training checkpoint to a backbone that runs full images (fine-tuning, probing, export).

A pre-training checkpoint carries its whole configuration, so the backbone can be rebuilt
exactly; what changes for full images is only the attention geometry, which no weight depends
on (each backbone's spec says how: `specs.full_image_config`): Swin's window doubles from the
compact grid's (8) to the full image's (16 at 256 px), PVT uses its full-image reduction ratios
(its masked path halves them on the fly), ViT is unchanged.

An `ummae export` (`NAME.safetensors` + its `NAME.json` card) is read here too (`read_card`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_file import load_checkpoint
from ..config import PretrainConfig, apply_overrides
from ..errors import ConfigError, UmmaeError
from .specs import build_encoder, full_image_config

__all__ = ["load_pretrain_checkpoint", "build_backbone", "load_backbone", "encoder_state_dict",
           "encoder_source", "read_card", "card_path"]

SUFFIX = ".safetensors"  # of an export's weights; its card is NAME.json beside it


def card_path(weights: str | Path) -> Path:
    """`NAME.safetensors` -> `NAME.json`."""
    weights = Path(weights)
    return weights.with_name(weights.name[:-len(SUFFIX)] + ".json")


def read_card(path: str | Path) -> dict[str, Any]:
    """The JSON card of an export, given its `.safetensors` or `.json` path."""
    path = Path(path)
    card_file = card_path(path) if path.name.endswith(SUFFIX) else path
    if not card_file.is_file():
        raise UmmaeError(f"'{card_file}' does not exist (written next to the weights by `ummae export`)")
    try:
        card = json.loads(card_file.read_text())
    except (OSError, ValueError) as e:
        raise UmmaeError(f"'{card_file}' is not a readable export card ({e})") from None
    if not isinstance(card, dict) or not isinstance(card.get("model"), str) \
            or not isinstance(card.get("model_args"), dict):
        raise UmmaeError(f"'{card_file}' is not an export card (needs 'model' and 'model_args')")
    return card


def load_pretrain_checkpoint(path: str | Path) -> tuple[PretrainConfig, dict]:
    """`(configuration, checkpoint dict)` of an `ummae pretrain` checkpoint (weights_only load)."""
    state = load_checkpoint(path)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UmmaeError(f"'{path}' holds no ummae configuration: not a pre-training checkpoint")
    cfg = apply_overrides(PretrainConfig(), copy.deepcopy(saved), f"checkpoint '{path}'")
    cfg.preset = str(saved.get("preset", cfg.preset))
    return cfg, state


def encoder_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The encoder's weights out of a pre-training model's state dict (`encoder.` prefix removed)."""
    weights = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    if not weights:
        raise UmmaeError("the checkpoint holds no encoder weights")
    return weights


def encoder_source(path: str | Path) -> tuple[PretrainConfig, dict[str, torch.Tensor]]:
    """`(pre-training configuration, encoder weights without prefix)` of a checkpoint or export.

    Accepts an `ummae pretrain` / `ummae finetune` checkpoint (.pt; the encoder under
    `encoder.`) or an `ummae export` file (`NAME.safetensors` + its `NAME.json` card, which
    records the pre-training configuration).
    """
    path = Path(path)
    if path.name.endswith(SUFFIX):
        from safetensors.torch import load_file

        if not path.is_file():
            raise UmmaeError(f"exported encoder '{path}' does not exist")
        card = read_card(path)
        saved = card.get("ummae_config")
        if not isinstance(saved, dict):
            raise UmmaeError(f"'{path}': its card has no ummae_config (exported by an older ummae); "
                             "use the .pt checkpoint")
        cfg = apply_overrides(PretrainConfig(), copy.deepcopy(saved), f"export card of '{path}'")
        cfg.preset = str(saved.get("preset", cfg.preset))
        try:
            weights = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise UmmaeError(f"'{path}' is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        return cfg, _from_native(path, card, cfg, weights)
    cfg, state = load_pretrain_checkpoint(path)
    return cfg, encoder_state_dict(state)


def _from_native(path: Path, card: dict, cfg: PretrainConfig, weights: dict) -> dict[str, torch.Tensor]:
    """The backbone's own weights from an export in timm's own format (Swin as `swin_*`): its
    spec converts them back, with the ummae-only tensors (coordinate MLPs, mask token) the
    export keeps in the file's metadata. Other exports are the backbone's weights already."""
    from safetensors import safe_open

    from .specs import backbone_spec
    from .swin_timm import EXTRA_KEY, unpack_extra

    spec = backbone_spec(cfg.model.arch)
    if card.get("format") != "timm" or spec.from_timm_native is None:
        return weights
    with safe_open(str(path), "pt") as f:
        extra = (f.metadata() or {}).get(EXTRA_KEY)
    if extra is None:
        raise UmmaeError(f"'{path}': a timm-format {cfg.model.arch} export without its ummae tensors "
                         f"(metadata '{EXTRA_KEY}'); export again, or use the .pt checkpoint")
    return spec.from_timm_native(weights, unpack_extra(extra))


def build_backbone(cfg: PretrainConfig, num_classes: int = 0, drop_path_rate: float | None = None,
                   img_size: int | None = None):
    """A freshly initialised full-image backbone of the configured architecture.

    Args:
        cfg: the pre-training configuration (architecture, sizes).
        num_classes: > 0 adds the backbone's own linear head (0: features only).
        drop_path_rate: stochastic depth for fine-tuning (default: the pre-training value).
        img_size: input size (ViT's position table depends on it; default: the pre-training size).
    """
    cfg = full_image_config(cfg)  # a copy
    if drop_path_rate is not None:
        cfg.model.drop_path_rate = drop_path_rate
    if img_size is not None:
        cfg.data.img_size = img_size
    encoder = build_encoder(cfg)
    if num_classes > 0:  # timm's classifier API, which every backbone answers
        encoder.reset_classifier(num_classes)
    return encoder


def load_backbone(path: str | Path, num_classes: int = 0, drop_path_rate: float | None = None,
                  img_size: int | None = None):
    """Rebuild the encoder of a checkpoint (or export, see `encoder_source`) for full images and
    load its weights.

    Returns:
        `(backbone, cfg)`. Every encoder weight is loaded; only a new classification head (and
        buffers that depend on the input size) may be missing. Anything else is an error.
    """
    cfg, weights = encoder_source(path)
    backbone = build_backbone(cfg, num_classes, drop_path_rate, img_size)
    result = backbone.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head")]
    if missing or result.unexpected_keys:
        raise UmmaeError(f"'{path}': encoder weights do not fit the rebuilt backbone "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return backbone, cfg


def load_timm_backbone_weights(encoder: torch.nn.Module, weights: dict[str, torch.Tensor],
                               own: dict[str, torch.Tensor], skip, source: str, what: str) -> list[str]:
    """Load timm-format backbone `weights` (already through timm's `checkpoint_filter_fn`) into
    `encoder`, whose backbone keys are `own`: every one must be there with its shape; the keys
    `skip(key)` accepts (classifier, decoder, ...) are left out, any other extra key is refused.
    Keys of `encoder` outside `own` (e.g. a mask token) keep their values.

    Returns:
        the keys of `weights` that were left out.
    """
    skipped = [k for k in weights if k not in own and skip(k)]
    unexpected = [k for k in weights if k not in own and k not in skipped]
    missing = [k for k in own if k not in weights]
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if unexpected or missing or wrong:
        detail = (f"shape of {wrong[0]} is {tuple(weights[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
                  if wrong else f"{len(missing)} missing keys (e.g. {missing[:1]}), "
                                f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
        raise ConfigError(f"{source} does not hold weights of this {what}: {detail}")
    strict = own.keys() == encoder.state_dict().keys()
    encoder.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=strict)
    return skipped
