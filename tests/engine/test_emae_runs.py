"""EMAE through the whole tool chain: config validation, presets, a tiny `ummae pretrain` run
(masks from the DataLoader workers, images counted, K parts in the picture), then bench, export,
k-NN, linear probe, fine-tuning and visualize on its checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import TINY_HIERA_SETS, TINY_MODELS, TINY_SETS, run_cli_captured, tiny_pretrain_args
from ummae.perf import run_benchmark
from ummae.cli import main
from ummae.resolve import resolve_config
from ummae.errors import ConfigError
from ummae.models.loading import load_backbone
from ummae.visualize import HEADER_HEIGHT, MIN_PANEL_WIDTH, PANEL_GAP

FAST = ["--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def emae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("emae") / "run"
    result = run_cli_captured(tiny_pretrain_args(run_dir, "--set", "method=emae"), run_dir)
    assert result.code == 0, result.err
    return result


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """DIR/<class>/*.png: 3 visibly different colours, 4 images each."""
    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 200)}.items():
        (root / name).mkdir()
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("preset,sets,match", [
    ("emae_swin_demo", ["emae.parts=random"], "needs model.arch vit"),
    ("emae_swin_demo", ["emae.parts=diagonal"], "emae.parts"),
    ("emae_swin_demo", ["emae.num_parts=2"], "must be 4"),
    ("emae_vit_demo", ["emae.num_parts=1"], ">= 2"),
    ("emae_swin_demo", ["emae.consistency_distance=cos"], "consistency_distance"),
    ("emae_swin_demo", ["emae.consistency_weight=-1"], "consistency_weight"),
    ("emae_swin_demo", ["emae.consistency_start_epoch=-1"], "consistency_start_epoch"),
])
def test_bad_emae_settings_name_their_key(preset, sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(preset, sets=sets)


def test_random_parts_must_divide_the_grid():
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_config("emae_vit_demo", sets=["emae.num_parts=3"])  # 8x8 = 64 units
    assert resolve_config("emae_vit_demo", sets=["emae.num_parts=8"]).emae.num_parts == 8


def test_presets_list_the_method(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("emae_vit_base_224", "emae_swin_tiny_256", "emae_pvt_small_256", "emae_swinv2_tiny_256",
                 "emae_vit_demo", "emae_swin_demo", "emae_pvt_demo", "emae_swinv2_demo", "emae_hiera_demo"):
        assert name in out
    assert "4 disjoint uniform parts + SM 0.25 + consistency" in out
    assert "4 disjoint random parts + consistency" in out


# ---------------------------------------------------------------- one tiny run


def test_run_counts_images_and_says_each_is_used_k_times(emae_run):
    assert "effective batch 4 images x 4 parts" in emae_run.out
    config = resolve_config(config_file=emae_run.run_dir / "config.yaml")
    assert config.method == "emae" and config.emae.parts == "uniform"
    # An epoch is one pass over the images: 8 demo crops / batch 4 = 2 steps per epoch.
    records = [json.loads(line) for line in (emae_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5]
    assert all(math.isfinite(r["loss"]) and r["images_per_sec"] > 0 for r in records)


def test_hiera_run_counts_images_and_exports_timms_hiera(tmp_path):
    """EMAE on timm's Hiera through the CLI: 64 px = 2x2 mask units of 32 px, 4 parts of one
    visible unit each; an epoch is still one pass over the images, and the export is timm's."""
    run_dir = tmp_path / "run"
    sets = [a for s in TINY_HIERA_SETS for a in ("--set", s)]
    result = run_cli_captured(tiny_pretrain_args(run_dir, "--preset", "emae_hiera_demo", *sets), run_dir)
    assert result.code == 0, result.err
    assert "effective batch 4 images x 4 parts" in result.out
    config = resolve_config(config_file=run_dir / "config.yaml")
    assert config.method == "emae" and config.model.arch == "hiera" and config.emae.parts == "random"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5]  # 8 images / batch 4: images, not parts
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run_dir / "reconstructions.png").exists()
    out = tmp_path / "enc.safetensors"
    res = run_cli_captured(["export", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out)], tmp_path)
    assert res.code == 0, res.err
    assert json.loads(out.with_suffix(".json").read_text())["model"].startswith("hiera_")


def test_reconstruction_picture_shows_the_k_parts_of_each_image(emae_run):
    picture = Image.open(emae_run.run_dir / "reconstructions.png")
    side = 64 * math.ceil(MIN_PANEL_WIDTH / 64)
    rows = 2 * 4  # train.vis_images=2 images x 4 parts
    assert picture.size[1] == HEADER_HEIGHT + rows * (side + PANEL_GAP) + PANEL_GAP
    # The 4 rows of one image show the same original but different masked inputs.
    pixels = np.asarray(picture)
    top = HEADER_HEIGHT + PANEL_GAP

    def panel(r, c):
        y, x = top + r * (side + PANEL_GAP), PANEL_GAP + c * (side + PANEL_GAP)
        return pixels[y:y + side, x:x + side]

    assert all(np.array_equal(panel(0, 0), panel(k, 0)) for k in range(1, 4))
    assert not np.array_equal(panel(0, 1), panel(1, 1))


def test_bench_counts_the_k_parts_in_the_flops_per_image():
    """Same ViT, same images: EMAE's encoder runs 4 part samples (each with MAE's 25% of the
    tokens) per image, so exactly 4x MAE's encoder FLOPs per image. (Swin's position-bias table
    is computed once per batch, so there it is a little under 4x.)"""
    preset, model_sets = TINY_MODELS["vit"]
    sets = [s for s in TINY_SETS if not s.startswith("model.")] + model_sets
    mae = resolve_config(preset, sets=sets)
    emae = resolve_config("emae_vit_demo", sets=sets)
    mae.preset, emae.preset = "mae", "emae"
    report = run_benchmark([mae, emae], batch_size=2, steps=1, warmup=0, device="cpu", matmul_n=64,
                           measure_memory=False)
    m, e = report["results"]
    assert e["batch_size"] == m["batch_size"] == 2  # images, not parts
    assert e["flops_per_image"] == pytest.approx(4 * m["flops_per_image"])
    assert e["images_per_s"] == pytest.approx(2 / e["step_time_s"])


def test_swinv2_um_emae_run_trains_and_exports_timms_swinv2(tmp_path):
    """UM-EMAE on timm's Swin V2 (`emae_swinv2_demo`): 4 uniform parts per image through the
    compact-image path in one batch of B x 4, then a plain `swinv2_*` export of the encoder."""
    run_dir = tmp_path / "run"
    res = run_cli_captured(["pretrain", "--preset", "emae_swinv2_demo", "--out", str(run_dir), "--no-progress",
                            "--max-steps", "2", "--batch-size", "2", "--set", "data.num_workers=0",
                            "--set", "data.demo_length=4", "--set", "train.vis_images=1",
                            "--set", "train.log_every=1"], run_dir)
    assert res.code == 0, res.err
    assert "effective batch 2 images x 4 parts" in res.out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    backbone, cfg = load_backbone(run_dir / "checkpoint.pt")
    assert (cfg.method, cfg.model.arch, cfg.emae.parts) == ("emae", "swinv2", "uniform")
    assert backbone.mask_token is None  # a full-image Swin V2 is timm's model as is
    out = tmp_path / "v2.safetensors"
    res = run_cli_captured(["export", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out)], tmp_path)
    assert res.code == 0, res.err
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["model"].startswith("swinv2_") and not card["needs_ummae"] and card["method"] == "emae"


def test_export_and_full_image_backbone_load_an_emae_checkpoint(emae_run, tmp_path):
    ckpt = emae_run.run_dir / "checkpoint.pt"
    backbone, cfg = load_backbone(ckpt)
    assert cfg.method == "emae" and backbone.window_size == 8  # compact window 4 -> full image 8
    assert backbone.forward_features(torch.randn(1, 3, 64, 64)).isfinite().all()
    out = tmp_path / "enc.safetensors"
    res = run_cli_captured(["export", "--checkpoint", str(ckpt), "--out", str(out)], tmp_path)
    assert res.code == 0, res.err
    assert json.loads(out.with_suffix(".json").read_text())["ummae_config"]["method"] == "emae"


def test_knn_linprobe_finetune_visualize_accept_an_emae_checkpoint(emae_run, labeled, tmp_path, capsys):
    ckpt = str(emae_run.run_dir / "checkpoint.pt")
    assert main(["knn", "--checkpoint", ckpt, "--data", str(labeled), "--k", "1", *FAST]) == 0
    assert main(["linprobe", "--checkpoint", ckpt, "--data", str(labeled), "--epochs", "1",
                 "--out", str(tmp_path / "probe"), *FAST]) == 0
    res = run_cli_captured(["finetune", "--no-progress", "--num-workers", "0", "--out", str(tmp_path / "ft"),
                            "--batch-size", "4", "--checkpoint", ckpt, "--data", str(labeled),
                            "--epochs", "1", "--no-augment"], tmp_path / "ft")
    assert res.code == 0, res.err
    image = str(next((labeled / "red").iterdir()))
    assert main(["visualize", "--checkpoint", ckpt, image, "--masks", "1", "--out", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert "4 rows" in out  # one mask draw = 4 parts
