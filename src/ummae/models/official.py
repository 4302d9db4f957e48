"""The paper's released UM-MAE pre-training checkpoints (github.com/implus/UM-MAE) in ummae's models.

The official code (`models_mae_swin.py`, `models_mae_pvt.py`, `models_mae.py`) and ummae build
the same networks up to the differences listed in docs/fidelity.md. So that the released weights
compute in ummae what they computed there, the converted model switches on the architecture
options that reproduce the official design (`OFFICIAL_OPTIONS`) and the weights are mapped:

Swin (`model.merge=conv`, `model.norm_eps=1e-6`):
    blocks.K.*  (K counts the blocks of all stages)  -> encoder.stages.i.blocks.j.*
    blocks.K.downsample.{norm,proj}  (first block of stages 2-4) -> encoder.stages.i.downsample.*
    blocks.K.attn.posmlp.{0,2}  (1x1 convs) -> ...attn.pos_bias.mlp.{0,2}  (linears). The first
        layer is NEGATED: the official MLP reads `pos_j - pos_i` (query i, key j), ummae's reads
        `c_i - c_j`; its input map `sign(d) log(1 + |d|)` is odd, so `W (pos_j - pos_i)` equals
        `(-W)(c_i - c_j)` exactly.
    patch_embed.norm -> encoder.patch_norm;  vis_mask_token [1,1,C] -> encoder.mask_token [1,1,1,C]
PVT (`model.embed_norm=false`, `model.sr_every_stage=true`, `model.norm_eps=1e-6`):
    the same block / downsample layout;  attn.sr (1x1 conv) -> attn.sr (linear).
    pos_embed (the fixed sin-cos table) is checked and dropped: ummae computes its own, with the
    channels in timm's order `[sin h, sin w, cos h, cos w]` where MAE's table has
    `[sin w, cos w, sin h, cos h]`. Instead of a second table layout, the converter renumbers the
    channels of stage 1's residual stream (the patch embedding's outputs and every weight that
    reads or writes that stream). LayerNorm and linear maps commute with a renumbering of
    channels, so the converted stage 1 computes the official one's numbers in permuted channel
    order, and stage 2's merge reads them back in the original order: from stage 2 on the
    features are the official ones, channel for channel.
ViT: timm's names already (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N`, `norm`);
    vis_mask_token -> encoder.mask_token. The position table is kept as stored.
Decoder: Swin and PVT's decoder has ummae's structure (linear to 4 x D, pixel shuffle, timm
    blocks, norm, linear), so it is converted too (`model.decoder_norm_eps=1e-6`), with its
    channels renumbered the same way for its sin-cos table; continued pre-training then starts
    from it. ummae pairs every visible token with its own position where the official decoder
    pairs them in raster order (docs/fidelity.md), so the two decoders agree exactly only on masks
    where those orders coincide. MAE's ViT decoder carries the class token as an extra token,
    which ummae's has no slot for: it is dropped and the converted checkpoint gets a freshly
    initialised decoder (seed 0).

Files are read with `torch.load(weights_only=True)`: tensors and plain values only, plus
`argparse.Namespace` (the training arguments MAE-style `save_model` stores under `args`), which
holds plain values; anything else in the pickle is refused and nothing in it runs.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint_file import load_checkpoint, save_checkpoint, unreadable_reason
from ..config import apply_set_options, config_to_dict
from ..errors import ConfigError, UmmaeError
from ..presets import get_preset
from .specs import build_pretrain_model, check_config

__all__ = ["OFFICIAL_OPTIONS", "ConversionResult", "official_config", "read_official",
           "convert_state_dict", "convert_official", "sincos_channel_order", "is_official_state_dict",
           "read_init_weights", "set_value", "official_family"]

# The architecture options under which ummae computes what the official code does (config keys of
# the `model` section). Presets leave them at their defaults; `ummae convert` sets them.
OFFICIAL_OPTIONS: dict[str, dict[str, object]] = {
    "swin": dict(merge="conv", norm_eps=1e-6, decoder_norm_eps=1e-6),
    "pvt": dict(embed_norm=False, sr_every_stage=True, norm_eps=1e-6, decoder_norm_eps=1e-6),
    "vit": dict(),  # timm's ViT already uses MAE's LayerNorm eps (1e-6); the decoder is not converted
}

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_DECODER_BLOCK = re.compile(r"decoder_blocks\.(\d+)\.(.+)")
# Weights of a timm-style pre-norm block that write its residual stream (stream = dim 0) and that
# read it (stream = dim 1); used to renumber a stream's channels.
_BLOCK_WRITES = ("norm1.weight", "norm1.bias", "attn.proj.weight", "attn.proj.bias",
                 "norm2.weight", "norm2.bias", "mlp.fc2.weight", "mlp.fc2.bias")


@dataclass
class ConversionResult:
    """What `convert_state_dict` made of an official state dict."""

    state_dict: dict[str, torch.Tensor]  # the whole ummae pre-training model's (encoder + decoder)
    converted: int  # official tensors mapped onto ummae weights
    dropped: dict[str, str] = field(default_factory=dict)  # official key -> why it is not needed
    initialised: list[str] = field(default_factory=list)  # ummae keys the file has nothing for


def sincos_channel_order(dim: int) -> torch.Tensor:
    """`perm` with `timm_table[:, t] == mae_table[:, perm[t]]` for the 2-D sin-cos tables of
    `dim` channels: timm's `build_sincos2d_pos_embed` lays them out `[sin h, sin w, cos h, cos w]`,
    MAE's `get_2d_sincos_pos_embed` `[sin w, cos w, sin h, cos h]` (same frequencies, a quarter
    of the channels each)."""
    if dim % 4:
        raise ConfigError(f"a 2-D sin-cos table needs channels divisible by 4, got {dim}")
    q = dim // 4
    k = torch.arange(q)
    return torch.cat([2 * q + k, k, 3 * q + k, q + k])


def _mae_sincos_table(side: int, dim: int) -> torch.Tensor:
    """The official (MAE-order) table of a `side x side` grid, `[side*side, dim]`, from timm's."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    timm_table = build_sincos2d_pos_embed([side, side], dim)
    table = torch.empty_like(timm_table)
    table[:, sincos_channel_order(dim)] = timm_table
    return table


def set_value(v) -> str:
    """A `--set` value as one would type it (`false`, not `False`)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def official_config(preset: str, sets: Sequence[str] = ()):
    """The `PretrainConfig` of `preset` with the official architecture options (then `sets`,
    `--set KEY=VALUE` items, which win)."""
    arch = get_preset(preset).model.arch
    if arch not in OFFICIAL_OPTIONS:
        raise ConfigError(f"preset '{preset}' is model.arch {arch}: the official UM-MAE checkpoints are "
                          f"Swin, PVT and ViT ({', '.join(OFFICIAL_OPTIONS)})")
    options = [f"model.{k}={set_value(v)}" for k, v in OFFICIAL_OPTIONS[arch].items()]
    cfg = get_preset(preset)
    apply_set_options(cfg, options + list(sets))
    check_config(cfg)
    if cfg.method not in ("ummae", "mae"):
        raise ConfigError(f"preset '{preset}' is method {cfg.method}: the official checkpoints are UM-MAE "
                          "(MAE-style) pre-training; choose a ummae_* (or, for ViT, mae_*) preset")
    return cfg


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an official checkpoint (`{'model': state_dict, ...}` or a bare
    state dict), loaded on the CPU without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UmmaeError(f"checkpoint '{path}' does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:  # the pickle names a Python object to rebuild: nothing was run
            raise UmmaeError(f"refusing to load '{path}': it holds more than weights and plain values "
                             f"({refused[1]})") from None
        raise UmmaeError(f"'{path}' is not a readable checkpoint (not a torch file of tensors)") from None
    except Exception as e:  # noqa: BLE001 - junk files fail in the unpickler in many ways
        raise UmmaeError(f"'{path}' is not a readable checkpoint: {unreadable_reason(path, e)}") from None
    if isinstance(obj, dict) and "config" in obj and "format_version" in obj:
        raise UmmaeError(f"'{path}' is already an ummae checkpoint: nothing to convert")
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UmmaeError(f"'{path}' holds no model state dict (expected {{'model': {{name: tensor}}}})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def is_official_state_dict(sd: dict) -> bool:
    """Whether a state dict has the official layout (flat `blocks.K` encoder, `decoder_*`)
    rather than an ummae model's (`encoder.`, `decoder.`)."""
    return any(k.startswith("blocks.") for k in sd) and not any(k.startswith("encoder.") for k in sd)


# -- key maps -----------------------------------------------------------------------------------

def _pyramid_key(key: str, t: torch.Tensor, arch: str, where: list[tuple[int, int]]):
    """Official Swin / PVT encoder key -> `(ummae key, tensor)`, or None if unknown."""
    if key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        return f"encoder.{key}", t
    if arch == "swin" and key.startswith("patch_embed.norm."):
        return f"encoder.patch_norm.{key[len('patch_embed.norm.'):]}", t
    if key == "vis_mask_token":
        return "encoder.mask_token", t.reshape(1, 1, 1, -1)
    if key in ("norm.weight", "norm.bias"):
        return f"encoder.{key}", t
    m = _BLOCK.fullmatch(key)
    if m is None or int(m[1]) >= len(where):
        return None
    (i, j), rest = where[int(m[1])], m[2]
    if rest.startswith("downsample."):  # merging lives in the first block of stages 2-4
        return (f"encoder.stages.{i}.{rest}", t) if i > 0 and j == 0 else None
    if arch == "swin" and rest.startswith("attn.posmlp."):
        layer, param = rest[len("attn.posmlp."):].split(".", 1)
        if param == "weight" and t.ndim == 4:
            t = t.flatten(1)  # 1x1 conv [out, in, 1, 1] -> linear [out, in]
            if layer == "0":
                t = -t  # official input pos_j - pos_i, ummae's c_i - c_j (module docstring)
        return f"encoder.stages.{i}.blocks.{j}.attn.pos_bias.mlp.{layer}.{param}", t
    if arch == "pvt" and rest == "attn.sr.weight" and t.ndim == 4:
        t = t.flatten(1)  # 1x1 conv -> linear on channel-last tokens
    return f"encoder.stages.{i}.blocks.{j}.{rest}", t


def _vit_key(key: str, t: torch.Tensor):
    if key == "vis_mask_token":
        return "encoder.mask_token", t
    if key in ("cls_token", "pos_embed") or key.startswith(("patch_embed.proj.", "norm.")) \
            or _BLOCK.fullmatch(key):
        return f"encoder.{key}", t
    return None


def _decoder_key(key: str, t: torch.Tensor):
    """Official Swin / PVT decoder key -> `(ummae key, tensor)`, or None if not a decoder key."""
    simple = {"mask_token": "decoder.mask_token", "decoder_embed.weight": "decoder.embed.weight",
              "decoder_embed.bias": "decoder.embed.bias", "decoder_norm.weight": "decoder.norm.weight",
              "decoder_norm.bias": "decoder.norm.bias", "decoder_pred.weight": "decoder.pred.weight",
              "decoder_pred.bias": "decoder.pred.bias"}
    if key in simple:
        return simple[key], t
    m = _DECODER_BLOCK.fullmatch(key)
    return (f"decoder.blocks.{m[1]}.{m[2]}", t) if m else None


# -- channel renumbering (the sin-cos channel order) -------------------------------------------

def _renumber(sd: dict[str, torch.Tensor], perm: torch.Tensor, writes: Sequence[str] = (),
              reads: Sequence[str] = (), tokens: Sequence[str] = (), groups: Sequence[str] = ()) -> None:
    """Renumber the channels of one residual stream in place (keys absent from `sd` are skipped).

    writes: weights / biases / norm parameters whose dim 0 is the stream; reads: weights whose
    dim 1 is; tokens: parameters whose last dim is; groups: linear maps to `n x C` channels that a
    pixel shuffle spreads into C channels (output channel `c * n + s` -> channel c).
    """
    for k in writes:
        if k in sd:
            sd[k] = sd[k][perm]
    for k in reads:
        if k in sd:
            sd[k] = sd[k][:, perm]
    for k in tokens:
        if k in sd:
            sd[k] = sd[k][..., perm]
    for k in groups:
        if k in sd:
            t = sd[k]
            sd[k] = t.reshape(len(perm), -1, *t.shape[1:])[perm].reshape(t.shape)


def _renumber_decoder(sd: dict[str, torch.Tensor], perm: torch.Tensor, depth: int) -> None:
    blocks = [f"decoder.blocks.{b}." for b in range(depth)]
    _renumber(sd, perm,
              writes=[p + w for p in blocks for w in _BLOCK_WRITES] + ["decoder.norm.weight", "decoder.norm.bias"],
              reads=[p + r for p in blocks for r in ("attn.qkv.weight", "mlp.fc1.weight")] + ["decoder.pred.weight"],
              tokens=["decoder.mask_token"], groups=["decoder.embed.weight", "decoder.embed.bias"])


def _renumber_pvt_stage1(sd: dict[str, torch.Tensor], perm: torch.Tensor, depths: Sequence[int]) -> None:
    blocks = [f"encoder.stages.0.blocks.{b}." for b in range(depths[0])]
    writes = ["encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    writes += [p + w for p in blocks for w in _BLOCK_WRITES]
    # Keys/values come from the reduction (sr) when a block has one, else from the stream itself.
    reads = [p + r for p in blocks
             for r in ("attn.q.weight", "attn.sr.weight" if p + "attn.sr.weight" in sd else "attn.kv.weight",
                       "mlp.fc1.weight")]
    if len(depths) > 1:
        reads.append("encoder.stages.1.downsample.proj.weight")
    else:  # one stage: the final norm and the decoder read stage 1
        writes += ["encoder.norm.weight", "encoder.norm.bias"]
        reads.append("decoder.embed.weight")
    _renumber(sd, perm, writes=writes, reads=reads, tokens=["encoder.mask_token"])


def _check_sincos(t: torch.Tensor, key: str, source: str, rows_skipped: int = 0) -> None:
    """The official fixed position table must be MAE's sin-cos table: ummae rebuilds it."""
    n, dim = (t.shape[1] - rows_skipped, t.shape[-1]) if t.ndim == 3 else (0, 0)
    side = math.isqrt(max(n, 0))
    if n <= 0 or side * side != n or dim % 4 \
            or not torch.allclose(t[0, rows_skipped:].float(), _mae_sincos_table(side, dim), atol=1e-4):
        raise UmmaeError(f"{source}: official '{key}' is not the fixed 2-D sin-cos table the official code "
                         "builds: the weights cannot be converted exactly")


# -- the conversion -----------------------------------------------------------------------------

def official_family(official: dict[str, torch.Tensor]) -> str | None:
    """Which official model a state dict is, by the names only that model has: "vit" (a class
    token), "swin" (the position-bias MLP), "pvt" (spatial-reduction attention); None if none."""
    if "cls_token" in official:
        return "vit"
    if any(".attn.posmlp." in k for k in official):
        return "swin"
    if any(".attn.sr." in k or ".attn.kv." in k for k in official):
        return "pvt"
    return None


def _check_family(official: dict[str, torch.Tensor], cfg, source: str) -> None:
    """A file of another backbone family than the preset's: say so, and which presets fit it,
    before any key-level mismatch (whose message would name a symptom, not the cause)."""
    from ..presets import PRESETS

    family = official_family(official)
    if family is None or family == cfg.model.arch:
        return
    fitting = [n for n in PRESETS if n.startswith(("ummae_", "mae_")) and f"_{family}_" in n and "demo" not in n]
    raise UmmaeError(f"{source} looks like an official UM-MAE {family} checkpoint, but preset '{cfg.preset}' is "
                     f"{cfg.model.arch}: choose a {family} preset ({', '.join(fitting)})")


def _size_hint(official: dict[str, torch.Tensor], m) -> str:
    """`--set` items for the sizes in which the file visibly differs from the preset (the released
    Swin-L comes with a 2- or an 8-block decoder and a 32- or 64-wide position MLP), or ''."""
    found = {}
    blocks = [int(k.split(".")[1]) for k in official if _DECODER_BLOCK.fullmatch(k)]
    if blocks and max(blocks) + 1 != m.decoder_depth:
        found["decoder_depth"] = max(blocks) + 1
    token = official.get("mask_token")
    if token is not None and token.ndim == 3 and token.shape[-1] != m.decoder_dim:
        found["decoder_dim"] = token.shape[-1]
    posmlp = official.get("blocks.0.attn.posmlp.0.weight")
    if m.arch == "swin" and posmlp is not None and posmlp.shape[0] != m.pos_hidden_dim:
        found["pos_hidden_dim"] = posmlp.shape[0]
    return "; the file has " + " ".join(f"--set model.{k}={v}" for k, v in found.items()) if found else ""


def convert_state_dict(official: dict[str, torch.Tensor], cfg, source: str = "the checkpoint",
                       seed: int = 0) -> ConversionResult:
    """Map an official UM-MAE state dict onto the pre-training model `cfg` describes.

    Every official key is either converted or dropped for a stated reason; keys the official
    layout does not have, ummae weights the file has nothing for (except a fresh ViT decoder or a
    missing secondary mask token) and shapes that do not fit are one-line `UmmaeError`s.

    Args:
        official: the official model state dict (`read_official`).
        cfg: the target configuration (`official_config`: a preset + `OFFICIAL_OPTIONS`).
        source: how errors name the file.
        seed: seed of the weights the file does not provide (ViT decoder).
    """
    m = cfg.model
    arch = m.arch
    if arch not in OFFICIAL_OPTIONS:
        raise ConfigError(f"model.arch {arch} has no official UM-MAE checkpoint (Swin, PVT, ViT)")
    wrong = {k: v for k, v in OFFICIAL_OPTIONS[arch].items() if getattr(m, k) != v}
    if wrong:
        needed = " ".join(f"--set model.{k}={set_value(v)}" for k, v in wrong.items())
        raise ConfigError(f"{source} is an official UM-MAE checkpoint: it computes its function in ummae only "
                          f"with the official options ({needed}); or convert it first with `ummae convert`")
    _check_family(official, cfg, source)
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's generator
        torch.manual_seed(seed)
        model = build_pretrain_model(cfg)
    own = model.state_dict()
    where = [(i, j) for i, d in enumerate(m.depths) for j in range(d)]  # flat block K -> (stage, block)

    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # ummae key -> official key
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for key, t in official.items():
        if arch == "vit":
            if key.startswith("decoder_") or key == "mask_token":
                dropped[key] = "MAE's ViT decoder has a class-token slot ummae's has not: decoder initialised afresh"
                continue
            hit = _vit_key(key, t)
        elif key == "pos_embed" and arch == "pvt":
            _check_sincos(t, key, source)
            dropped[key] = "fixed sin-cos table: ummae computes it (channels renumbered to its order)"
            continue
        elif key == "decoder_pos_embed":
            _check_sincos(t, key, source)
            dropped[key] = "fixed sin-cos table: ummae computes it (channels renumbered to its order)"
            continue
        else:
            hit = _pyramid_key(key, t, arch, where) or _decoder_key(key, t)
        if hit is None:
            unknown.append(key)
            continue
        mapped[hit[0]] = hit[1]
        origin[hit[0]] = key
    if unknown:
        raise UmmaeError(f"{source}: {len(unknown)} keys that an official UM-MAE {arch} checkpoint of this "
                         f"preset ({len(where)} blocks) does not have: {', '.join(unknown[:4])}"
                         + (" ..." if len(unknown) > 4 else "") + " (another model, or the wrong --preset?)")
    extra = [k for k in mapped if k not in own]
    if extra:
        raise UmmaeError(f"{source}: official keys {', '.join(origin[k] for k in extra[:4])} have no place in preset "
                         f"'{cfg.preset}' (wrong --preset?{_size_hint(official, m)})")
    for k, t in mapped.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise UmmaeError(f"{source}: official '{origin[k]}' has shape {tuple(official[origin[k]].shape)}, "
                             f"preset '{cfg.preset}' needs {tuple(own[k].shape)} for {k} "
                             f"(wrong --preset?{_size_hint(official, m)})")
    fresh = [k for k in own if k not in mapped]
    allowed = lambda k: (arch == "vit" and k.startswith("decoder.")) or k == "encoder.mask_token"  # noqa: E731
    missing = [k for k in fresh if not allowed(k)]
    if missing:
        raise UmmaeError(f"{source}: {len(missing)} weights of preset '{cfg.preset}' are not in the file, e.g. "
                         f"{', '.join(missing[:4])} (wrong --preset?{_size_hint(official, m)})")

    # Renumber the channels that meet a sin-cos table (see the module docstring).
    if arch == "pvt":
        _renumber_pvt_stage1(mapped, sincos_channel_order(m.embed_dims[0]), m.depths)
    if arch in ("swin", "pvt"):
        _renumber_decoder(mapped, sincos_channel_order(m.decoder_dim), m.decoder_depth)

    state = {k: (mapped[k].to(own[k].dtype).clone() if k in mapped else own[k]) for k in own}
    model.load_state_dict(state)  # every key and shape checked above
    return ConversionResult(state_dict=model.state_dict(), converted=len(mapped), dropped=dropped,
                            initialised=fresh)


def convert_official(path: str | Path, preset: str, out: str | Path, sets: Sequence[str] = ()):
    """`ummae convert`: read an official checkpoint, convert it for `preset` (plus the official
    options and `sets`), write an ordinary ummae pre-training checkpoint to `out` (atomically).

    Returns:
        `(ConversionResult, cfg)`.
    """
    official = read_official(path)
    cfg = official_config(preset, sets)
    wrong = {k: v for k, v in OFFICIAL_OPTIONS[cfg.model.arch].items() if getattr(cfg.model, k) != v}
    if wrong:  # a --set undid an official option (the generic message would advise this very command)
        given = " ".join(f"--set model.{k}={set_value(getattr(cfg.model, k))}" for k in wrong)
        needed = ", ".join(f"model.{k}={set_value(v)}" for k, v in wrong.items())
        raise ConfigError(f"{given}: the official checkpoints compute their function only with {needed} "
                          "(which `ummae convert` sets itself); leave that --set out")
    result = convert_state_dict(official, cfg, f"'{path}'")
    save_checkpoint(out, {
        "model": result.state_dict, "config": config_to_dict(cfg), "step": 0,
        "converted_from": {"file": str(Path(path).resolve()), "converted": result.converted,
                           "dropped": sorted(result.dropped), "initialised": result.initialised},
    })
    return result, cfg


def read_init_weights(path: str | Path, cfg) -> dict:
    """`pretrain --init-weights` for Swin, PVT and ViT runs: an ummae checkpoint as
    `load_checkpoint` reads it, or an official UM-MAE checkpoint converted on the fly for `cfg`
    (which must carry `OFFICIAL_OPTIONS`; the error says which `--set` items are missing)."""
    source = f"--init-weights '{path}'"
    try:
        state = load_checkpoint(path)
    except UmmaeError:  # e.g. MAE-style training arguments stored as a Namespace: try the official reader
        state = {"model": read_official(path)}
    if "config" in state or not is_official_state_dict(state["model"]):
        return state
    official = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state["model"].items()}
    return {"model": convert_state_dict(official, cfg, source).state_dict}

