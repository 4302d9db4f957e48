"""Export a pre-trained encoder for other frameworks: safetensors weights + a JSON card.

`export_backbone("run/checkpoint.pt", "swin_t.safetensors")` (the `ummae export` command) writes

- `swin_t.safetensors`: the state dict of the checkpoint's FULL-IMAGE backbone (as
  `load_backbone` builds it: Swin's window doubled for UM-MAE checkpoints, PVT's full-image
  reduction ratios), plain contiguous tensors. No decoder, no optimizer; the mask token stays (the backbone owns it, and a
  strict load needs it).
- `swin_t.json`: `{"model": "ummae_swin", "model_args": {...}, "img_size": ..., ...}`: the timm
  name and arguments that rebuild that backbone, its input size and normalisation, its feature
  maps, and where it came from.

After `import ummae` (which registers the names with timm):

    timm.create_model(card["model"], pretrained=True,
                      pretrained_cfg_overlay=dict(file="swin_t.safetensors"), **card["model_args"])

`create_exported(path, **kwargs)` does exactly that from the card. Every export is checked before
it is put in place: the timm model built from the card must load the file with strict key
matching and give bit-identical `forward_features` to the checkpoint's backbone on a test image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import config_to_dict
from .errors import UmmaeError
from .models import registry  # noqa: F401 - the timm names must be registered
from .models.loading import (SUFFIX, build_backbone, card_path, encoder_state_dict, load_pretrain_checkpoint,
                             read_card)
from .models import swin_timm
from .models.specs import backbone_spec, full_image_config

__all__ = ["export_backbone", "timm_model_args", "create_exported", "read_card", "ExportResult",
           "card_path"]

@dataclass
class ExportResult:
    weights: Path  # NAME.safetensors
    card: Path  # NAME.json
    model: str  # timm model name
    model_args: dict[str, Any]
    num_params: int
    num_tensors: int
    format: str = "ummae"  # "timm": timm's own model, loads without ummae
    needs_ummae: bool = True
    note: str = ""  # why the export is not timm's own model, when it could have been asked to be


def timm_model_args(cfg) -> tuple[str, dict[str, Any]]:
    """`(timm model name, create_model kwargs)` of the full-image backbone of a `PretrainConfig`
    (its spec's `timm_model`, on the full-image configuration).

    Plain JSON values only. Training-only options (drop path) are left out: they are the
    fine-tuner's choice.
    """
    spec = backbone_spec(cfg.model.arch)
    if spec.timm_model is None:
        raise UmmaeError(f"no timm export for backbone family {cfg.model.arch!r}")
    return spec.timm_model(full_image_config(cfg))


def _resolve_out(out: str | Path) -> Path:
    out = Path(out)
    if not out.name.endswith(SUFFIX) or out.name == SUFFIX:
        raise UmmaeError(f"--out must name a {SUFFIX} file (e.g. backbone{SUFFIX}), got '{out}'")
    if out.is_dir():
        raise UmmaeError(f"--out '{out}' is a directory")
    return out


def _resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():  # a run directory: its final checkpoint
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UmmaeError(f"checkpoint '{path}' does not exist")
    return path


def _temporary(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden sibling of `path` to write first and rename over it (no half-written file ever
    has the final name). Plain `open` permissions, unlike `mkstemp`'s owner-only ones."""
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _format_card(card: dict[str, Any]) -> str:
    """One top-level key per line, values compact: readable and diff-friendly."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in card.items()) + "\n}\n"


FORMATS = ("timm", "ummae")
# How close timm's own Swin must come to ummae's backbone: the same numbers in another order
# (timm's -100 shifted-window mask instead of -inf, its own SDPA reshapes): float32 rounding,
# relative to the features' scale. Measured ~1e-6 on unit-scale features.
NATIVE_RTOL = 1e-5


def _verify(backbone: torch.nn.Module, weights: Path, name: str, model_args: dict, img_size: int,
            native: bool = False) -> None:
    """The timm model rebuilt from the card loads `weights` strictly and matches `backbone`:
    bit for bit for ummae's own models, to float32 rounding for timm's own Swin and ViT
    (`native`)."""
    import timm
    from safetensors.torch import load_file

    try:
        rebuilt = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                    **model_args)
        if native:  # timm loads a headless file non-strictly (num_classes differs): check the keys here
            rebuilt.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as e:  # noqa: BLE001 - report any failure to rebuild as one line
        raise UmmaeError(f"export check failed: timm could not rebuild {name} from the written "
                         f"file ({_first_line(e)})") from e
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    backbone.eval()
    rebuilt.eval()
    with torch.no_grad():
        ref, got = backbone.forward_features(x), rebuilt.forward_features(x)
    if native:
        same = ref.shape == got.shape and bool((ref - got).abs().max() <= NATIVE_RTOL * ref.abs().max())
    else:
        same = torch.equal(ref, got)
    if not same:
        raise UmmaeError(f"export check failed: {name} rebuilt by timm does not reproduce the "
                         "checkpoint's backbone features")


def export_backbone(checkpoint: str | Path, out: str | Path, verify: bool = True, format: str = "timm",
                    window: int | None = None, img_size: int | None = None) -> ExportResult:
    """Write the full-image encoder of a pre-training checkpoint as `out` (.safetensors) + its card.

    Args:
        checkpoint: an `ummae pretrain` checkpoint (or its run directory: `checkpoint.pt` in it).
        out: the weights file, `NAME.safetensors`; the card goes to `NAME.json` beside it. Both
            are written atomically (existing files are replaced), the folder made if missing.
        verify: rebuild the model through timm from the written file and check that it loads
            strictly and reproduces the backbone's features (a second or so on a CPU).
        format: "timm": timm's own model where the architecture allows (Swin as `swin_*`,
            Swin V2 as `swinv2_*`, ViT as `vit_*`, Hiera as `hiera_*`), loadable without ummae;
            otherwise (PVT, the official checkpoints' Swin options) ummae's registered model,
            with `ExportResult.note` saying why. "ummae": ummae's registered model
            (`ummae_swin`, `ummae_vit`, ...).
        window: Swin's full-image window (default: the doubled pre-training window for UM-MAE,
            as `load_backbone` builds it).
        img_size: the input size recorded in the card (and, for timm's Swin, the size whose
            stage grids fix its windows; default: the pre-training size).

    Raises:
        UmmaeError: missing or wrong checkpoint, bad or unwritable `out`, failed check.
    """
    from safetensors.torch import save as to_safetensors

    from . import __version__
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if format not in FORMATS:
        raise UmmaeError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    for flag, value in (("--window", window), ("--img-size", img_size)):
        if value is not None and value < 1:
            raise UmmaeError(f"{flag} must be a positive integer, got {value}")
    out = _resolve_out(out)
    checkpoint = _resolve_checkpoint(checkpoint)
    # What `load_backbone` does, sharing one read of the (possibly large) checkpoint: the
    # full-image backbone of its configuration (Swin window doubled for UM-MAE), every weight.
    cfg, state = load_pretrain_checkpoint(checkpoint)
    backbone = build_backbone(cfg)
    try:
        backbone.load_state_dict(encoder_state_dict(state), strict=True)
    except RuntimeError as e:
        raise UmmaeError(f"'{checkpoint}': encoder weights do not fit the rebuilt backbone "
                         f"({_first_line(e)})") from None
    del state
    if window is not None:
        if not hasattr(backbone, "set_window_size"):
            raise UmmaeError(f"--window applies to Swin only, not to model.arch {cfg.model.arch}")
        backbone.set_window_size(window)
    img_size = int(img_size or cfg.data.img_size)
    spec = backbone_spec(cfg.model.arch)
    name, model_args = timm_model_args(cfg)
    if format == "ummae" and not name.startswith("ummae_"):
        raise UmmaeError(f"--format ummae: model.arch {cfg.model.arch} has no ummae_* model; "
                         f"its export is timm's own {name.split('.')[0]}")
    if window is not None:
        model_args["window_size"] = int(window)

    # timm's own model under other keys or without ummae's extra tensors (Swin, ViT), where the
    # backbone can be one; else the registered ummae_* model.
    native, note, metadata_extra = False, "", {}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    if format == "timm" and spec.timm_native is not None:
        made = spec.timm_native(backbone, full_image_config(cfg), img_size)
        if isinstance(made, str):
            note = f"exported as {name} (needs ummae to load): {made}"
        else:
            native = True
            name, model_args, native_state, extra = made
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in native_state.items()}
            metadata_extra = {swin_timm.EXTRA_KEY: swin_timm.pack_extra(extra)}
    elif format == "timm" and name.startswith("ummae_"):
        note = _UMMAE_ONLY.get(cfg.model.arch, "")
    card = {
        "model": name,
        "model_args": model_args,
        "img_size": img_size,
        "format": "timm" if native or not name.startswith("ummae_") else "ummae",
        "needs_ummae": name.startswith("ummae_"),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "feature_info": [dict(num_chs=f["num_chs"], reduction=f["reduction"],
                              module=f["module"].replace("stages.", "layers.") if native else f["module"])
                         for f in backbone.feature_info],
        "checkpoint": str(checkpoint.resolve()),
        "preset": cfg.preset,
        "method": cfg.method,
        "ummae_version": __version__,
        "timm_version": _timm_version(),
        # The pre-training configuration (plain values): lets ummae itself (finetune, knn,
        # linprobe) rebuild the backbone from the export alone.
        "ummae_config": config_to_dict(cfg),
    }
    if note:
        card["note"] = note
    metadata = {"format": "pt", "ummae_model": name, "ummae_model_args": json.dumps(model_args),
                **metadata_extra}

    card_file = card_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UmmaeError(f"cannot write '{out}': {e.strerror or _first_line(e)}") from None
    # The temporary name keeps the suffix: timm picks its reader by it (verification below).
    tmp = _temporary(out, ".tmp" + SUFFIX)
    try:
        try:
            # Serialised here and written with `open`: the file gets the usual permissions
            # (safetensors' own writer makes it owner-only).
            tmp.write_bytes(to_safetensors(tensors, metadata=metadata))
        except OSError as e:
            raise UmmaeError(f"cannot write '{out}': {e.strerror or _first_line(e)}") from None
        if verify:
            _verify(backbone, tmp, name, model_args, img_size, native=native)
        try:
            os.replace(tmp, out)
            _atomic_write_text(card_file, _format_card(card))
        except OSError as e:
            raise UmmaeError(f"cannot write '{out}': {e.strerror or _first_line(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(weights=out, card=card_file, model=name, model_args=model_args,
                        num_params=sum(t.numel() for t in tensors.values()), num_tensors=len(tensors),
                        format=card["format"], needs_ummae=card["needs_ummae"], note=note)


# Why a backbone has no timm-only export (said when `--format timm`, the default, falls back).
_UMMAE_ONLY = {
    "pvt": "exported as ummae_pvt (needs ummae to load): timm has PVT v2 only, a different architecture",
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _timm_version() -> str:
    import timm

    return timm.__version__


def create_exported(path: str | Path, pretrained: bool = True, **kwargs) -> torch.nn.Module:
    """`timm.create_model` of an export, from its card; `kwargs` override the card's arguments
    (e.g. `features_only=True`, `out_indices=(1, 2, 3)`, `num_classes=10`, ViT `img_size=384`).

    Args:
        path: `NAME.safetensors` (or `NAME.json`); the weights file named by the card.
        pretrained: load the weights (False: same architecture, fresh initialisation).
    """
    import timm

    path = Path(path)
    card = read_card(path)
    weights = path if path.name.endswith(SUFFIX) else path.with_name(path.stem + SUFFIX)
    args = dict(card["model_args"], **kwargs)
    size = args.get("img_size", card.get("img_size"))
    overlay = {}
    if pretrained:
        if not weights.is_file():
            raise UmmaeError(f"weights '{weights}' do not exist")
        overlay["file"] = str(weights)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        overlay["input_size"] = (3, int(h), int(w))  # what timm's data config will resize to
    return timm.create_model(card["model"], pretrained=pretrained, pretrained_cfg_overlay=overlay, **args)
