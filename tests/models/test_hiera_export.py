"""A Hiera run exports plain timm `hiera_*` weights that load without ummae, and timm Hiera
weights start a Hiera run (`--init-weights`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tiny import TINY_HIERA_SETS, run_cli_captured
from ummae.config import config_to_dict
from ummae.resolve import resolve_config
from ummae.engine.checkpoint import save_checkpoint
from ummae.models import build_pretrain_model
from ummae.models.loading import load_backbone

# Runs in a fresh interpreter that never imports ummae: only torch and timm.
TIMM_ONLY = textwrap.dedent("""
    import json, sys
    import timm, torch

    tiny_file, demo_file, demo_card, out = sys.argv[1:]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    overlay = dict(file=tiny_file)
    by_name = timm.create_model("hiera_tiny_224", pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    mae_tag = timm.create_model("hiera_tiny_224.mae", pretrained=True, pretrained_cfg_overlay=overlay)
    finetune = timm.create_model("hiera_tiny_224", pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay)
    feats = timm.create_model("hiera_tiny_224.mae", pretrained=True, features_only=True, pretrained_cfg_overlay=overlay)
    card = json.load(open(demo_card))
    demo = timm.create_model(card["model"], pretrained=True, pretrained_cfg_overlay=dict(file=demo_file),
                             **card["model_args"])
    size = card["img_size"]
    y = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = {
            "by_name": by_name.eval().forward_features(x), "mae_tag": mae_tag.eval().forward_features(x),
            "logits": finetune.eval()(x), "maps": feats.eval()(x), "demo": demo.eval().forward_features(y),
            "finetune_blocks_equal": all(torch.equal(a, b) for a, b in zip(finetune.blocks.state_dict().values(),
                                                                       by_name.blocks.state_dict().values())),
        }
    assert not any(name == "ummae" or name.startswith("ummae.") for name in sys.modules), "ummae was imported"
    torch.save(result, out)
""")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoints):
    """Exports of a (never trained) mae_hiera_tiny_224 checkpoint and of the tiny Hiera run."""
    root = tmp_path_factory.mktemp("hiera_export")
    cfg = resolve_config("mae_hiera_tiny_224")
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    save_checkpoint(root / "tiny.pt", {"model": model.state_dict(), "config": config_to_dict(cfg), "step": 0})
    for name, ckpt in (("tiny", root / "tiny.pt"), ("demo", checkpoints["hiera"])):
        out = root / f"{name}.safetensors"
        result = run_cli_captured(["export", "--checkpoint", str(ckpt), "--out", str(out)], root)
        assert result.code == 0, result.err
    return root, {"tiny": root / "tiny.pt", "demo": checkpoints["hiera"]}


def test_export_is_plain_timm_hiera_that_loads_without_ummae(exports):
    root, ckpts = exports
    card = json.loads((root / "tiny.json").read_text())
    assert card["model"] == "hiera_tiny_224.mae"
    script = root / "timm_only.py"
    script.write_text(TIMM_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # ummae's sources out of reach
    proc = subprocess.run([sys.executable, str(script), str(root / "tiny.safetensors"), str(root / "demo.safetensors"),
                           str(root / "demo.json"), str(root / "out.pt")], env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(root / "out.pt", weights_only=True)

    backbone, _ = load_backbone(ckpts["tiny"])  # the pre-trained encoder, as ummae rebuilds it
    backbone.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone.forward_features(x)
        maps = backbone.forward_intermediates(x, intermediates_only=True)
    assert torch.equal(got["by_name"], expected) and torch.equal(got["mae_tag"], expected)
    # features_only: the four stage maps, NCHW, strides 4..32.
    assert [tuple(m.shape) for m in got["maps"]] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14),
                                                    (1, 768, 7, 7)]
    assert all(torch.equal(a, b) for a, b in zip(got["maps"], maps))
    # Fine-tuning with a new head: the encoder loads, the head is new.
    assert got["logits"].shape == (1, 5) and got["finetune_blocks_equal"]

    demo, cfg = load_backbone(ckpts["demo"])
    y = torch.randn(1, 3, cfg.data.img_size, cfg.data.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got["demo"], demo.eval().forward_features(y))


def test_export_holds_exactly_timms_keys(exports):
    from safetensors.torch import load_file

    import timm

    root, _ = exports
    weights = load_file(str(root / "tiny.safetensors"))
    assert weights.keys() == timm.create_model("hiera_tiny_224", num_classes=0).state_dict().keys()
    assert not any(k.startswith(("fusion", "decoder")) for k in weights)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_init_weights_from_a_timm_hiera_continue_pretraining(tmp_path, fmt):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    source = timm.create_model("hiera_tiny_224", num_classes=0, img_size=64, embed_dim=8, stages=(1, 1, 1, 1))
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"hiera.{fmt}"
    if fmt == "pth":
        torch.save({"model_state": weights}, path)  # the official checkpoints' wrapper
    else:
        save_file(weights, str(path))
    out = tmp_path / "run"
    args = ["pretrain", "--no-progress", "--out", str(out), "--preset", "mae_hiera_demo", "--batch-size", "4",
            "--max-steps", "1", "--init-weights", str(path), "--set", "optim.lr=1e-12",
            "--set", "optim.weight_decay=0"]
    for item in (*TINY_HIERA_SETS, "data.img_size=64", "data.num_workers=0", "data.demo_length=8",
                 "train.vis_images=1"):
        args += ["--set", item]
    result = run_cli_captured(args, out)
    assert result.code == 0, result.err
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for key, value in weights.items():  # one step at lr 1e-12: still the given weights
        torch.testing.assert_close(trained[f"encoder.{key}"], value, atol=1e-8, rtol=0)
    # Negative control: the seeded fresh initialisation is far from them.
    torch.manual_seed(0)
    fresh = build_pretrain_model(resolve_config("mae_hiera_demo", sets=[*TINY_HIERA_SETS, "data.img_size=64"]))
    assert not torch.allclose(fresh.encoder.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])


def test_init_weights_of_another_hiera_is_a_one_line_error(tmp_path):
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("hiera_tiny_224", num_classes=0, img_size=64, embed_dim=16,
                                 stages=(1, 1, 1, 1)).state_dict(), path)
    args = ["pretrain", "--no-progress", "--out", str(tmp_path / "run"), "--preset", "mae_hiera_demo",
            "--max-steps", "1", "--batch-size", "4", "--init-weights", str(path)]
    for item in (*TINY_HIERA_SETS, "data.img_size=64", "data.num_workers=0", "data.demo_length=8"):
        args += ["--set", item]
    result = run_cli_captured(args, tmp_path / "run")
    assert result.code == 2
    assert "does not hold weights of this Hiera: shape of" in result.err and "Traceback" not in result.err
