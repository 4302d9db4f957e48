"""Named, ready-to-run configurations (`ummae presets` lists them).

Each preset is a set of overrides on the defaults of `ummae.config`, composed from a backbone,
a method and a recipe, and named `<method>_<backbone>_<size>`:

- the paper's comparison grid (SPEC sec. 6, ImageNet-1K recipes): `ummae_swin_tiny_256` vs
  `simmim_swin_tiny_256`, `ummae_pvt_small_256` vs `simmim_pvt_small_256`, `mae_vit_base_224`
  vs `ummae_vit_base_224`, MAE on timm's Hiera (`mae_hiera_tiny_224`, `mae_hiera_base_224`),
  Swin-L (`ummae_swin_large_256`, `simmim_swin_large_256`), and timm's own Swin V2
  (`ummae_swinv2_tiny_256` vs `simmim_swinv2_tiny_256`);
- EMAE (4 disjoint parts per image + self-consistency): `emae_vit_base_224` (random parts),
  `emae_swin_tiny_256`, `emae_pvt_small_256` and `emae_swinv2_tiny_256` (uniform parts,
  "UM-EMAE"), and a tiny
  `emae_hiera_demo` (random parts of timm's Hiera mask units);
- a tiny variant of each, `<method>_<backbone>_demo`, that trains on the built-in photographs in
  a couple of minutes on a CPU (tests, demos, quick checks); `demo` is `ummae_swin_demo`.
"""

from __future__ import annotations

import copy
from typing import Any

from .config import PretrainConfig, apply_overrides
from .errors import ConfigError

__all__ = ["PRESETS", "get_preset", "preset_names", "register_preset"]

# -- backbones ---------------------------------------------------------------------------------
SWIN_T = dict(arch="swin", patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
              pos_hidden_dim=32)
SWIN_L = dict(arch="swin", patch_size=4, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
              pos_hidden_dim=64)
PVT_S = dict(arch="pvt", patch_size=4, embed_dims=[64, 128, 320, 512], depths=[3, 4, 6, 3],
             num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1])
VIT_B = dict(arch="vit", patch_size=16, embed_dim=768, depths=[12], num_heads=[12], mlp_ratio=4.0)
# timm's Hiera (built by timm.create_model): hiera_tiny_224 / hiera_base_224 sizes.
HIERA_T = dict(arch="hiera", patch_size=4, embed_dim=96, depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8])
HIERA_B = dict(arch="hiera", patch_size=4, embed_dim=96, depths=[2, 3, 16, 3], num_heads=[1, 2, 4, 8])

SWIN_DEMO = dict(arch="swin", patch_size=4, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
PVT_DEMO = dict(arch="pvt", patch_size=4, embed_dims=[32, 64, 96, 128], depths=[1, 1, 2, 1],
                num_heads=[1, 2, 3, 4], mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1])
VIT_DEMO = dict(arch="vit", patch_size=16, embed_dim=96, depths=[4], num_heads=[3], mlp_ratio=4.0)
# timm's Swin V2 (the encoder is timm's model): model.window_size is its full-image window, the
# compact image of UM-MAE runs half of it over the same extent (swinv2_tiny_window16_256's sizes).
SWINV2_T = dict(arch="swinv2", patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                window_size=16)
SWINV2_DEMO = dict(arch="swinv2", patch_size=4, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                   window_size=8)
HIERA_DEMO = dict(arch="hiera", patch_size=4, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
# Hiera's MAE masking: 60% of 32 px mask units (the Hiera paper); one unit = one last-stage token.
HIERA_MASKING = dict(unit_size=32, mask_ratio=0.6)

# -- recipes -----------------------------------------------------------------------------------
# SPEC sec. 6: 200 epochs, blr 1.5e-4, warm-up 10, AdamW (0.9, 0.95), wd 0.05, crops 0.2-1.
# 256 images x 16 accumulation steps = the paper's effective batch of 4096 on one device.
PAPER = {
    "masking": dict(unit_size=16, mask_ratio=0.75, secondary_ratio=0.25),
    "data": dict(img_size=256, min_crop_scale=0.2),
    "optim": dict(blr=1.5e-4, lr=None, weight_decay=0.05, betas=[0.9, 0.95], warmup_epochs=10),
    "train": dict(epochs=200, batch_size=256, accum_steps=16),
}
# A couple of minutes on a 2-core CPU: 240 steps of 32 random 128 px crops of the demo photos.
DEMO = {
    "masking": dict(unit_size=16, mask_ratio=0.75, secondary_ratio=0.25),
    "data": dict(img_size=128, min_crop_scale=0.2, demo_length=256),
    "optim": dict(blr=1.5e-4, lr=1e-3, warmup_epochs=1, weight_decay=0.05),
    "train": dict(epochs=30, batch_size=32, accum_steps=1, log_every=2),
}
PAPER_DECODER = dict(decoder_dim=512, decoder_depth=2, decoder_heads=16)
DEMO_DECODER = dict(decoder_dim=128, decoder_depth=1, decoder_heads=4)


def _preset(method: str, backbone: dict, recipe: dict, model: dict | None = None,
            **sections: dict) -> dict[str, Any]:
    """Compose overrides: recipe sections, then the backbone (+ method-specific model keys)."""
    out = copy.deepcopy(recipe)
    out["method"] = method
    out["model"] = {**backbone, **(model or {})}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


# name -> (one-line description, overrides)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # ---- the paper's grid -------------------------------------------------------------------
    "ummae_swin_tiny_256": (
        "Swin-T, UM-MAE: 256 px, unit 16, SM 0.25, window 8 on the compact grid, 200 ep x 4096",
        _preset("ummae", SWIN_T, PAPER, dict(window_size=8, **PAPER_DECODER))),
    "simmim_swin_tiny_256": (
        "Swin-T, SimMIM baseline: full image, window 16, random 75% of 16 px units, L1; same schedule",
        _preset("simmim", SWIN_T, PAPER, dict(window_size=16))),
    "ummae_swin_large_256": (
        "Swin-L, UM-MAE: position MLP 64 wide, 8-block decoder, 800 ep x 4096",
        _preset("ummae", SWIN_L, PAPER, dict(window_size=8, decoder_dim=512, decoder_depth=8,
                                              decoder_heads=16), train=dict(epochs=800))),
    "simmim_swin_large_256": (
        "Swin-L, SimMIM baseline: full image, window 16, 800 ep x 4096",
        _preset("simmim", SWIN_L, PAPER, dict(window_size=16), train=dict(epochs=800))),
    "ummae_pvt_small_256": (
        "PVT-S, UM-MAE: sin-cos positions before compaction, SR ratios 4-2-1-1 on the compact grid",
        _preset("ummae", PVT_S, PAPER, PAPER_DECODER)),
    "simmim_pvt_small_256": (
        "PVT-S, SimMIM baseline: full image, SR ratios 8-4-2-1, random 75% of 16 px units, L1",
        _preset("simmim", PVT_S, PAPER)),
    "mae_vit_base_224": (
        "ViT-B/16, plain MAE: random 75% masking, 224 px, MAE's 8-block decoder, 200 ep x 4096",
        _preset("mae", VIT_B, PAPER, dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
                data=dict(img_size=224))),
    "ummae_vit_base_224": (
        "ViT-B/16 with uniform masking + SM 0.25 (UM costs ViT nothing), 224 px, 200 ep x 4096",
        _preset("ummae", VIT_B, PAPER, dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
                data=dict(img_size=224))),
    "mae_hiera_tiny_224": (
        "timm's Hiera-T, MAE: 60% of 32 px mask units dropped by Hiera itself, multi-scale fusion, "
        "8-block decoder, 224 px, 200 ep x 4096",
        _preset("mae", HIERA_T, PAPER, dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
                masking=HIERA_MASKING, data=dict(img_size=224))),
    "mae_hiera_base_224": (
        "timm's Hiera-B, MAE: 60% of 32 px mask units, multi-scale fusion, 8-block decoder, 224 px",
        _preset("mae", HIERA_B, PAPER, dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
                masking=HIERA_MASKING, data=dict(img_size=224))),
    "ummae_swinv2_tiny_256": (
        "timm's Swin-V2-T (swinv2_tiny_window16_256), UM-MAE: its cpb_mlp at true offsets, window 8 "
        "on the compact grid, 200 ep x 4096",
        _preset("ummae", SWINV2_T, PAPER, PAPER_DECODER)),
    "simmim_swinv2_tiny_256": (
        "timm's Swin-V2-T, SimMIM baseline: full image, window 16, random 75% of 16 px units, L1",
        _preset("simmim", SWINV2_T, PAPER)),
    # ---- EMAE: K = 4 disjoint parts per image + self-consistency (see docs/emae.md) -------------
    # Same recipe as the method each extends; an epoch is still one pass over the images (each
    # image is used 4 times per step) and the lr rule counts images, not parts.
    "emae_vit_base_224": (
        "ViT-B/16, EMAE: 4 disjoint random parts per image (75% each) + self-consistency, 224 px",
        _preset("emae", VIT_B, PAPER, dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
                data=dict(img_size=224), emae=dict(parts="random"))),
    "emae_swin_tiny_256": (
        "Swin-T, UM-EMAE: each 2x2 block dealt to 4 uniform parts (SM 0.25 each) + self-consistency",
        _preset("emae", SWIN_T, PAPER, dict(window_size=8, **PAPER_DECODER), emae=dict(parts="uniform"))),
    "emae_pvt_small_256": (
        "PVT-S, UM-EMAE: 4 uniform parts per image on the compact grid + self-consistency",
        _preset("emae", PVT_S, PAPER, PAPER_DECODER, emae=dict(parts="uniform"))),
    "emae_swinv2_tiny_256": (
        "timm's Swin-V2-T, UM-EMAE: 4 uniform parts per image on the compact grid (window 8) + "
        "self-consistency",
        _preset("emae", SWINV2_T, PAPER, PAPER_DECODER, emae=dict(parts="uniform"))),
    # ---- tiny variants: CPU demos and tests ----------------------------------------------------
    "ummae_swin_demo": (
        "tiny Swin, UM-MAE on the built-in demo photographs, 128 px; about a minute on a 2-core CPU",
        _preset("ummae", SWIN_DEMO, DEMO, dict(window_size=4, **DEMO_DECODER))),
    "simmim_swin_demo": (
        "tiny Swin, SimMIM on the demo photographs, 128 px, window 8 on the full image",
        _preset("simmim", SWIN_DEMO, DEMO, dict(window_size=8))),
    "ummae_pvt_demo": (
        "tiny PVT, UM-MAE on the demo photographs, 128 px",
        _preset("ummae", PVT_DEMO, DEMO, DEMO_DECODER)),
    "simmim_pvt_demo": (
        "tiny PVT, SimMIM on the demo photographs, 128 px",
        _preset("simmim", PVT_DEMO, DEMO)),
    "mae_vit_demo": (
        "tiny ViT/16, MAE with random masking on the demo photographs, 128 px",
        _preset("mae", VIT_DEMO, DEMO, DEMO_DECODER)),
    "ummae_vit_demo": (
        "tiny ViT/16, MAE with uniform masking on the demo photographs, 128 px",
        _preset("ummae", VIT_DEMO, DEMO, DEMO_DECODER)),
    "ummae_swinv2_demo": (
        "tiny timm Swin V2, UM-MAE on the demo photographs, 128 px, window 4 on the compact grid",
        _preset("ummae", SWINV2_DEMO, DEMO, DEMO_DECODER)),
    "simmim_swinv2_demo": (
        "tiny timm Swin V2, SimMIM on the demo photographs, 128 px, window 8 on the full image",
        _preset("simmim", SWINV2_DEMO, DEMO)),
    "mae_hiera_demo": (
        "tiny timm Hiera, MAE with 60% of 32 px mask units on the demo photographs, 128 px",
        _preset("mae", HIERA_DEMO, DEMO, DEMO_DECODER, masking=HIERA_MASKING)),
    "emae_vit_demo": (
        "tiny ViT/16, EMAE with 4 disjoint random parts per image on the demo photographs, 128 px",
        _preset("emae", VIT_DEMO, DEMO, DEMO_DECODER, emae=dict(parts="random"))),
    "emae_swin_demo": (
        "tiny Swin, UM-EMAE (4 uniform parts per image) on the demo photographs, 128 px",
        _preset("emae", SWIN_DEMO, DEMO, dict(window_size=4, **DEMO_DECODER), emae=dict(parts="uniform"))),
    "emae_pvt_demo": (
        "tiny PVT, UM-EMAE (4 uniform parts per image) on the demo photographs, 128 px",
        _preset("emae", PVT_DEMO, DEMO, DEMO_DECODER, emae=dict(parts="uniform"))),
    "emae_swinv2_demo": (
        "tiny timm Swin V2, UM-EMAE (4 uniform parts per image) on the demo photographs, 128 px",
        _preset("emae", SWINV2_DEMO, DEMO, DEMO_DECODER, emae=dict(parts="uniform"))),
    "emae_hiera_demo": (
        "tiny timm Hiera, EMAE with 4 disjoint random parts of the 32 px mask units (75% each), 128 px",
        _preset("emae", HIERA_DEMO, DEMO, DEMO_DECODER, masking=dict(unit_size=32), emae=dict(parts="random"))),
}
PRESETS["demo"] = ("the default: " + PRESETS["ummae_swin_demo"][0], PRESETS["ummae_swin_demo"][1])


def register_preset(name: str, description: str, overrides: dict[str, Any]) -> None:
    """Add preset `name` (one line of `ummae presets`, then overrides on the defaults, as `PRESETS`
    holds them): how a backbone or method from outside the package ships its presets."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} exists already")
    PRESETS[name] = (description, copy.deepcopy(overrides))


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> PretrainConfig:
    """A fresh `PretrainConfig` for the named preset."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown preset '{name}' (--preset); {hint}available: {', '.join(PRESETS)} "
                          "(`ummae presets` describes them)")
    cfg = PretrainConfig(preset=name)
    return apply_overrides(cfg, copy.deepcopy(PRESETS[name][1]), f"preset '{name}'")
