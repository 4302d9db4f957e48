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


def _verify(backbone: torch.nn.Module, weights: Path, name: str, model_args: dict, img_size: int) -> None:
    """The timm model rebuilt from the card loads `weights` strictly and matches `backbone` exactly."""
    import timm

    try:
        rebuilt = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                    **model_args)
    except Exception as e:  # noqa: BLE001 - report any failure to rebuild as one line
        raise UmmaeError(f"export check failed: timm could not rebuild {name} from the written "
                         f"file ({_first_line(e)})") from e
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    backbone.eval()
    rebuilt.eval()
    with torch.no_grad():
        same = torch.equal(backbone.forward_features(x), rebuilt.forward_features(x))
    if not same:
        raise UmmaeError(f"export check failed: {name} rebuilt by timm does not reproduce the "
                         "checkpoint's backbone features")


def export_backbone(checkpoint: str | Path, out: str | Path, verify: bool = True) -> ExportResult:
    """Write the full-image encoder of a pre-training checkpoint as `out` (.safetensors) + its card.

    Args:
        checkpoint: an `ummae pretrain` checkpoint (or its run directory: `checkpoint.pt` in it).
        out: the weights file, `NAME.safetensors`; the card goes to `NAME.json` beside it. Both
            are written atomically (existing files are replaced), the folder made if missing.
        verify: rebuild the model through timm from the written file and check that it loads
            strictly and reproduces the backbone's features bit for bit (a second or so on a CPU).

    Raises:
        UmmaeError: missing or wrong checkpoint, bad or unwritable `out`, failed check.
    """
    from safetensors.torch import save as to_safetensors

    from . import __version__
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

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
    name, model_args = timm_model_args(cfg)
    img_size = int(cfg.data.img_size)

    # Plain, contiguous, unshared tensors (safetensors refuses views of one storage).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    card = {
        "model": name,
        "model_args": model_args,
        "img_size": img_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "feature_info": [dict(num_chs=f["num_chs"], reduction=f["reduction"], module=f["module"])
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
    metadata = {"format": "pt", "ummae_model": name, "ummae_model_args": json.dumps(model_args)}

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
            _verify(backbone, tmp, name, model_args, img_size)
        try:
            os.replace(tmp, out)
            _atomic_write_text(card_file, _format_card(card))
        except OSError as e:
            raise UmmaeError(f"cannot write '{out}': {e.strerror or _first_line(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(weights=out, card=card_file, model=name, model_args=model_args,
                        num_params=sum(t.numel() for t in tensors.values()), num_tensors=len(tensors))


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
