"""UM-MAE on timm's Swin V2: the encoder is timm's model, its masked path on a full grid is timm's
forward, and on the compact image every bias is its own `cpb_mlp` at the true offsets (issue 21,
items 3-4)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from ummae.compaction import full_coordinates
from ummae.errors import ConfigError
from ummae.masking import UniformMasking
from ummae.models import build_pretrain_model
from ummae.models.specs import build_encoder, full_image_config
from ummae.models.swin import CoordinateLattice, merge_coordinates, window_attention_mask
from ummae.models.swinv2 import (SwinV2Encoder, block_geometry, load_backbone_weights, position_bias,
                                 swinv2_timm_model)
from ummae.resolve import resolve_config
from timm.models.swin_transformer_v2 import SwinTransformerV2, window_partition


def demo_cfg(*sets: str, preset: str = "ummae_swinv2_demo"):
    return resolve_config(preset, sets=list(sets))


# Two blocks per stage, so that every stage has a shifted-window block (the demo has one block
# in three of its four stages, and its third stage is one window).
SHIFTED = "model.depths=[2,2,2,2]"


def perturbed(encoder: SwinV2Encoder, seed: int = 5) -> SwinV2Encoder:
    """Every parameter moved at random: timm starts the blocks' post-norms at zero (each block the
    identity), which would make any comparison of block outputs vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return encoder.eval()


def images(n: int = 2, size: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_twin(cfg, encoder: SwinV2Encoder):
    """`timm.create_model` of the configured sizes, loaded strictly with the encoder's weights."""
    name, args = swinv2_timm_model(cfg.model, cfg.data.img_size)
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **args)
    model.load_state_dict(encoder.timm_state_dict(), strict=True)
    return model.eval()


def test_presets_build_timms_swinv2_with_its_own_keys():
    cfg = resolve_config("ummae_swinv2_tiny_256")
    assert (cfg.method, cfg.model.arch, cfg.model.window_size, cfg.data.img_size) == ("ummae", "swinv2", 16, 256)
    name, args = swinv2_timm_model(cfg.model, 256)
    assert name == "swinv2_tiny_window16_256"
    with torch.device("meta"):
        encoder = build_encoder(cfg)
        reference = timm.create_model(name, num_classes=0)
    assert isinstance(encoder, SwinTransformerV2)
    assert encoder.state_dict().keys() - reference.state_dict().keys() == {"mask_token"}
    assert all(v.shape == reference.state_dict()[k].shape for k, v in encoder.timm_state_dict().items())
    assert resolve_config("simmim_swinv2_tiny_256").model.window_size == 16
    # The full-image model (fine-tuning, export) has exactly timm's keys: no mask token.
    with torch.device("meta"):
        full = build_encoder(full_image_config(cfg))
    assert full.mask_token is None and full.state_dict().keys() == reference.state_dict().keys()


def test_full_image_forward_is_timms_and_the_pretraining_weights_load_into_it():
    cfg = demo_cfg()
    torch.manual_seed(0)
    encoder = perturbed(build_encoder(cfg))
    x = images()
    full = build_encoder(full_image_config(cfg)).eval()
    full.load_state_dict(encoder.state_dict(), strict=True)  # the pre-training mask token is dropped
    with torch.no_grad():
        expected = timm_twin(cfg, encoder).forward_features(x)
        assert torch.equal(full.forward_features(x), expected)
        assert torch.equal(encoder.forward_features(x), expected)
        # SimMIM's path with nothing replaced is the same forward, up to rounding.
        none = torch.zeros(2, 32, 32, dtype=torch.bool)
        torch.testing.assert_close(encoder.forward_features(x, replace=none), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lattice", [True, False], ids=["lattice", "per-pair"])
def test_masked_path_on_the_full_grid_equals_timms_forward_features(lattice):
    """Identity compaction: every unit visible, true coordinates = the grid's. Shifted windows
    (stages 1-2), a clamped window (stages 3-4) and timm's own bias table are all on the way."""
    cfg = demo_cfg(SHIFTED)
    torch.manual_seed(0)
    encoder = perturbed(build_encoder(cfg))
    x = images()
    geometry = [block_geometry(b, compact=False) for s in encoder.layers for b in s.blocks]
    assert any(any(shift) for _, shift in geometry) and geometry[-1] == ((4, 4), (0, 0))
    with torch.no_grad():
        expected = timm_twin(cfg, encoder).forward_features(x)
        tokens = encoder.embed(x)
        coords = full_coordinates(tokens.shape[1], tokens.shape[2])
        got = encoder.forward_tokens(tokens, coords, CoordinateLattice.full() if lattice else None, compact=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
        # Negative control: offsets mis-scaled by 1.5 give another bias, and other features.
        wrong = encoder.forward_tokens(tokens, coords * 1.5, None, compact=False)
    assert (wrong - expected).abs().max() > 1e-2


def test_full_lattice_bias_is_timms_relative_position_bias():
    cfg = demo_cfg()
    torch.manual_seed(0)
    encoder = perturbed(build_encoder(cfg))
    attn = encoder.layers[0].blocks[0].attn
    win = attn.window_size
    coords = window_partition(full_coordinates(*win), win).reshape(1, 1, -1, 2)
    with torch.no_grad():
        ours = position_bias(attn, coords, CoordinateLattice.full(), win)[0, 0]
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
        timms = 16 * torch.sigmoid(table[attn.relative_position_index.view(-1)].view(*ours.shape[1:], -1))
    torch.testing.assert_close(ours, timms.permute(2, 0, 1), rtol=1e-6, atol=1e-6)


def true_patch_coordinates(ids_keep: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Where each compact patch sits in the photograph, worked out here from the unit ids alone:
    compact patch (r, c) is patch (r % p, c % p) of the visible unit of block (r // p, c // p)."""
    h, w = grid
    B = ids_keep.shape[0]
    out = torch.empty(B, h // 2 * p, w // 2 * p, 2)
    for b in range(B):
        for r in range(h // 2 * p):
            for c in range(w // 2 * p):
                unit = int(ids_keep[b, (r // p) * (w // 2) + c // p])
                out[b, r, c, 0] = (unit // w) * p + r % p + 0.5
                out[b, r, c, 1] = (unit % w) * p + c % p + 0.5
    return out


def timm_formula_bias(attn, offset: tuple[float, float]) -> torch.Tensor:
    """timm's bias of an offset, written out: divide by window - 1, times 8, log-spaced, cpb, 16 sigmoid."""
    t = [offset[i] / max(attn.window_size[i] - 1, 1) * 8 for i in range(2)]
    f = torch.tensor([math.copysign(math.log2(abs(v) + 1) / 3, v) for v in t])
    return 16 * torch.sigmoid(attn.cpb_mlp(f))


def test_compact_bias_is_cpb_mlp_at_the_true_offsets():
    """Every stage of the compact image: the gathered bias of each window equals the block's
    `cpb_mlp` evaluated at the true offsets of its pairs (true coordinates derived independently
    for stage 1; a merged token sits at the mean of its children)."""
    cfg = demo_cfg(SHIFTED)
    torch.manual_seed(0)
    encoder = perturbed(build_encoder(cfg))
    masking = UniformMasking((8, 8), 0.25)
    masks = masking(2, generator=torch.Generator().manual_seed(3))
    p = cfg.masking.unit_size // 4
    coords = true_patch_coordinates(masks.ids_keep, (8, 8), p)
    lattice = CoordinateLattice.compact(p)
    checked = 0
    g = torch.Generator().manual_seed(0)
    for i, stage in enumerate(encoder.layers):
        if i > 0:  # the mean of the 2x2 children, in the next stage's units (half)
            coords = F.avg_pool2d(coords.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1) / 2
            lattice = lattice.merged()
        for blk in stage.blocks:
            win, shift = block_geometry(blk, compact=True)
            c = torch.roll(coords, (-shift[0], -shift[1]), dims=(1, 2))
            c_win = window_partition(c, win).reshape(2, -1, win[0] * win[1], 2)
            with torch.no_grad():
                bias = position_bias(blk.attn, c_win, lattice, win)  # [B, nW, heads, N, N]
                blocked = window_attention_mask(c.shape[1], c.shape[2], win, shift, c.device)
                for _ in range(12):  # random pairs of random windows (that may attend each other)
                    b, n = int(torch.randint(2, (1,), generator=g)), int(torch.randint(c_win.shape[1], (1,), generator=g))
                    qi, kj = torch.randint(win[0] * win[1], (2,), generator=g).tolist()
                    if blocked is not None and blocked[n, qi, kj]:
                        kj = qi  # a blocked pair's bias is masked by -100 anyway: check the diagonal
                    offset = (c_win[b, n, qi] - c_win[b, n, kj]).tolist()
                    torch.testing.assert_close(bias[b, n, :, qi, kj], timm_formula_bias(blk.attn, offset),
                                               rtol=1e-5, atol=1e-5)
                    checked += 1
    assert checked == 12 * 8 and any(any(block_geometry(b, True)[1]) for b in encoder.layers[1].blocks)
    # The encoder's own coordinates are these (compaction + merges).
    from ummae.compaction import compact_coordinates
    ours = compact_coordinates(masks.ids_keep, (8, 8), p)
    assert torch.equal(ours, true_patch_coordinates(masks.ids_keep, (8, 8), p))
    assert torch.equal(merge_coordinates(ours), F.avg_pool2d(ours.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1) / 2)


def test_compact_bias_depends_on_where_the_units_were():
    """Negative control: the compact grid's own index offsets (what an unchanged timm block would
    use) give another bias than the true offsets, and so do two masks of different kept units."""
    cfg = demo_cfg()
    torch.manual_seed(0)
    encoder = perturbed(build_encoder(cfg))
    # Stage 2: a compact window spans tokens of different units (in stage 1 it is one unit, whose
    # patches are true neighbours, so the two agree there).
    attn = encoder.layers[1].blocks[0].attn
    win, _ = block_geometry(encoder.layers[1].blocks[0], compact=True)
    masks = UniformMasking((8, 8), 0.0)(1, generator=torch.Generator().manual_seed(3))
    true = merge_coordinates(true_patch_coordinates(masks.ids_keep, (8, 8), 4))  # [1, 8, 8, 2]
    true = window_partition(true, win).reshape(1, -1, 16, 2)
    index = window_partition(full_coordinates(8, 8), win).reshape(1, -1, 16, 2)
    with torch.no_grad():
        a = position_bias(attn, true, CoordinateLattice.compact(4).merged(), win)
        b = position_bias(attn, index, None, win)
    assert (a - b).abs().max() > 1e-2


def test_masked_encoder_sees_only_the_visible_units_and_the_mask_token():
    cfg = demo_cfg()
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).eval()
    perturbed(model.encoder)
    x = images(1)
    masks = model.sample_masks(1, generator=torch.Generator().manual_seed(2))
    unit, (h, w) = model.unit, model.grid_size
    hidden = masks.mask.view(1, h, w).repeat_interleave(unit, 1).repeat_interleave(unit, 2).unsqueeze(1)
    with torch.no_grad():
        feats = model.forward_encoder(x, masks)
        assert feats.shape == (1, 2, 2, model.encoder.num_features)
        changed = model.forward_encoder(torch.where(hidden, images(1, seed=9) * 5, x), masks)
        assert torch.equal(feats, changed)  # nothing of the masked units reaches the encoder
        assert masks.secondary is not None and bool(masks.secondary.any())
        model.encoder.mask_token.add_(1.0)  # secondary-masked units enter as the mask token
        assert not torch.allclose(model.forward_encoder(x, masks), feats)


@pytest.mark.parametrize("preset", ["ummae_swinv2_demo", "simmim_swinv2_demo"])
def test_training_step_gives_every_parameter_a_gradient(preset):
    torch.manual_seed(0)
    model = build_pretrain_model(demo_cfg(preset=preset)).train()
    masks = model.sample_masks(2, generator=torch.Generator().manual_seed(1))
    loss = model(images(), masks)[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("preset", ["ummae_swinv2_demo", "simmim_swinv2_demo"])
def test_bf16_autocast_on_cpu_trains(preset):
    torch.manual_seed(0)
    model = build_pretrain_model(demo_cfg(preset=preset)).train()
    perturbed(model.encoder).train()
    masks = model.sample_masks(2, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(images(), masks)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("sets, match", [
    (["model.window_size=6"], "has no half-size window on the compact image"),
    (["data.img_size=96"], "has no half-size window on the compact image"),
])
def test_geometries_the_compact_image_cannot_halve_are_one_line_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        demo_cfg(*sets)
    demo_cfg(*sets, preset="simmim_swinv2_demo")  # SimMIM runs timm's own full-image forward: fine


def test_timm_weights_load_into_the_encoder_only_and_others_are_refused():
    cfg = demo_cfg()
    name, args = swinv2_timm_model(cfg.model, cfg.data.img_size)
    torch.manual_seed(3)
    source = timm.create_model(name, **dict(args, num_classes=10))  # with a classifier
    model = build_pretrain_model(cfg)
    skipped = load_backbone_weights(model, source.state_dict(), "test")
    assert sorted(skipped) == ["head.fc.bias", "head.fc.weight"]
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.encoder.state_dict()[k], v), k
    other = timm.create_model(name, **dict(args, embed_dim=16))
    with pytest.raises(ConfigError, match="does not hold weights of this Swin V2: shape of"):
        load_backbone_weights(model, other.state_dict(), "test")
