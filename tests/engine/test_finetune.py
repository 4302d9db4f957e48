"""`ummae finetune` end to end on tiny checkpoints and a tiny labeled folder, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny import run_cli_captured
from ummae.engine.finetune import FinetuneConfig, recipe_defaults
from ummae.models.classifier import encoder_source, load_finetuned
from ummae.models.loading import load_backbone

METRIC_KEYS = {"epoch", "step", "loss", "lr", "val_loss", "val_top1", "val_top5"}
COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}

def _colour_images(folder: Path, per_class: int, rng, classes=COLOURS) -> Path:
    for name, rgb in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (40, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def labeled(tmp_path_factory) -> dict[str, Path]:
    """3 colour classes: train (6 per class), val (2 per class), and folders that are wrong."""
    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    flat = root / "flat"
    flat.mkdir()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(flat / "a.png")
    return {"train": _colour_images(root / "train", 6, rng), "val": _colour_images(root / "val", 2, rng),
            "other_val": _colour_images(root / "other_val", 2, rng, {"cyan": (0, 200, 200), "red": (220, 30, 30)}),
            "flat": flat}


def finetune_cli(out: Path, *args: str):
    return run_cli_captured(["finetune", "--no-progress", "--num-workers", "0", "--out", str(out),
                             "--batch-size", "4", *args], out)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- end to end


def test_swin_finetune_end_to_end(tmp_path, checkpoints, labeled):
    out = tmp_path / "run"
    res = finetune_cli(out, "--checkpoint", str(checkpoints["swin"]), "--data", str(labeled["train"]),
                       "--val-data", str(labeled["val"]), "--epochs", "2", "--no-augment")
    assert res.code == 0, res.err
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [4, 8]
    for r in records:
        assert set(r) == METRIC_KEYS
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100
    assert records[-1]["lr"] == pytest.approx(1e-6)  # the cosine ends at --min-lr
    assert "epoch 2/2" in res.out and "best val top-1" in res.out
    assert "ETA" in res.out and "\r" not in res.out + res.err  # not a terminal: plain lines, no bar
    assert "ummae finetune: effective batch 4 (4 x 1 accumulation step(s) x 1 process(es)), peak lr 7.81e-06" in res.out
    # the default 5-epoch warm-up is longer than this 2-epoch run: one line says so
    warned = [line for line in res.err.splitlines() if "warm-up" in line]
    assert len(warned) == 1 and "--warmup-epochs 0.4" in warned[0], res.err
    for name in ("best.pt", "last.pt", "config.yaml"):
        assert (out / name).is_file()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["classes"] == ["blue", "green", "red"]
    assert config["resolved"]["layer_decay"] == 0.85 and config["resolved"]["mixup"] == 0.0
    assert config["resolved"]["lr"] == pytest.approx(5e-4 * 4 / 256)

    model, classes = load_finetuned(out / "best.pt")
    assert classes == ["blue", "green", "red"] and model.encoder.window_size == 8
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    # A fine-tuned checkpoint is an encoder source like a pre-training one.
    backbone, _ = load_backbone(out / "last.pt")
    _, pretrained = encoder_source(checkpoints["swin"])
    tuned = backbone.state_dict()
    assert tuned.keys() == pretrained.keys()
    assert not torch.equal(tuned["stages.0.blocks.0.attn.qkv.weight"], pretrained["stages.0.blocks.0.attn.qkv.weight"])


def test_a_run_that_stays_at_chance_says_what_to_try(tmp_path, checkpoints, labeled):
    out = tmp_path / "chance"
    res = finetune_cli(out, "--checkpoint", str(checkpoints["swin"]), "--data", str(labeled["train"]),
                       "--val-data", str(labeled["val"]), "--epochs", "3", "--no-augment", "--blr", "1e-12",
                       "--warmup-epochs", "0")
    assert res.code == 0, res.err
    warned = [line for line in res.err.splitlines() if "uniform guess" in line]
    assert len(warned) == 1 and "log(3 classes) = 1.099" in warned[0] and "--blr" in warned[0], res.err
    assert "warm-up" not in res.err  # 0 epochs of warm-up: nothing to say


def test_warmup_and_chance_warnings_fire_only_when_due():
    from ummae.engine.finetune import chance_warning, warmup_warning

    assert warmup_warning(5, steps_per_epoch=4, total_steps=8) is not None
    assert warmup_warning(2, steps_per_epoch=4, total_steps=8) is not None  # equal: not shorter
    assert warmup_warning(1, steps_per_epoch=4, total_steps=8) is None
    assert warmup_warning(0, steps_per_epoch=4, total_steps=1) is None
    log3 = 1.0986
    assert chance_warning(log3, 3, epoch=3) is not None
    assert chance_warning(0.5, 3, epoch=3) is None  # learning
    assert chance_warning(log3, 3, epoch=2) is None and chance_warning(log3, 3, epoch=4) is None  # said once


def test_pvt_recursive_mix_with_augmentation_and_a_split(tmp_path, checkpoints, labeled):
    out = tmp_path / "rm"
    res = finetune_cli(out, "--checkpoint", str(checkpoints["pvt"]), "--data", str(labeled["train"]),
                       "--val-fraction", "0.34", "--epochs", "2", "--recursive-mix", "--mixup", "0.8")
    assert res.code == 0, res.err
    records = metrics(out)
    assert len(records) == 2 and all(set(r) == METRIC_KEYS for r in records)
    assert "RecursiveMix" in res.out and "mixup/cutmix off" in res.out
    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    assert resolved["mixup"] == resolved["cutmix"] == 0.0 and resolved["re_prob"] == 0.25
    assert "12 train / 6 val images" in res.out
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()


def test_vit_mixup_at_another_size_and_max_steps(tmp_path, checkpoints, labeled):
    out = tmp_path / "vit"
    res = finetune_cli(out, "--checkpoint", str(checkpoints["vit"]), "--data", str(labeled["train"]),
                       "--val-data", str(labeled["val"]), "--no-augment", "--mixup", "0.8", "--cutmix", "1.0",
                       "--img-size", "32", "--max-steps", "3")
    assert res.code == 0, res.err
    assert metrics(out)[-1]["step"] == 3
    assert "mixup 0.8 cutmix 1.0" in res.out
    model, _ = load_finetuned(out / "best.pt")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_init_random_trains_the_same_architecture_from_scratch(tmp_path, checkpoints, labeled):
    out = tmp_path / "scratch"
    res = finetune_cli(out, "--checkpoint", str(checkpoints["swin"]), "--data", str(labeled["train"]),
                       "--val-data", str(labeled["val"]), "--no-augment", "--init-random", "--max-steps", "1")
    assert res.code == 0, res.err
    weights = torch.load(out / "best.pt", weights_only=True)["model"]
    _, pretrained = encoder_source(checkpoints["swin"])
    assert weights.keys() >= {f"encoder.{k}" for k in pretrained}
    key = "patch_embed.proj.weight"
    assert weights[f"encoder.{key}"].shape == pretrained[key].shape
    assert not torch.allclose(weights[f"encoder.{key}"], pretrained[key], atol=1e-3)
    assert "random init" in res.out


def test_recipe_defaults_follow_the_architecture(checkpoints):
    vit_cfg, _ = encoder_source(checkpoints["vit"])
    swin_cfg, _ = encoder_source(checkpoints["swin"])
    base = FinetuneConfig(checkpoint="x", data="y")
    assert recipe_defaults(base, vit_cfg)["layer_decay"] == 0.8
    swin = recipe_defaults(base, swin_cfg)
    assert (swin["layer_decay"], swin["drop_path"], swin["mixup"], swin["cutmix"], swin["re_prob"],
            swin["img_size"]) == (0.85, 0.1, 0.8, 1.0, 0.25, 64)
    swin_cfg.model.embed_dim = 192  # Swin-L width
    assert (recipe_defaults(base, swin_cfg)["layer_decay"], recipe_defaults(base, swin_cfg)["drop_path"]) == (0.7, 0.2)
    quiet = recipe_defaults(FinetuneConfig(checkpoint="x", data="y", augment=False, mixup=0.5), swin_cfg)
    assert (quiet["mixup"], quiet["cutmix"], quiet["re_prob"]) == (0.5, 0.0, 0.0)  # explicit flags win
    rm = recipe_defaults(FinetuneConfig(checkpoint="x", data="y", recursive_mix=True, mixup=0.5), swin_cfg)
    assert rm["mixup"] == rm["cutmix"] == 0.0


# ---------------------------------------------------------------- bad input: one line, exit 2


@pytest.mark.parametrize("case, expected", [
    ("missing_checkpoint", "does not exist"),
    ("missing_safetensors", "does not exist"),
    ("junk_checkpoint", "junk.pt"),
    ("no_class_folders", "class folders"),
    ("val_classes_differ", "differ from training classes"),
    ("both_val_options", "not both"),
    ("odd_batch_with_mixup", "even --batch-size"),
    ("too_few_images", "fewer than one optimizer step"),
    ("bad_value", "--rm-alpha"),
    ("bad_policy", "--auto-augment 'rand-everything'"),
    ("bad_flip", "--hflip"),
    ("bad_crop_scale", "--min-crop-scale"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, checkpoints, labeled, case, expected):
    ckpt, data = str(checkpoints["swin"]), str(labeled["train"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    args = {
        "missing_checkpoint": ["--checkpoint", str(tmp_path / "nope.pt"), "--data", data],
        "missing_safetensors": ["--checkpoint", str(tmp_path / "encoder.safetensors"), "--data", data],
        "junk_checkpoint": ["--checkpoint", str(junk), "--data", data],
        "no_class_folders": ["--checkpoint", ckpt, "--data", str(labeled["flat"])],
        "val_classes_differ": ["--checkpoint", ckpt, "--data", data, "--val-data", str(labeled["other_val"])],
        "both_val_options": ["--checkpoint", ckpt, "--data", data, "--val-data", str(labeled["val"]),
                             "--val-fraction", "0.2"],
        "odd_batch_with_mixup": ["--checkpoint", ckpt, "--data", data, "--batch-size", "3"],
        "too_few_images": ["--checkpoint", ckpt, "--data", data, "--batch-size", "64"],
        "bad_value": ["--checkpoint", ckpt, "--data", data, "--recursive-mix", "--rm-alpha", "2"],
        "bad_policy": ["--checkpoint", ckpt, "--data", data, "--auto-augment", "rand-everything"],
        "bad_flip": ["--checkpoint", ckpt, "--data", data, "--hflip", "1.5"],
        "bad_crop_scale": ["--checkpoint", ckpt, "--data", data, "--min-crop-scale", "0"],
    }[case]
    out = tmp_path / "run"
    res = finetune_cli(out, *args)
    assert res.code == 2, (res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ummae finetune: error:"), res.err
    assert expected in lines[0], lines[0]
    assert not (out / "best.pt").exists()


# ---------------------------------------------------------------- DDP


def test_two_gloo_processes_train_like_one_with_the_same_effective_batch(tmp_path, checkpoints, labeled):
    """torchrun, 2 CPU processes x batch 2 == 1 process x batch 4: same samples per step, same losses."""
    import os
    import subprocess
    import sys

    common = ["--checkpoint", str(checkpoints["swin"]), "--data", str(labeled["train"]),
              "--val-data", str(labeled["val"]), "--no-augment", "--drop-path", "0", "--smoothing", "0",
              "--max-steps", "3", "--blr", "0.5", "--device", "cpu"]
    single = finetune_cli(tmp_path / "single", *common)
    assert single.code == 0, single.err
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ummae",
         "finetune", "--no-progress", "--num-workers", "0", "--out", str(tmp_path / "ddp"), "--batch-size", "2",
         *common],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [3]
    for key in ("loss", "val_loss", "val_top1", "val_top5", "lr"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-4, abs=1e-5), key
    w1 = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=5e-5)


def test_augmentation_options_shape_the_training_transform():
    """--auto-augment none / --hflip / --min-crop-scale: exactly the named steps change; the
    defaults are the recipe's (RandAugment, flips, crops of 8-100%)."""
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import ColorJitter, RandomHorizontalFlip

    from ummae.engine.finetune import finetune_transforms

    def steps(**options):
        train, _ = finetune_transforms(32, True, 0.0, **options)
        return {type(t): t for t in train.transforms}

    recipe = steps()
    assert RandAugment in recipe and recipe[RandomHorizontalFlip].p == 0.5
    assert recipe[RandomResizedCropAndInterpolation].scale == (0.08, 1.0)
    light = steps(auto_augment="none", hflip=0.0, min_crop_scale=0.4)
    assert RandAugment not in light and ColorJitter not in light  # no policy, and no fallback jitter
    assert RandomHorizontalFlip not in light
    assert light[RandomResizedCropAndInterpolation].scale == (0.4, 1.0)
    # nothing left to draw (a square image, whole-image crops, no flip, no policy): the training
    # transform is the evaluation one
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    train, evaluation = finetune_transforms(32, True, 0.0, auto_augment="none", hflip=0.0, min_crop_scale=1.0)
    for seed in range(5):
        torch.manual_seed(seed)
        assert torch.equal(train(img), evaluation(img))


def test_randaugment_survives_its_strongest_magnitudes():
    """Every RandAugment op at the highest magnitude the recipe can draw works on a real image
    (without the cap at 9, posterize at 10 keeps 0 bits and Pillow >= 13 raises)."""
    from timm.data.auto_augment import rand_augment_transform

    from ummae.engine.finetune import AUTO_AUGMENT

    augment = rand_augment_transform(AUTO_AUGMENT, {"translate_const": 20, "img_mean": (124, 116, 104)})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for op in augment.ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        op.magnitude = op.magnitude_max or 10  # the upper bound of the sampled magnitude
        assert op(img).size == img.size, op.name


def test_hiera_finetune_with_timms_layer_groups(tmp_path, checkpoints, labeled):
    out = tmp_path / "hiera"
    res = finetune_cli(out, "--checkpoint", str(checkpoints["hiera"]), "--data", str(labeled["train"]),
                       "--val-data", str(labeled["val"]), "--max-steps", "2", "--layer-decay", "0.5")
    assert res.code == 0, res.err
    assert yaml.safe_load((out / "config.yaml").read_text())["resolved"]["layer_decay"] == 0.5
    model, classes = load_finetuned(out / "last.pt")
    assert model.is_hiera and model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    _, pretrained = encoder_source(checkpoints["hiera"])
    tuned = load_backbone(out / "last.pt")[0].state_dict()
    assert tuned.keys() == pretrained.keys()
    assert not torch.equal(tuned["blocks.3.attn.qkv.weight"], pretrained["blocks.3.attn.qkv.weight"])


@pytest.mark.parametrize("arch", ["swin", "vit"])
@pytest.mark.parametrize("fmt", ["timm", "ummae"])
def test_finetune_starts_from_either_export_format(tmp_path, checkpoints, labeled, arch, fmt):
    """`ummae export` writes timm's own `swin_*` / `vit_*` (default) or `ummae_swin` / `ummae_vit`:
    finetune takes both, from the same encoder weights as the checkpoint (timm's format carries
    the ummae-only tensors, Swin's coordinate MLPs and the mask token, in its metadata)."""
    from ummae.export import export_backbone

    weights = tmp_path / f"{arch}_{fmt}.safetensors"
    result = export_backbone(checkpoints[arch], weights, format=fmt)
    assert result.model.startswith(f"{arch}_" if fmt == "timm" else f"ummae_{arch}")
    _, from_export = encoder_source(weights)
    _, from_ckpt = encoder_source(checkpoints[arch])
    assert from_export.keys() == from_ckpt.keys()
    assert all(torch.equal(from_export[k], from_ckpt[k]) for k in from_ckpt)
    out = tmp_path / "run"
    res = finetune_cli(out, "--checkpoint", str(weights), "--data", str(labeled["train"]),
                       "--epochs", "1", "--max-steps", "1", "--no-augment")
    assert res.code == 0, res.err
    assert (out / "last.pt").is_file()
