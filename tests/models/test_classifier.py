"""The fine-tuning classifier: loading pre-trained encoders, window change, layer decay, forward paths."""

from __future__ import annotations

import copy

import pytest
import torch

from ummae.compaction import full_coordinates
from ummae.resolve import resolve_config
from ummae.engine.finetune import build_finetune_optimizer
from ummae.errors import UmmaeError
from ummae.models import build_encoder
from ummae.models.classifier import Classifier, build_classifier, encoder_source, roi_align_map

HEAD = ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
def demo_classifier(arch: str, num_classes: int = 3) -> Classifier:
    """An untrained classifier of a `*_demo` backbone (4 Swin/PVT stages, 4 ViT blocks)."""
    preset = {"swin": "ummae_swin_demo", "pvt": "ummae_pvt_demo", "vit": "mae_vit_demo"}[arch]
    torch.manual_seed(0)
    model, _ = build_classifier(resolve_config(preset=preset), None, num_classes)
    return model


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ["swin", "pvt", "vit"])
def test_a_pretrained_encoder_loads_whole_only_the_head_is_new(checkpoints, arch):
    cfg, weights = encoder_source(checkpoints[arch])
    model, missing = build_classifier(cfg, weights, num_classes=3)
    assert missing == HEAD
    own = model.state_dict()
    for key, value in weights.items():
        assert torch.equal(own[f"encoder.{key}"], value), key
    assert model.num_blocks == 2
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_vit_at_another_size_rebuilds_only_its_fixed_position_table(checkpoints):
    cfg, weights = encoder_source(checkpoints["vit"])
    model, missing = build_classifier(cfg, weights, num_classes=3, img_size=32)
    assert missing == sorted(HEAD + ["encoder.pos_embed"])
    assert model.encoder.pos_embed.shape == (1, 1 + 4 * 4, 16)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_bad_encoder_sources_are_one_line_errors(tmp_path, checkpoints):
    with pytest.raises(UmmaeError, match="does not exist"):
        encoder_source(tmp_path / "nope.pt")
    with pytest.raises(UmmaeError, match="does not exist"):
        encoder_source(tmp_path / "encoder.safetensors")
    cfg, weights = encoder_source(checkpoints["swin"])
    weights = dict(weights, **{"stages.0.blocks.0.norm1.weight": torch.ones(3)})
    with pytest.raises(UmmaeError, match="shape"):
        build_classifier(cfg, weights, 3)


def test_swin_window_change_keeps_the_position_bias_defined(checkpoints):
    """Pre-trained with window 4 on the compact grid; fine-tuned with window 8 on the full image."""
    cfg, weights = encoder_source(checkpoints["swin"])
    assert cfg.model.window_size == 4 and cfg.method == "ummae"
    model, _ = build_classifier(cfg, weights, 3)
    model.eval()
    assert model.encoder.window_size == 8
    # The coordinate-MLP bias over a full 8x8 window (offsets never seen on a 4x4 window): finite.
    coords = full_coordinates(8, 8).reshape(1, 64, 2)
    bias = model.encoder.stages[0].blocks[0].attn.pos_bias(coords)
    assert bias.shape == (1, 1, 64, 64) and torch.isfinite(bias).all()
    # Same output as an encoder built directly with window 8 and given the same weights.
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.model.window_size = 8
    reference = build_encoder(ref_cfg).eval()
    reference.load_state_dict(weights)
    x = torch.randn(2, 3, 64, 64)  # 16x16 stage-1 grid: shifted 8x8 windows
    with torch.no_grad():
        ours = model.encoder.forward_features(x)
        torch.testing.assert_close(ours, reference.forward_features(x))
        assert torch.isfinite(ours).all()
        torch.manual_seed(1)
        random_init, _ = build_classifier(cfg, None, 3)
        assert not torch.allclose(random_init.eval().encoder.forward_features(x), ours, atol=1e-3)


# ---------------------------------------------------------------- layer-wise lr decay


def _scales(model: Classifier, decay: float) -> dict[str, float]:
    optimizer = build_finetune_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("arch", ["swin", "pvt", "vit"])
def test_layer_decay_head_1_stem_decay_to_the_depth_plus_one_monotone_in_between(arch):
    model = demo_classifier(arch)
    decay, depth = 0.5, model.num_blocks
    assert depth == (4 if arch == "vit" else 5)
    scales = _scales(model, decay)
    for name in ("head.weight", "head.bias", "fc_norm.weight", "encoder.norm.weight"):
        assert scales[name] == 1.0, name
    stem = [n for n in scales if n.startswith("encoder.patch_embed")]
    assert stem and all(scales[n] == pytest.approx(decay ** (depth + 1)) for n in stem)
    assert "encoder.mask_token" not in scales  # frozen: full images never use it
    # Block k (counted over all stages) has scale decay^(depth + 1 - k).
    if arch == "vit":
        prefixes = [f"encoder.blocks.{i}." for i in range(depth)]
    else:
        prefixes = [f"encoder.stages.{s}.blocks.{b}." for s, st in enumerate(model.encoder.stages)
                    for b in range(len(st.blocks))]
    assert len(prefixes) == depth
    per_block = []
    for k, prefix in enumerate(prefixes, start=1):
        values = {scales[n] for n in scales if n.startswith(prefix)}
        assert len(values) == 1, prefix  # a block is one layer
        value = values.pop()
        assert value == pytest.approx(decay ** (depth + 1 - k)), prefix
        per_block.append(value)
    assert per_block == sorted(per_block) and len(set(per_block)) == depth
    if arch != "vit":  # patch merging joins its stage's first block (timm's Swin counting)
        merging = [n for n in scales if n.startswith("encoder.stages.1.downsample")]
        assert merging and {scales[n] for n in merging} == {scales["encoder.stages.1.blocks.0.norm1.weight"]}


def test_layer_decay_weight_decay_spares_biases_norms_and_tokens():
    model = demo_classifier("vit")
    optimizer = build_finetune_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=0.8)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.ndim <= 1 or names[id(p)] in ("encoder.cls_token",):
                assert group["weight_decay"] == 0.0, names[id(p)]
            else:
                assert group["weight_decay"] == 0.05, names[id(p)]


# ---------------------------------------------------------------- forward paths


@pytest.mark.parametrize("arch, grid", [("swin", 4), ("pvt", 4), ("vit", 8)])
def test_feature_map_and_head_compose_to_forward_and_every_weight_learns(arch, grid):
    model = demo_classifier(arch)
    size = 128
    x = torch.randn(2, 3, size, size)
    fmap = model.forward_feature_map(x)
    assert fmap.shape == (2, model.num_features, grid, grid)  # stride 32 (pyramids) or 16 (ViT)
    logits = model(x)
    torch.testing.assert_close(model.forward_head_from_map(fmap), logits)
    rois = torch.tensor([[0, 0, 0, size, size], [1, 16, 32, 80, 96]], dtype=torch.float32)
    logits2, roi_logits = model(x, rois)
    torch.testing.assert_close(logits2, logits)
    assert roi_logits.shape == (2, 3)
    (logits.sum() + roi_logits.sum()).backward()
    # Every trainable weight gets a gradient (DDP without find_unused_parameters needs that).
    silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert silent == []


def test_vit_feature_map_is_the_patch_tokens_on_their_grid():
    model = demo_classifier("vit").eval()
    x = torch.randn(1, 3, 128, 128)
    tokens = model.encoder.forward_features(x)  # [1, 1+64, C]
    fmap = model.forward_feature_map(x)
    assert torch.equal(fmap[0, :, 2, 5], tokens[0, 1 + 2 * 8 + 5])


def test_roi_align_reads_the_box_in_feature_map_coordinates():
    # A [1, 1, 4, 8] map whose value is its column; the image is 32x64 (stride 8).
    fmap = torch.arange(8.0).expand(1, 1, 4, 8).contiguous()
    right = roi_align_map(fmap, torch.tensor([[0.0, 32, 0, 64, 32]]), (32, 64))  # columns 4..7
    assert right.shape == (1, 1, 4, 8)
    assert right.mean().item() == pytest.approx(5.5, abs=0.2)
    whole = roi_align_map(fmap, torch.tensor([[0.0, 0, 0, 64, 32]]), (32, 64))
    assert whole.mean().item() == pytest.approx(3.5, abs=0.2)


def test_an_exported_encoder_is_the_same_source_as_its_checkpoint(tmp_path, checkpoints):
    """`ummae export` output feeds fine-tuning: same configuration, same encoder weights."""
    from ummae.export import export_backbone

    out = tmp_path / "encoder.safetensors"
    export_backbone(checkpoints["swin"], out)
    cfg_pt, weights_pt = encoder_source(checkpoints["swin"])
    cfg_st, weights_st = encoder_source(out)
    assert cfg_st.model == cfg_pt.model and cfg_st.method == cfg_pt.method
    model_pt, _ = build_classifier(cfg_pt, weights_pt, num_classes=3)
    model_st, _ = build_classifier(cfg_st, weights_st, num_classes=3)
    for key, value in model_pt.encoder.state_dict().items():
        assert torch.equal(value, model_st.encoder.state_dict()[key]), key
