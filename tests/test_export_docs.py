"""docs/export.md runs as written: its `ummae export` command and every Python block, each on its
own (a reader copies one block, not the page), in a folder holding `runs/swin_t/checkpoint.pt` (a
tiny 4-stage UM-MAE Swin, so the feature maps have strides 4-32 like Swin-T's)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"
PRETRAIN = ["pretrain", "--no-progress", "--max-steps", "1", "--batch-size", "2", "--preset", "ummae_swin_demo",
            "--set", "data.img_size=64", "--set", "data.num_workers=0", "--set", "data.demo_length=2",
            "--set", "train.vis_images=1", "--set", "model.decoder_dim=16", "--set", "model.decoder_depth=1",
            "--set", "model.decoder_heads=2", "--set", "model.embed_dim=8", "--set", "model.window_size=2",
            "--set", "model.depths=[1,1,1,1]", "--set", "model.num_heads=[1,1,1,1]"]


# The page's Hiera section exports a real Hiera-T run (timm's hiera_tiny_224 keys): one step.
PRETRAIN_HIERA = ["pretrain", "--no-progress", "--max-steps", "1", "--batch-size", "2", "--preset",
                  "mae_hiera_tiny_224", "--accum-steps", "1", "--set", "data.num_workers=0", "--set", "data.demo_length=2",
                  "--set", "train.vis_images=1", "--set", "model.decoder_dim=16", "--set",
                  "model.decoder_depth=1", "--set", "model.decoder_heads=2"]


# The page's ViT section exports a tiny ViT run (timm's vit_* keys): one step at 64 px.
PRETRAIN_VIT = ["pretrain", "--no-progress", "--max-steps", "1", "--batch-size", "2", "--preset", "ummae_vit_demo",
                "--set", "data.img_size=64", "--set", "data.num_workers=0", "--set", "data.demo_length=2",
                "--set", "train.vis_images=1", "--set", "model.decoder_dim=16", "--set", "model.decoder_depth=1",
                "--set", "model.decoder_heads=2", "--set", "model.embed_dim=16", "--set", "model.num_heads=[2]"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_page_has_the_blocks_this_test_runs():
    # Negative control: the extraction finds the blocks (a renamed fence would skip them silently).
    python = blocks("python")
    assert len(python) >= 4
    assert any("create_exported" in b for b in python) and any("FasterRCNN" in b for b in python)
    assert any(line.startswith("ummae export") for b in blocks("bash") for line in b.splitlines())


def test_export_md_runs_as_written(tmp_path, run_cli, monkeypatch):
    res = run_cli([*PRETRAIN, "--out", str(tmp_path / "runs" / "swin_t")], tmp_path)
    assert res.code == 0, res.err
    res = run_cli([*PRETRAIN_HIERA, "--out", str(tmp_path / "runs" / "hiera_t")], tmp_path)
    assert res.code == 0, res.err
    res = run_cli([*PRETRAIN_VIT, "--out", str(tmp_path / "runs" / "vit_b")], tmp_path)
    assert res.code == 0, res.err
    monkeypatch.chdir(tmp_path)
    for block in blocks("bash"):
        for line in block.splitlines():
            if line.startswith("ummae export"):
                res = run_cli(shlex.split(line)[1:], tmp_path)
                assert res.code == 0, res.err
    assert (tmp_path / "exports" / "swin_t_ummae.safetensors").is_file()
    assert (tmp_path / "exports" / "hiera_t.safetensors").is_file()
    assert (tmp_path / "exports" / "vit_b.safetensors").is_file()

    torch.manual_seed(0)
    namespace: dict = {}  # what the blocks made, for the checks below
    for block in blocks("python"):
        alone: dict = {"__name__": "export_md"}  # a fresh namespace: a block that needs another's names fails
        exec(compile(block, str(DOC), "exec"), alone)  # noqa: S102 - our own documentation
        namespace.update(alone)

    # The blocks that say they run without ummae do, in a process where `import ummae` fails.
    alone = [b for b in blocks("python") if b.startswith("# runs without ummae")]
    assert len(alone) == 3  # timm's own Swin, ViT, Hiera
    for block in alone:
        code = "import sys; sys.modules['ummae'] = None\n" + block
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    assert namespace["swin"].default_cfg["architecture"].startswith("swin_")
    assert namespace["swin_clf"].num_classes == 10
    assert namespace["vit"].default_cfg["architecture"].startswith("vit_") and namespace["vit_clf"].num_classes == 10
    assert namespace["vit_maps"].feature_info.reduction() == [16, 16, 16]

    # What the blocks promise.
    assert namespace["card"]["model"] == "ummae_swin"
    assert namespace["clf"].num_classes == 100 and namespace["clf"].default_cfg["architecture"] == "hiera_tiny_224"
    assert namespace["classifier"].num_classes == 1000
    maps = namespace["maps"]
    assert [tuple(m.shape[-2:]) for m in maps] == [(-(-800 // s), -(-1333 // s)) for s in (4, 8, 16, 32)]
    assert namespace["body"].feature_info.reduction() == [4, 8, 16, 32]
    assert namespace["detector"].backbone.out_channels == 256
    fx_maps = namespace["fx_maps"]
    assert [m.shape[1:3] for m in fx_maps] == [(256 // s, 256 // s) for s in (4, 8, 16, 32)]  # NHWC
