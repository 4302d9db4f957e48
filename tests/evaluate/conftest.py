"""Tiny pre-training checkpoints of every backbone, made once per session with `ummae pretrain`.

Swin is the shared `tiny_run`; PVT and ViT are their demo presets shrunk to one block per stage
at 64 px and trained for a single step: enough for real checkpoints, a second or so each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_ARCH_SETS = {
    "pvt": ("ummae_pvt_demo", ["model.embed_dims=[8,8,8,8]", "model.depths=[1,1,1,1]",
                               "model.num_heads=[1,1,1,1]", "model.mlp_ratios=[1,1,1,1]"]),
    "vit": ("mae_vit_demo", ["model.embed_dim=16", "model.depths=[1]", "model.num_heads=[1]",
                             "model.mlp_ratio=1.0", "masking.unit_size=16"]),  # ViT: one unit = one 16 px patch
}


@pytest.fixture(scope="session")
def arch_checkpoints(tiny_run, tiny_args, run_cli, tmp_path_factory) -> dict[str, Path]:
    """`{"swin" | "pvt" | "vit": checkpoint path}` of tiny 64 px pre-training runs."""
    checkpoints = {"swin": tiny_run.run_dir / "checkpoint.pt"}
    root = tmp_path_factory.mktemp("arch_checkpoints")
    for arch, (preset, sets) in TINY_ARCH_SETS.items():
        extra = ["--preset", preset, "--max-steps", "1"]
        for item in sets:
            extra += ["--set", item]
        result = run_cli(tiny_args(root / arch, *extra), root / arch)
        assert result.code == 0, result.err
        checkpoints[arch] = root / arch / "checkpoint.pt"
    return checkpoints
