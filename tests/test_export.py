"""`ummae export` + the timm registry: exported encoders reload through timm exactly.

One tiny pre-training run per backbone family (4-stage Swin and PVT at 64 px, so the feature
maps have strides 4-8-16-32; a 4-block ViT), exported once and shared by the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from ummae.export import create_exported
from ummae.models.loading import load_backbone, load_pretrain_checkpoint

IMG = 64
COMMON = ["--no-progress", "--max-steps", "1", "--batch-size", "2",
          "--set", f"data.img_size={IMG}", "--set", "data.num_workers=0", "--set", "data.demo_length=2",
          "--set", "train.vis_images=1", "--set", "model.decoder_dim=16", "--set", "model.decoder_depth=1",
          "--set", "model.decoder_heads=2"]
FOUR_STAGES = ["--set", "model.depths=[1,1,1,1]", "--set", "model.num_heads=[1,1,1,1]"]
RUNS = {
    # UM-MAE Swin: window 2 on the compact grid -> 4 on the full image (grids 16, 8, 4, 2).
    "swin": ["--preset", "ummae_swin_demo", "--set", "model.embed_dim=8", "--set", "model.window_size=2",
             *FOUR_STAGES],
    "pvt": ["--preset", "ummae_pvt_demo", "--set", "model.embed_dims=[8,8,16,16]", *FOUR_STAGES],
    "vit": ["--preset", "ummae_vit_demo", "--set", "model.embed_dim=16", "--set", "model.depths=[4]",
            "--set", "model.num_heads=[2]"],
}


# Export options per fixture key: "swin" and "vit" are the ummae_* formats (`--format ummae`),
# whose tests below predate timm's own formats; "swin_timm" and "vit_timm" export the same runs
# as timm's `swin_*` and `vit_*` (the default).
EXPORTS = {"swin": ["--format", "ummae"], "swin_timm": [], "vit": ["--format", "ummae"], "vit_timm": []}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_cli):
    """`exported(arch)` -> (checkpoint, weights, card, CLI stdout), made on first use."""
    made, runs = {}, {}

    def get(arch: str):
        base = arch.split("_")[0]
        if base not in runs:
            root = tmp_path_factory.mktemp(f"export_{base}")
            run = run_cli(["pretrain", "--out", str(root / "run"), *COMMON, *RUNS[base]], root)
            assert run.code == 0, run.err
            runs[base] = root
        if arch not in made:
            root = runs[base]
            ckpt, weights = root / "run" / "checkpoint.pt", root / "out" / f"{arch}.safetensors"
            res = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(weights),
                           *EXPORTS.get(arch, [])], root)
            assert res.code == 0, res.err
            made[arch] = (ckpt, weights, json.loads(weights.with_suffix(".json").read_text()), res.out)
        return made[arch]

    return get


def image(B: int = 2, size: int = IMG) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(3))


def reference(ckpt: Path) -> nn.Module:
    return load_backbone(ckpt)[0].eval()


# -- the export round trip ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["swin", "pvt", "vit"])
def test_export_reloads_through_timm_with_identical_features(exported, arch):
    from safetensors import safe_open

    ckpt, weights, card, out = exported(arch)
    assert f"wrote {weights}" in out and "wrote" in out.splitlines()[1]
    assert card["model"] == f"ummae_{arch}" and isinstance(card["model_args"], dict)
    assert card["img_size"] == IMG and card["method"] == "ummae" and card["ummae_version"]

    ref = reference(ckpt)
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).is_contiguous() for k in keys)
    assert keys == set(ref.state_dict())  # the encoder, all of it, nothing else
    assert not any(k.startswith(("decoder", "encoder.")) for k in keys)
    _, state = load_pretrain_checkpoint(ckpt)
    assert any(k.startswith("decoder.") for k in state["model"])  # ... while the checkpoint has one

    # The documented call, as a user would make it (after `import ummae`).
    model = timm.create_model(card["model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                              **card["model_args"]).eval()
    # Strict load: every key matched both ways, but for the mask token, which a timm-built model
    # (full images only) leaves out unless asked for: DDP needs every parameter to get a gradient.
    assert set(model.state_dict()) == keys - {"mask_token"} and model.mask_token is None
    with torch.no_grad():
        assert torch.equal(model.forward_features(image()), ref.forward_features(image()))
    kept = timm.create_model(card["model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                             mask_token=True, **card["model_args"])
    assert set(kept.state_dict()) == keys
    assert torch.equal(kept.mask_token, ref.mask_token)


@pytest.mark.parametrize("arch", ["swin", "pvt", "vit"])
def test_features_only_gives_the_backbone_intermediates(exported, arch):
    ckpt, weights, card, _ = exported(arch)
    body = create_exported(weights, features_only=True).eval()
    info = body.feature_info
    if arch == "vit":  # timm's ViT default: the last 3 blocks, stride 16
        assert list(body.out_indices) == [1, 2, 3] and info.reduction() == [16, 16, 16]
    else:
        assert info.reduction() == [4, 8, 16, 32]
        assert info.channels() == [f["num_chs"] for f in card["feature_info"]]
    with torch.no_grad():
        maps = body(image())
        expected = reference(ckpt).forward_intermediates(image(), indices=list(body.out_indices),
                                                         intermediates_only=True)
    assert len(maps) == len(info.out_indices)
    for m, c, r, e in zip(maps, info.channels(), info.reduction(), expected):
        assert m.shape == (2, c, IMG // r, IMG // r)  # NCHW
        assert torch.equal(m, e)

    # Every parameter left in the extractor is used, as DistributedDataParallel requires.
    body.train()
    sum(m.pow(2).mean() for m in body(image())).backward()
    assert [n for n, p in body.named_parameters() if p.requires_grad and p.grad is None] == []


def test_swin_export_is_the_full_image_backbone_with_the_doubled_window(exported):
    ckpt, weights, card, _ = exported("swin")
    cfg, _ = load_pretrain_checkpoint(ckpt)
    assert cfg.method == "ummae" and cfg.model.window_size == 2
    model = create_exported(weights).eval()
    assert card["model_args"]["window_size"] == model.window_size == 4
    ref = reference(ckpt)
    with torch.no_grad():
        full = model.forward_features(image())
        assert torch.equal(full, ref.forward_features(image()))
        model.set_window_size(2)  # the pre-training window: other features, so the window matters here
        assert not torch.allclose(model.forward_features(image()), full)


def test_vit_position_table_follows_img_size(exported):
    from ummae.models.vit import VisionTransformer

    _, weights, card, _ = exported("vit")
    args = dict(card["model_args"], img_size=96)
    model = create_exported(weights, img_size=96).eval()
    fresh = VisionTransformer(**args)  # its table: the sin-cos of the 6x6 grid
    assert model.pos_embed.shape == (1, 1 + 36, 16)
    assert torch.equal(model.pos_embed, fresh.pos_embed)
    assert model.forward_features(image(1, 96)).shape == (1, 37, 16)


def test_checkpoint_filter_resamples_a_learned_vit_table():
    from ummae.models.registry import checkpoint_filter_fn
    from ummae.models.vit import VisionTransformer

    model = VisionTransformer(img_size=48, patch_size=16, embed_dim=16, depth=1, num_heads=2)  # 3x3 grid
    learned = torch.randn(1, 1 + 4, 16)  # a 2x2 grid that is not sin-cos
    out = checkpoint_filter_fn({"pos_embed": learned}, model)["pos_embed"]
    assert out.shape == (1, 10, 16) and torch.equal(out[:, :1], learned[:, :1])
    assert not torch.equal(out, model.pos_embed)


def test_vit_export_also_loads_into_timms_own_vit(exported):
    ckpt, weights, card, _ = exported("vit")
    a = card["model_args"]
    # timm's ViT filter drops the one extra key (`mask_token`); the rest are timm's own names.
    model = timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                              num_classes=0, img_size=a["img_size"], patch_size=a["patch_size"],
                              embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"]).eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(image()), reference(ckpt).forward_features(image()))


def test_timm_takes_a_pretraining_checkpoint_directly(exported):
    ckpt, weights, card, _ = exported("pvt")
    model = timm.create_model(card["model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt)),
                              **card["model_args"]).eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(image()), reference(ckpt).forward_features(image()))


def test_pretrained_without_a_file_is_an_error_not_a_download():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("ummae_swin", pretrained=True)


@pytest.mark.parametrize("arch", ["swin", "pvt"])
def test_group_matcher_serves_timm_layer_decay(exported, arch):
    from timm.optim import param_groups_layer_decay

    model = create_exported(exported(arch)[1])
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert len({g["lr_scale"] for g in groups}) > 2  # stem, stages, norm at different scales


# -- forward_intermediates / prune_intermediate_layers contract (timm's semantics) -----------------
@pytest.mark.parametrize("arch", ["swin", "pvt"])
def test_forward_intermediates_follows_timms_contract(arch):
    torch.manual_seed(0)
    args = dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    if arch == "swin":
        from ummae.models.swin import SwinTransformer
        model = SwinTransformer(embed_dim=8, window_size=4, **args).eval()
    else:
        from ummae.models.pvt import PyramidVisionTransformer
        model = PyramidVisionTransformer(embed_dims=(8, 8, 16, 16), **args).eval()
    x = image()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.feature_info]
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        _, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert [torch.equal(a, b) for a, b in zip(last2, maps[2:])] == [True, True]
    assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[3])
    assert torch.equal(nhwc[0], maps[1].permute(0, 2, 3, 1))
    assert torch.equal(normed[3], final.permute(0, 3, 1, 2))  # the final norm: last stage only
    assert all(torch.equal(a, b) for a, b in zip(normed[:3], maps[:3]))
    assert torch.equal(early[0], maps[1])

    kept = model.prune_intermediate_layers([0, 1], prune_norm=True)
    assert kept == [0, 1] and len(model.stages) == 2 and isinstance(model.norm, nn.Identity)
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(after, maps[:2]))


# -- detection neck (the snippet of docs/export.md) ----------------------------------------------
class TimmBackboneWithFPN(nn.Module):
    """A timm features_only body + torchvision's FPN, shaped like torchvision's BackboneWithFPN."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # read by torchvision's detectors

    def forward(self, x: torch.Tensor) -> OrderedDict:
        maps = self.body(x)  # NCHW maps, strides 4, 8, 16, 32
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def test_exported_swin_drives_a_torchvision_detector(exported):
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    backbone = TimmBackboneWithFPN(create_exported(exported("swin")[1], features_only=True), out_channels=32)
    pyramid = backbone(image())
    assert [(k, v.shape[-1]) for k, v in pyramid.items()] == [("0", 16), ("1", 8), ("2", 4), ("3", 2), ("pool", 1)]
    # size_divisible: every stage's grid must split into whole windows (see docs/export.md).
    detector = FasterRCNN(backbone, num_classes=3, min_size=IMG, max_size=IMG, size_divisible=IMG)
    losses = detector([torch.rand(3, IMG, IMG), torch.rand(3, 60, 50)],
                      [dict(boxes=torch.tensor([[4.0, 4.0, 40.0, 40.0]]), labels=torch.tensor([1]))] * 2)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []


# -- errors ----------------------------------------------------------------------------------------
def _junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    return path


def _no_config(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save({"model": {"encoder.w": torch.zeros(1)}}, path)
    return path


@pytest.mark.parametrize("make_ckpt, out, message", [
    (lambda tmp, good: tmp / "missing.pt", "a.safetensors", "does not exist"),
    (lambda tmp, good: _junk(tmp), "a.safetensors", "junk.pt"),  # worded by the checkpoint reader
    (lambda tmp, good: _no_config(tmp), "a.safetensors", "not a pre-training checkpoint"),
    (lambda tmp, good: good, "a.pt", "must name a .safetensors file"),
    (lambda tmp, good: good, "a.safetensors/", "is a folder, not a file"),  # cli.checks' wording
    (lambda tmp, good: good, "file.txt/a.safetensors", "file.txt' is a file, not a folder"),
], ids=["missing", "junk", "not-pretraining", "suffix", "out-is-dir", "unwritable"])
def test_bad_input_is_one_line_and_exit_2(exported, run_cli, tmp_path, make_ckpt, out, message):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "a.safetensors").mkdir() if out.endswith("/") else None
    ckpt = make_ckpt(tmp_path, exported("pvt")[0])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / out)], tmp_path)
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ummae export: error:") and message in lines[0], res.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temporary left


def test_import_ummae_is_light_and_registers_when_timm_arrives():
    code = ("import sys, ummae; assert 'timm' not in sys.modules and 'torch' not in sys.modules; "
            "import timm; print(timm.list_models('ummae_*'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(["ummae_pvt", "ummae_swin", "ummae_vit"])


# -- Swin as timm's own swin_* (the default format) ---------------------------------------------
NO_UMMAE = "import sys; sys.modules['ummae'] = None  # `import ummae` now fails\n"


def test_swin_export_loads_as_timms_own_swin_without_ummae(exported, tmp_path):
    ckpt, weights, card, out = exported("swin_timm")
    assert card["model"].startswith("swin_") and card["format"] == "timm" and not card["needs_ummae"]
    assert card["model_args"]["window_size"] == 4 and card["model_args"]["img_size"] == IMG
    assert "load: import timm;" in out
    x = image()
    torch.save(x, tmp_path / "x.pt")
    code = NO_UMMAE + f"""
import timm, torch
from safetensors.torch import load_file
try:
    import ummae
    raise SystemExit("ummae importable")
except ImportError:
    pass
card = {card["model"]!r}, {card["model_args"]!r}
name, args = card
w = {str(weights)!r}
x = torch.load({str(tmp_path / "x.pt")!r})
model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=w), **args).eval()
model.load_state_dict(load_file(w), strict=True)  # every key, both ways (no head in the file)
plain = timm.create_model(name, checkpoint_path=w, **args).eval()  # train.py --initial-checkpoint
body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=w), features_only=True,
                         **args).eval()
clf = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=w), **dict(args, num_classes=5))
with torch.no_grad():
    torch.save(dict(full=model.forward_features(x), plain=plain.forward_features(x), maps=body(x),
                    logits=clf.eval()(x)), {str(tmp_path / "y.pt")!r})
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.load(tmp_path / "y.pt")
    ref = reference(ckpt)  # ummae's full-image backbone at the exported window (4)
    assert ref.window_size == 4
    with torch.no_grad():
        full = ref.forward_features(x)
        maps = ref.forward_intermediates(x, intermediates_only=True)
    assert torch.allclose(got["full"], full, rtol=0, atol=1e-5 * full.abs().max())
    assert torch.equal(got["plain"], got["full"])
    assert len(got["maps"]) == 4 and got["logits"].shape == (2, 5)
    for a, b in zip(got["maps"], maps):  # timm's own Swin features_only: NHWC (its FeatureListNet)
        a = a.permute(0, 3, 1, 2)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max())


# -- ViT as timm's own vit_* (the default format) ----------------------------------------------
def _random_vit(img_size, patch_size: int, embed_dim: int, depth: int, num_heads: int):
    """An ummae ViT off its initial values (zero biases, unit norms), as a pre-training run leaves it."""
    from ummae.models.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos table stays what pre-training has
                p.add_(0.1 * torch.randn_like(p))
    return model


def _vit_export(model, size, path: Path) -> tuple[str, dict]:
    """What `ummae export` writes for a ViT (its `timm_native`): timm's keys, no mask token."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from ummae.models import vit

    m = SimpleNamespace(patch_size=model.patch_size, embed_dim=model.embed_dim, depths=[len(model.blocks)],
                        num_heads=[model.blocks[0].attn.num_heads], mlp_ratio=4.0)
    name, args, state, extra = vit.native_export(model, SimpleNamespace(model=m, data=SimpleNamespace(img_size=size)),
                                                 size)
    assert set(extra) == {"mask_token"} and "mask_token" not in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return name, args


def test_vit_export_loads_as_timms_own_vit_without_ummae(exported, tmp_path):
    ckpt, weights, card, out = exported("vit_timm")
    assert card["model"] == "vit_base_patch16_224.mae" and card["format"] == "timm" and not card["needs_ummae"]
    assert card["model_args"]["img_size"] == IMG and card["model_args"]["fc_norm"] is False
    assert "load: import timm;" in out
    # The CLI's export (64 px, 4 blocks), ViT-sized 224 px with patch 16, and a rectangular 48x80
    # image with patch 8: each against ummae's full-image backbone.
    cases = {"run": (reference(ckpt), IMG, card["model"], card["model_args"], str(weights))}
    for key, (size, patch, dim, depth, heads) in {"224": (224, 16, 32, 2, 2),
                                                  "48x80": ((48, 80), 8, 24, 3, 3)}.items():
        model = _random_vit(size, patch, dim, depth, heads)
        path = tmp_path / f"vit_{key}.safetensors"
        cases[key] = (model, size, *_vit_export(model, size, path), str(path))
    inputs = {}
    for key, (_, size, *_) in cases.items():
        h, w = (size, size) if isinstance(size, int) else size
        inputs[key] = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    torch.save(inputs, tmp_path / "x.pt")
    jobs = {key: (name, args, path) for key, (_, _, name, args, path) in cases.items()}
    code = NO_UMMAE + f"""
import timm, torch
from safetensors.torch import load_file
try:
    import ummae
    raise SystemExit("ummae importable")
except ImportError:
    pass
inputs, outs = torch.load({str(tmp_path / "x.pt")!r}), {{}}
for key, (name, args, w) in {jobs!r}.items():
    x = inputs[key]
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=w), **args).eval()
    model.load_state_dict(load_file(w), strict=True)  # every key, both ways (no head, no mask token)
    plain = timm.create_model(name, checkpoint_path=w, **args).eval()  # train.py --initial-checkpoint
    body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=w), features_only=True,
                             out_indices=(0, 1), **args).eval()
    clf = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=w), **dict(args, num_classes=5))
    with torch.no_grad():
        outs[key] = dict(full=model.forward_features(x), plain=plain.forward_features(x), maps=body(x),
                         inter=model.forward_intermediates(x, indices=[0, 1], intermediates_only=True),
                         logits=clf.eval()(x))
torch.save(outs, {str(tmp_path / "y.pt")!r})
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.load(tmp_path / "y.pt")
    for key, (ref, *_) in cases.items():
        x, g = inputs[key], got[key]
        with torch.no_grad():
            full = ref.forward_features(x)
            maps = ref.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert g["full"].shape == full.shape, key
        assert torch.allclose(g["full"], full, rtol=0, atol=1e-5 * full.abs().max()), key
        assert torch.equal(g["plain"], g["full"]) and g["logits"].shape == (2, 5)
        assert len(g["maps"]) == len(g["inter"]) == 2
        for a, b, c in zip(g["maps"], g["inter"], maps):  # NCHW patch grids
            assert a.shape == b.shape == c.shape and torch.equal(a, b)
            assert torch.allclose(a, c, rtol=0, atol=1e-5 * c.abs().max()), key


def test_a_perturbed_vit_weight_differs(tmp_path):
    # Negative control of the comparison above: one block's qkv weight off by 1e-2.
    from safetensors.torch import load_file

    model = _random_vit(64, 16, 16, 2, 2)
    name, args = _vit_export(model, 64, tmp_path / "v.safetensors")
    target = timm.create_model(name, pretrained=False, **args).eval()
    state = load_file(str(tmp_path / "v.safetensors"))
    target.load_state_dict(state, strict=True)
    x = image(1)
    with torch.no_grad():
        assert torch.equal(target.forward_features(x), model.forward_features(x))
        state["blocks.1.attn.qkv.weight"] += 1e-2
        target.load_state_dict(state, strict=True)
        assert not torch.allclose(target.forward_features(x), model.forward_features(x), atol=1e-4)


def test_vit_export_at_another_size_is_one_clear_error(exported, run_cli, tmp_path):
    ckpt = exported("vit")[0]
    res = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "v.safetensors"),
                   "--img-size", "96"], tmp_path)
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1
    assert "pre-training size 64x64" in res.err and not (tmp_path / "v.safetensors").exists()


def _random_swin(depths=(2, 2, 2, 2)):
    from ummae.models.swin import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=8, depths=depths, num_heads=(1, 2, 2, 4)).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the initial values (zero biases, unit norms)
            p.add_(0.1 * torch.randn_like(p))
    return model


def _as_timm(model, window: int, size):
    from types import SimpleNamespace

    from ummae.models import swin_timm

    m = SimpleNamespace(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], patch_size=4, mlp_ratio=4.0)
    model.set_window_size(window)
    name, args = swin_timm.timm_swin_model(m, window, size)
    target = timm.create_model(name, pretrained=False, **args).eval()
    state, extra = swin_timm.to_timm_state(model, target)
    target.load_state_dict(state, strict=False)  # strict but for the absent head
    assert set(target.state_dict()) - set(state) == set() and set(extra) >= {"mask_token"}
    return target, state, extra


# (window, image side(s)): shifted windows at every stage; a window clipped to a smaller late
# stage (timm's table then smaller); odd stage grids (padded by the merging: 72 px, 18 -> 9 -> 5
# -> 3); rectangular images; the paper's fine-tuning setting (window 7 at 224 px).
@pytest.mark.parametrize("window, size", [(4, 64), (2, 64), (3, 96), (9, 72), (4, (64, 128)), (7, 224)])
def test_timm_swin_equals_ummae_full_image(window, size):
    model = _random_swin()
    target, _, _ = _as_timm(model, window, size)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model.forward_features(x), target.forward_features(x)
    assert ref.shape == got.shape
    assert (ref - got).abs().max() <= 1e-5 * ref.abs().max()


def test_a_wrong_table_differs():
    # Negative control: the MLP at key - query instead of query - key (a sign slip).
    model = _random_swin()
    target, state, _ = _as_timm(model, 4, 64)
    with torch.no_grad():
        for k in [k for k in state if k.endswith("relative_position_bias_table")]:
            state[k] = state[k].flip(0)  # row of offset -d for d
        target.load_state_dict(state, strict=False)
        x = image(1)
        assert not torch.allclose(model.forward_features(x), target.forward_features(x), atol=1e-3)


@pytest.mark.parametrize("arch", ["swin_timm", "vit_timm"])
def test_timm_format_rebuilds_ummaes_backbone_exactly(exported, arch):
    from ummae.models.loading import encoder_source

    ckpt, weights, _, _ = exported(arch)
    backbone, _ = load_backbone(weights)  # what finetune / knn / linprobe build from an export
    ref = reference(ckpt)
    assert set(backbone.state_dict()) == set(ref.state_dict())
    assert all(torch.equal(a, ref.state_dict()[k]) for k, a in backbone.state_dict().items())
    cfg, w = encoder_source(weights)
    assert cfg.model.arch == arch.split("_")[0] and "mask_token" in w


def test_official_options_fall_back_to_ummae_swin_with_one_line():
    from types import SimpleNamespace

    from ummae.models.swin_timm import timm_incompatibility

    assert timm_incompatibility(SimpleNamespace(merge="linear", norm_eps=1e-5)) is None
    why = timm_incompatibility(SimpleNamespace(merge="conv", norm_eps=1e-6))
    assert "merge=conv" in why and "\n" not in why
    assert "norm_eps=1e-06" in timm_incompatibility(SimpleNamespace(merge="linear", norm_eps=1e-6))


@pytest.mark.parametrize("arch", ["swin", "pvt"])
def test_checkpoint_path_loads_into_plain_and_features_only_models(exported, arch):
    from timm.optim import param_groups_layer_decay

    ckpt, weights, card, _ = exported(arch)
    plain = timm.create_model(card["model"], checkpoint_path=str(weights), **card["model_args"]).eval()
    body = timm.create_model(card["model"], checkpoint_path=str(weights), features_only=True,
                             out_indices=(1, 2), **card["model_args"]).eval()
    ref = reference(ckpt)
    with torch.no_grad():
        assert torch.equal(plain.forward_features(image()), ref.forward_features(image()))
        maps = ref.forward_intermediates(image(), indices=[1, 2], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(body(image()), maps))
    # Layer decay on the detector's backbone: stages in their own groups, not one.
    groups = param_groups_layer_decay(body, weight_decay=0.05, layer_decay=0.75)
    assert len({g["lr_scale"] for g in groups}) > 2
    body.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in body.model.stages)


@pytest.mark.parametrize("arch", ["swin_timm", "pvt"])
def test_backbone_with_fpn_trains_a_mask_rcnn_step(exported, arch):
    from torchvision.models.detection import MaskRCNN

    from ummae.detection import backbone_with_fpn

    torch.manual_seed(0)
    backbone = backbone_with_fpn(exported(arch)[1], out_channels=16)
    detector = MaskRCNN(backbone, num_classes=3, min_size=IMG, max_size=IMG, size_divisible=32).train()
    masks = torch.zeros(1, IMG, IMG, dtype=torch.uint8)
    masks[:, 8:40, 8:40] = 1
    target = dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]), labels=torch.tensor([1]), masks=masks)
    losses = detector([torch.rand(3, IMG, IMG)], [target])
    assert {"loss_mask", "loss_classifier", "loss_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert [n for n, p in backbone.body.named_parameters() if p.requires_grad and p.grad is None] == []
