"""A backbone and a method from outside the package (#19): both are defined and registered in this
file alone, nothing in `ummae` knows them, and `pretrain`, resume, `export`, `bench` and `knn` run
on them through the command line. docs/architecture.md follows this file as its recipes.

The backbone, `toynet`: patches -> one residual MLP per token -> LayerNorm, with its own config
option `model.toy_hidden_dim`. The method, `toymim`: random masks, the visible tokens scattered
to their units (a learned token elsewhere), a linear map to pixels, and its own objective (a
smooth-L1 on the masked units) whose weight halves from epoch 1 on (`set_epoch`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from tiny import run_cli_captured
from ummae.config import config_to_dict
from ummae.errors import ConfigError
from ummae.export import create_exported
from ummae.masking import MaskSample, RandomMasking
from ummae.models.loading import load_backbone
from ummae.models.method import MaskedImageModel
from ummae.models.specs import (BackboneSpec, ClassifierLayout, MethodSpec, register_backbone,
                                register_method)
from ummae.objectives import patchify
from ummae.presets import PRESETS, register_preset
from ummae.resolve import resolve_config


# ================================================================ a backbone: the model ...

class ToyPatchNet(nn.Module):
    """`[B, 3, H, W]` -> `[B, H/p, W/p, C]` (full images); masked: the visible units' tokens
    `[B, N_vis, C]` in `ids_keep` order (one mask unit = one patch)."""

    def __init__(self, patch_size: int = 8, embed_dim: int = 16, hidden_dim: int = 32, num_classes: int = 0,
                 **timm_kwargs):  # timm's builder passes in_chans and the like
        super().__init__()
        self.patch_size = self.stride = patch_size
        self.num_features = embed_dim
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module="norm")]
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def _block(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens + self.mlp(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._block(self.proj(x).permute(0, 2, 3, 1))  # [B, h, w, C]

    def forward_masked(self, imgs: torch.Tensor, masks: MaskSample, unit: int) -> torch.Tensor:
        tokens = self.proj(imgs).flatten(2).transpose(1, 2)  # [B, L, C]
        index = masks.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return self._block(tokens.gather(1, index))  # [B, N_vis, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(1, 2)))


# ... its timm name (what `ummae export` writes and `timm.create_model` rebuilds) ...

default_cfgs = generate_default_cfgs({"toy_patchnet": dict(num_classes=0, input_size=(3, 32, 32))})


@register_model
def toy_patchnet(pretrained: bool = False, **kwargs) -> ToyPatchNet:
    return build_model_with_cfg(ToyPatchNet, "toy_patchnet", pretrained, **kwargs)


# ... and its registration

def _toy_args(cfg) -> dict:
    m = cfg.model
    return dict(patch_size=m.patch_size, embed_dim=m.embed_dim, hidden_dim=m.option("toy_hidden_dim"))


register_backbone(BackboneSpec(
    name="toynet", encoder_class=ToyPatchNet, build=lambda cfg: ToyPatchNet(**_toy_args(cfg)),
    classifier=ClassifierLayout(feature_map=lambda encoder, feats, x: feats.permute(0, 3, 1, 2),
                                group_matcher=lambda coarse: dict(stem=r"^encoder\.proj", blocks=r"^encoder\.mlp"),
                                num_blocks=lambda encoder: 1),
    mask_token=False, timm_model=lambda cfg: ("toy_patchnet", _toy_args(cfg)),
    options={"toy_hidden_dim": 32}))


# ================================================================ a method: its objective ...

def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 over the masked units only (`pred`, `target` `[B, L, D]`, `mask` `[B, L]`)."""
    per_unit = F.smooth_l1_loss(pred, target, reduction="none").mean(dim=-1)  # [B, L]
    return (per_unit * mask).sum() / mask.sum().clamp(min=1)


# ... the model ...

class ToyMIM(MaskedImageModel):
    """Visible tokens to their units, a learned token elsewhere, a linear map to pixels."""

    norm_pix_loss = False

    def __init__(self, encoder: nn.Module, img_size: int, unit: int, mask_ratio: float):
        super().__init__()
        self.img_size, self.unit = (img_size, img_size), unit
        self.grid_size = (img_size // unit, img_size // unit)
        self.masking = RandomMasking(self.grid_size, mask_ratio)
        self.encoder = encoder
        self.hidden = nn.Parameter(torch.zeros(encoder.num_features))
        self.pred = nn.Linear(encoder.num_features, unit * unit * 3)
        self.weight = 1.0

    def set_epoch(self, epoch: float) -> None:
        self.weight = 1.0 if epoch < 1 else 0.5

    def forward_encoder(self, imgs: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        return self.encoder.forward_masked(imgs, masks, self.unit)  # [B, N_vis, C]

    def forward_decoder(self, features: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        B, L = masks.mask.shape
        grid = self.hidden.to(features.dtype).expand(B, L, -1).clone()  # [B, L, C]
        grid.scatter_(1, masks.ids_keep.unsqueeze(-1).expand_as(features), features)
        return self.pred(grid)  # [B, L, unit*unit*3]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.weight * masked_smooth_l1(pred.float(), patchify(imgs, self.unit).float(), mask)


# ... and its registration

def _validate_toymim(cfg, backbone) -> None:
    if backbone.needs_uniform_masks:
        raise ConfigError(f"method toymim draws random masks; model.arch {backbone.name} needs uniform ones")


register_method(MethodSpec(
    name="toymim", validate=_validate_toymim, uniform_masks=lambda cfg: False,
    build=lambda cfg, backbone, encoder: ToyMIM(encoder, cfg.data.img_size, cfg.masking.unit_size,
                                                cfg.masking.mask_ratio),
    describe_masking=lambda cfg: f"random {cfg.masking.mask_ratio:.0%}, {cfg.masking.unit_size}px units"))


# ================================================================ a preset

TOY_PRESET = {
    "method": "toymim",
    "model": dict(arch="toynet", patch_size=8, embed_dim=16, depths=[1], num_heads=[1], toy_hidden_dim=24,
                  decoder_dim=16, decoder_depth=1, decoder_heads=2),
    "masking": dict(unit_size=8, mask_ratio=0.5),
    "data": dict(img_size=32, demo_length=8, num_workers=0),
    # A constant lr (min_lr = lr): a shorter run is then the start of the longer one, schedule and all.
    "optim": dict(lr=1e-3, min_lr=1e-3, warmup_epochs=0),
    "train": dict(epochs=2, batch_size=4, log_every=1, vis_images=2, save_every=1, keep_last=0),
}


@pytest.fixture(scope="module")
def preset():
    register_preset("toymim_toynet_demo", "a toy backbone and method, registered by a test", TOY_PRESET)
    yield "toymim_toynet_demo"
    del PRESETS["toymim_toynet_demo"]  # the other tests' listings stay as they were


def pretrain(out: Path, preset: str, *extra: str):
    result = run_cli_captured(["pretrain", "--no-progress", "--preset", preset, "--out", str(out), *extra], out)
    assert result.code == 0, result.err
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(preset, tmp_path_factory) -> tuple[Path, list[float]]:
    """The whole 4-step run (2 epochs of 2 steps)."""
    out = tmp_path_factory.mktemp("toy") / "full"
    return out, pretrain(out, preset)


# ================================================================ the proof

def test_the_toy_option_is_a_config_key_with_its_type_and_stays_out_of_builtin_configs(preset):
    cfg = resolve_config(preset, sets=["model.toy_hidden_dim=40"])
    assert cfg.model.option("toy_hidden_dim") == 40 and cfg.model.options == {"toy_hidden_dim": 40}
    with pytest.raises(ConfigError, match="model.toy_hidden_dim must be an integer"):
        resolve_config(preset, sets=["model.toy_hidden_dim=wide"])
    with pytest.raises(ConfigError, match="unknown config key 'model.toy_width'"):
        resolve_config(preset, sets=["model.toy_width=4"])
    assert resolve_config("demo").model.options == {}
    assert "options" not in config_to_dict(resolve_config("demo"))["model"]  # saved configs unchanged


def test_pretrain_runs_the_toy_and_learns(run):
    out, losses = run
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert (out / "reconstructions.png").is_file()
    saved = (out / "config.yaml").read_text()
    assert "arch: toynet" in saved and "toy_hidden_dim: 24" in saved


def test_resume_auto_after_a_shorter_run_gives_the_uninterrupted_losses(run, preset, tmp_path):
    _, losses = run
    part = tmp_path / "part"
    assert pretrain(part, preset, "--max-steps", "2") == losses[:2]
    # From step 2 on it is epoch 1: the objective's weight halves, through `set_epoch`, on resume too.
    assert pretrain(part, preset, "--resume", "auto") == losses


def test_export_rebuilds_the_toy_through_timm(run, tmp_path):
    out, _ = run
    weights = tmp_path / "toy.safetensors"
    result = run_cli_captured(["export", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(weights)], out)
    assert result.code == 0, result.err
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["model"] == "toy_patchnet" and card["model_args"] == dict(patch_size=8, embed_dim=16, hidden_dim=24)
    rebuilt, (backbone, _) = create_exported(weights).eval(), load_backbone(out / "checkpoint.pt")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(x), backbone.eval().forward_features(x))


def test_bench_times_the_toy(preset, tmp_path):
    js = tmp_path / "bench.json"
    result = run_cli_captured(["bench", preset, "--batch-size", "2", "--steps", "1", "--warmup", "1",
                               "--device", "cpu", "--json", str(js)], tmp_path)
    assert result.code == 0, result.err
    row = json.loads(js.read_text())["results"][0]
    assert row["preset"] == preset and row["step_time_s"] > 0


def test_knn_reads_the_toy_backbone(run, tmp_path):
    out, _ = run
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 200)}.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    js = tmp_path / "knn.json"
    result = run_cli_captured(["knn", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(tmp_path / "data"),
                               "--val-data", str(tmp_path / "data"), "--k", "1", "--workers", "0", "--no-progress",
                               "--json", str(js)], tmp_path)
    assert result.code == 0, result.err
    record = json.loads(js.read_text())
    assert record["arch"] == "toynet" and record["method"] == "toymim" and record["feature_dim"] == 16
    assert record["results"][0]["top1"] == 100.0  # each image is its own nearest neighbour
