"""timm's Swin V2 through the CLI: UM-MAE pre-training, an export that loads with timm alone,
fine-tuning and k-NN from it, and `--init-weights` from timm's own Swin V2 weights (issue 21,
item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tiny import run_cli_captured
from ummae.models.loading import load_backbone

# The smallest Swin V2 the compact image halves: 64 px, two stages of one block, window 4 (2 on
# the compact grid), 8 px units.
TINY_V2 = ("model.embed_dim=8", "model.depths=[1,1]", "model.num_heads=[1,1]", "model.window_size=4",
           "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2", "data.img_size=64",
           "masking.unit_size=8", "data.num_workers=0", "data.demo_length=8", "train.vis_images=2")

# A fresh interpreter that never imports ummae: only torch and timm.
TIMM_ONLY = textwrap.dedent("""
    import json, sys
    import timm, torch

    weights, card_file, out = sys.argv[1:]
    card = json.load(open(card_file))
    overlay = dict(file=weights)
    model = timm.create_model(card["model"], pretrained=True, pretrained_cfg_overlay=overlay, **card["model_args"])
    feats = timm.create_model(card["model"], pretrained=True, pretrained_cfg_overlay=overlay, features_only=True,
                              **card["model_args"])
    size = card["img_size"]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = {"features": model.eval().forward_features(x), "maps": feats.eval()(x)}
    assert not any(name == "ummae" or name.startswith("ummae.") for name in sys.modules), "ummae was imported"
    torch.save(result, out)
""")


def pretrain_args(out, *extra: str, preset: str = "ummae_swinv2_demo") -> list[str]:
    args = ["pretrain", "--no-progress", "--out", str(out), "--preset", preset, "--batch-size", "4",
            "--max-steps", "2"]
    for item in TINY_V2:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("swinv2")
    result = run_cli_captured(pretrain_args(root / "pre"), root / "pre")
    assert result.code == 0, result.err
    out = root / "export" / "v2.safetensors"
    result = run_cli_captured(["export", "--checkpoint", str(root / "pre"), "--out", str(out)], root)
    assert result.code == 0, result.err
    assert "load: import timm;" in result.out
    return root


def test_export_is_timms_swinv2_and_loads_without_ummae(run):
    from safetensors.torch import load_file

    import timm

    card = json.loads((run / "export" / "v2.json").read_text())
    assert card["model"].startswith("swinv2_") and card["model_args"]["window_size"] == 4
    weights = load_file(str(run / "export" / "v2.safetensors"))
    reference = timm.create_model(card["model"], **card["model_args"])
    assert weights.keys() == reference.state_dict().keys()  # no mask token, nothing of ummae's

    script = run / "timm_only.py"
    script.write_text(TIMM_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # ummae's sources out of reach
    proc = subprocess.run([sys.executable, str(script), str(run / "export" / "v2.safetensors"),
                           str(run / "export" / "v2.json"), str(run / "out.pt")],
                          env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(run / "out.pt", weights_only=True)

    backbone, cfg = load_backbone(run / "pre" / "checkpoint.pt")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got["features"], backbone.eval().forward_features(x))
    # timm's features_only Swin V2 gives its stage outputs as they are: NHWC, strides 4 and 8.
    assert [tuple(m.shape) for m in got["maps"]] == [(1, 16, 16, 8), (1, 8, 8, 16)]


def test_finetune_and_knn_from_the_checkpoint_and_from_the_export(run, tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 40, 40), "blue": (40, 40, 200)}.items():
        (data / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(data / name / f"{i}.png")
    for source in (run / "pre" / "checkpoint.pt", run / "export" / "v2.safetensors"):
        out = tmp_path / f"ft-{source.suffix[1:]}"
        result = run_cli_captured(["finetune", "--no-progress", "--checkpoint", str(source), "--data", str(data),
                                   "--out", str(out), "--epochs", "1", "--batch-size", "4", "--img-size", "64",
                                   "--workers", "0", "--no-augment"], out)
        assert result.code == 0, result.err
        assert (out / "last.pt").is_file()
    result = run_cli_captured(["knn", "--checkpoint", str(run / "pre" / "checkpoint.pt"), "--data", str(data),
                               "--k", "1", "--workers", "0", "--no-progress"], tmp_path)
    assert result.code == 0, result.err
    assert "top-1" in result.out


def test_init_weights_from_timms_swinv2_continue_pretraining(tmp_path):
    import timm
    from safetensors.torch import save_file

    from ummae.models.swinv2 import swinv2_timm_model
    from ummae.resolve import resolve_config

    cfg = resolve_config("ummae_swinv2_demo", sets=list(TINY_V2))
    name, args = swinv2_timm_model(cfg.model, 64)
    torch.manual_seed(7)
    source = timm.create_model(name, **dict(args, num_classes=3))
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "v2.safetensors"
    save_file(weights, str(path))
    out = tmp_path / "run"
    result = run_cli_captured(pretrain_args(out, "--init-weights", str(path), "--max-steps", "1",
                                            "--set", "optim.lr=1e-12", "--set", "optim.weight_decay=0"), out)
    assert result.code == 0, result.err
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for key, value in weights.items():
        if not key.startswith("head."):  # one step at lr 1e-12: still the given weights
            torch.testing.assert_close(trained[f"encoder.{key}"], value, atol=1e-8, rtol=0)
    # Negative control: a Swin V2 of other sizes is one line, exit 2.
    other = tmp_path / "other.pth"
    torch.save(timm.create_model(name, **dict(args, embed_dim=16)).state_dict(), other)
    result = run_cli_captured(pretrain_args(tmp_path / "bad", "--init-weights", str(other)), tmp_path / "bad")
    assert result.code == 2 and "does not hold weights of this Swin V2" in result.err
    assert "Traceback" not in result.err
