"""Converting the paper's released UM-MAE checkpoints (`ummae.models.official`, `ummae convert`).

No real official file is used: each test builds a state dict with the OFFICIAL key names and shapes
from the written spec below (read off implus/UM-MAE's `models_mae_swin.py`, `models_mae_pvt.py`,
`models_mae.py`; tiny widths and depths, random values). The real check is numerical: a small
forward of the official architecture written here from that spec (official merging, position MLP
on `pos_j - pos_i` with integer coordinates, MAE's sin-cos channel order, -100 shift masks, its
LayerNorm eps) must give what ummae's converted model gives, and a mis-mapped load must not.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from ummae.errors import ConfigError, UmmaeError
from ummae.models import official
from ummae.models.loading import build_backbone, encoder_state_dict

from official_spec import (D, IMG, PVT, PVT_SETS, SWIN, SWIN_SETS, UNIT, VIT_SETS, fill, mae_sincos, pvt_spec,
                           swin_spec, vit_spec)


@pytest.fixture
def save_official(tmp_path):
    def save(sd: dict, name: str = "official.pth", **extra) -> str:
        path = tmp_path / name
        torch.save({"model": sd, "epoch": 199, **extra}, path)
        return str(path)
    return save


def convert(sd: dict, preset: str, sets: list[str]) -> official.ConversionResult:
    return official.convert_state_dict(sd, official.official_config(preset, sets))


# -- reference forwards of the official architectures (written from the spec above) ---------------

def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].reshape(sd[f"{name}.weight"].shape[0], -1).T + sd[f"{name}.bias"]


def _mlp(x, sd, p):
    return _lin(F.gelu(_lin(x, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")


def _windows(x, w):  # [B, H, W, C] -> [B * nW, w*w, C]
    B, H, W, C = x.shape
    return x.reshape(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def _unwindows(x, w, B, H, W):
    return x.reshape(B, H // w, W // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


def ref_swin(sd, x, window):
    """Official MaskedAutoencoderSwin encoder on a full image (fine-tuning geometry)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).permute(0, 2, 3, 1)
    x = _ln(x, sd, "patch_embed.norm", 1e-6)
    B, H, W, _ = x.shape
    pos = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).float()  # integer (h, w)
    K = 0
    for i, (depth, heads) in enumerate(zip(SWIN["depths"], SWIN["heads"])):
        for j in range(depth):
            p = f"blocks.{K}."
            if i > 0 and j == 0:  # LayerNorm per token, 2x2 stride-2 conv with bias, top-left coordinate / 2
                x = _ln(x, sd, p + "downsample.norm", 1e-6)
                x = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "downsample.proj.weight"], sd[p + "downsample.proj.bias"],
                             stride=2).permute(0, 2, 3, 1)
                pos = pos[0::2, 0::2] / 2
            B, H, W, C = x.shape
            w = min(window, H)
            s = w // 2 if (j % 2 == 1 and H > window) else 0
            y = _ln(x, sd, p + "norm1", 1e-5)
            ps = pos
            if s:
                y, ps = torch.roll(y, (-s, -s), (1, 2)), torch.roll(pos, (-s, -s), (0, 1))
            yw, pw = _windows(y, w), _windows(ps[None], w)  # [B*nW, N, C], [nW, N, 2]
            qkv = _lin(yw, sd, p + "attn.qkv").reshape(yw.shape[0], w * w, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)  # [B*nW, heads, i, j]
            rel = pw[:, None, :, :] - pw[:, :, None, :]  # [nW, i, j, 2] = pos_j - pos_i
            rel = torch.sign(rel) * torch.log(1 + rel.abs())
            hid = F.relu(rel @ sd[p + "attn.posmlp.0.weight"].flatten(1).T + sd[p + "attn.posmlp.0.bias"])
            bias = (hid @ sd[p + "attn.posmlp.2.weight"].flatten(1).T + sd[p + "attn.posmlp.2.bias"]).permute(0, 3, 1, 2)
            attn = attn.reshape(B, -1, heads, w * w, w * w) + bias[None]
            if s:  # the 9 regions of the rolled grid may not attend to each other: -100
                label = torch.zeros(H, W)
                cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
                for a, hs in enumerate(cuts):
                    for b, ws in enumerate(cuts):
                        label[hs, ws] = 3 * a + b
                lw = _windows(label[None, :, :, None], w)[..., 0]  # [nW, N]
                attn = attn + ((lw[:, None, :] - lw[:, :, None]) != 0).float()[None, :, None] * -100.0
            attn = attn.reshape(-1, heads, w * w, w * w).softmax(-1)
            out = _lin((attn @ v).transpose(1, 2).reshape(-1, w * w, C), sd, p + "attn.proj")
            out = _unwindows(out, w, B, H, W)
            if s:
                out = torch.roll(out, (s, s), (1, 2))
            x = x + out
            x = x + _mlp(_ln(x, sd, p + "norm2", 1e-5), sd, p)
            K += 1
    return _ln(x, sd, "norm", 1e-6)


def ref_pvt(sd, x):
    """Official MaskedAutoencoderPVT encoder on a full image (fine-tuning SR ratios)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).permute(0, 2, 3, 1)
    B, H, W, C = x.shape
    x = x + mae_sincos(H, C).reshape(H, W, C)  # MAE's channel order
    K = 0
    for i, (depth, heads) in enumerate(zip(PVT["depths"], PVT["heads"])):
        for j in range(depth):
            p = f"blocks.{K}."
            if i > 0 and j == 0:  # bare 2x2 conv, no norm
                x = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "downsample.proj.weight"], sd[p + "downsample.proj.bias"],
                             stride=2).permute(0, 2, 3, 1)
            B, H, W, C = x.shape
            y = _ln(x, sd, p + "norm1", 1e-5)
            q = _lin(y, sd, p + "attn.q").reshape(B, -1, heads, C // heads).transpose(1, 2)
            red = F.avg_pool2d(y.permute(0, 3, 1, 2), PVT["sr"][i])
            red = F.conv2d(red, sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"]).flatten(2).transpose(1, 2)
            kv = _lin(_ln(red, sd, p + "attn.norm", 1e-5), sd, p + "attn.kv").reshape(B, -1, 2, heads, C // heads)
            k, v = kv.permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
            x = x + _lin((attn @ v).transpose(1, 2).reshape(B, H, W, C), sd, p + "attn.proj")
            x = x + _mlp(_ln(x, sd, p + "norm2", 1e-5), sd, p)
            K += 1
    return _ln(x, sd, "norm", 1e-6)


def ref_pyramid_decoder(sd, features, mask):
    """Official forward_decoder: visible tokens (compact order) + raster-order positions of the
    visible units, then mask tokens; timm blocks with eps 1e-6. Rows: visible units, then masked."""
    from timm.models.vision_transformer import Block

    x = _lin(features.flatten(1, 2), sd, "decoder_embed")  # [B, M*M, 4D]
    B, L, nD = x.shape
    M = math.isqrt(L)
    x = F.pixel_shuffle(x.transpose(1, 2).reshape(B, nD, M, M), 2).flatten(2).transpose(1, 2)
    table = sd["decoder_pos_embed"].expand(B, -1, -1)
    x = torch.cat([x + table[~mask].reshape(B, -1, D), sd["mask_token"] + table[mask].reshape(B, -1, D)], 1)
    block = Block(D, 2, 4.0, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    block.load_state_dict({k[len("decoder_blocks.0."):]: v for k, v in sd.items() if k.startswith("decoder_blocks.0.")})
    return _lin(_ln(block(x), sd, "decoder_norm", 1e-6), sd, "decoder_pred")


def backbone_of(result: official.ConversionResult, preset: str, sets: list[str]):
    """The full-image backbone of a converted state dict, as `load_backbone` builds it."""
    cfg = official.official_config(preset, sets)
    backbone = build_backbone(cfg)
    backbone.load_state_dict(encoder_state_dict({"model": result.state_dict}))
    return backbone.eval()


IMAGE = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


# -- the sin-cos channel order ------------------------------------------------------------------

@pytest.mark.parametrize("dim", [8, 16, 64])
def test_channel_order_maps_mae_tables_onto_timms(dim):
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    perm = official.sincos_channel_order(dim)
    assert sorted(perm.tolist()) == list(range(dim))
    timm_table, mae = build_sincos2d_pos_embed([6, 6], dim), mae_sincos(6, dim)
    torch.testing.assert_close(timm_table, mae[:, perm], atol=1e-5, rtol=0)
    assert not torch.allclose(timm_table, mae, atol=1e-2)  # the orders really differ


# -- Swin ---------------------------------------------------------------------------------------

def test_swin_every_official_key_is_converted_or_dropped_for_a_reason():
    sd = fill(swin_spec())
    result = convert(sd, "ummae_swin_demo", SWIN_SETS)
    assert result.converted + len(result.dropped) == len(sd)
    assert set(result.dropped) == {"decoder_pos_embed"}
    assert result.initialised == []
    # The position MLP's first layer changes sign (pos_j - pos_i -> c_i - c_j), the second does not.
    w0 = result.state_dict["encoder.stages.1.blocks.1.attn.pos_bias.mlp.0.weight"]
    torch.testing.assert_close(w0, -sd["blocks.3.attn.posmlp.0.weight"].flatten(1))
    w2 = result.state_dict["encoder.stages.1.blocks.1.attn.pos_bias.mlp.2.weight"]
    torch.testing.assert_close(w2, sd["blocks.3.attn.posmlp.2.weight"].flatten(1))
    torch.testing.assert_close(result.state_dict["encoder.stages.1.downsample.proj.weight"],
                               sd["blocks.2.downsample.proj.weight"])


def test_converted_swin_computes_the_official_forward():
    sd = fill(swin_spec())
    result = convert(sd, "ummae_swin_demo", SWIN_SETS)
    backbone = backbone_of(result, "ummae_swin_demo", SWIN_SETS)
    assert backbone.window_size == 2 * SWIN["window"]  # fine-tuning window: shifted windows in both stages
    with torch.no_grad():
        ours, ref = backbone.forward_features(IMAGE), ref_swin(sd, IMAGE, 2 * SWIN["window"])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)

    # Negative control: the position MLP's first layer loaded without the sign change.
    state = dict(result.state_dict)
    for k in state:
        if k.endswith("pos_bias.mlp.0.weight"):
            state[k] = -state[k]
    backbone.load_state_dict(encoder_state_dict({"model": state}))
    with torch.no_grad():
        assert (backbone.forward_features(IMAGE) - ref).abs().max() > 1e-3


def test_swin_decoder_agrees_with_the_official_where_its_position_order_is_right():
    """The official decoder pairs visible tokens with raster-order positions; when every 2x2 block
    keeps its top-left unit, raster and compact order coincide and the two decoders must agree."""
    sd = fill(swin_spec())
    result = convert(sd, "ummae_swin_demo", SWIN_SETS)
    cfg = official.official_config("ummae_swin_demo", SWIN_SETS)
    from ummae.models import build_pretrain_model

    model = build_pretrain_model(cfg).eval()
    model.load_state_dict(result.state_dict)
    side = IMG // UNIT
    mask = torch.ones(side, side, dtype=torch.bool)
    mask[0::2, 0::2] = False  # top-left of every block visible
    mask = mask.flatten()[None].expand(2, -1)
    ids_keep = (~mask[0]).nonzero().flatten()[None].expand(2, -1)
    features = torch.randn(2, side // 4, side // 4, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.decoder(features, ids_keep)
        ref = ref_pyramid_decoder(sd, features, mask)
    n_vis = ids_keep.shape[1]
    torch.testing.assert_close(ours[:, ids_keep[0]], ref[:, :n_vis], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, mask[0]], ref[:, n_vis:], atol=2e-5, rtol=1e-4)

    # Negative control: without renumbering the decoder's channels to timm's sin-cos order.
    original = official._renumber_decoder
    try:
        official._renumber_decoder = lambda *a: None
        model.load_state_dict(convert(sd, "ummae_swin_demo", SWIN_SETS).state_dict)
    finally:
        official._renumber_decoder = original
    with torch.no_grad():
        assert (model.decoder(features, ids_keep)[:, ids_keep[0]] - ref[:, :n_vis]).abs().max() > 1e-3


# -- PVT ----------------------------------------------------------------------------------------

def test_pvt_every_official_key_is_converted_or_dropped_for_a_reason():
    sd = fill(pvt_spec())
    result = convert(sd, "ummae_pvt_demo", PVT_SETS)
    assert result.converted + len(result.dropped) == len(sd)
    assert set(result.dropped) == {"pos_embed", "decoder_pos_embed"}
    # Stage 2 has ratio 1 and still its reduction weights (sr_every_stage), as the official blocks.
    assert "encoder.stages.1.blocks.0.attn.sr.weight" in result.state_dict


def test_converted_pvt_computes_the_official_forward():
    sd = fill(pvt_spec())
    result = convert(sd, "ummae_pvt_demo", PVT_SETS)
    backbone = backbone_of(result, "ummae_pvt_demo", PVT_SETS)
    with torch.no_grad():
        ours, ref = backbone.forward_features(IMAGE), ref_pvt(sd, IMAGE)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)

    # Negative control: stage 1 not renumbered to timm's sin-cos channel order.
    original = official._renumber_pvt_stage1
    try:
        official._renumber_pvt_stage1 = lambda *a: None
        wrong = backbone_of(convert(sd, "ummae_pvt_demo", PVT_SETS), "ummae_pvt_demo", PVT_SETS)
    finally:
        official._renumber_pvt_stage1 = original
    with torch.no_grad():
        assert (wrong.forward_features(IMAGE) - ref).abs().max() > 1e-3


def test_a_pvt_position_table_that_is_not_the_fixed_one_is_refused():
    sd = fill(pvt_spec())
    sd["pos_embed"] = sd["pos_embed"] + 0.1
    with pytest.raises(UmmaeError, match="pos_embed.*sin-cos"):
        convert(sd, "ummae_pvt_demo", PVT_SETS)


# -- ViT ----------------------------------------------------------------------------------------

def test_vit_encoder_is_taken_as_is_and_the_decoder_is_initialised_afresh():
    sd = fill(vit_spec())
    result = convert(sd, "ummae_vit_demo", VIT_SETS)
    assert result.converted + len(result.dropped) == len(sd)
    assert set(result.dropped) == {k for k in sd if k.startswith("decoder_")} | {"mask_token"}
    assert result.initialised and all(k.startswith("decoder.") for k in result.initialised)
    for key in sd:
        if key in result.dropped:
            continue
        ours = result.state_dict["encoder.mask_token" if key == "vis_mask_token" else f"encoder.{key}"]
        assert torch.equal(ours, sd[key]), key


# -- what is refused ----------------------------------------------------------------------------

def test_unknown_and_missing_keys_are_named():
    sd = fill(swin_spec())
    with pytest.raises(UmmaeError, match="head.weight"):
        convert({**sd, "head.weight": torch.zeros(3, 8)}, "ummae_swin_demo", SWIN_SETS)
    del sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(UmmaeError, match=r"not in the file.*stages\.0\.blocks\.1\.attn\.qkv\.weight"):
        convert(sd, "ummae_swin_demo", SWIN_SETS)


def test_the_wrong_preset_is_a_shape_error_naming_the_key():
    sd = fill(swin_spec())
    with pytest.raises(UmmaeError, match=r"patch_embed.proj.weight' has shape \(8, 3, 4, 4\).*wrong --preset"):
        convert(sd, "ummae_swin_demo", [s.replace("embed_dim=8", "embed_dim=16") for s in SWIN_SETS])
    with pytest.raises(UmmaeError, match="does not have"):  # more blocks in the file than in the preset
        convert(sd, "ummae_swin_demo", [s.replace("depths=[2,2]", "depths=[1,1]") for s in SWIN_SETS])


def test_size_differences_the_file_shows_are_named_as_settings():
    """The released Swin-L comes with a 2- or 8-block decoder and a 32- or 64-wide position MLP."""
    sd = fill(swin_spec())
    with pytest.raises(UmmaeError, match="--set model.decoder_depth=1"):
        convert(sd, "ummae_swin_demo", SWIN_SETS + ["model.decoder_depth=2"])
    with pytest.raises(UmmaeError, match="--set model.pos_hidden_dim=4"):
        convert(sd, "ummae_swin_demo", SWIN_SETS + ["model.pos_hidden_dim=8"])


def test_converting_needs_the_official_options():
    from ummae.resolve import resolve_config

    cfg = resolve_config("ummae_swin_demo", sets=SWIN_SETS)  # merge=linear, eps 1e-5
    with pytest.raises(ConfigError, match="model.merge=conv"):
        official.convert_state_dict(fill(swin_spec()), cfg)
    with pytest.raises(ConfigError, match="hiera"):
        official.official_config("mae_hiera_demo")
    with pytest.raises(ConfigError, match="simmim"):
        official.official_config("simmim_swin_demo")


def test_reading_keeps_plain_training_arguments_and_refuses_code(save_official, tmp_path):
    import argparse

    sd = fill(swin_spec())
    path = save_official(sd, args=argparse.Namespace(lr=1e-3, model="mae_swin_tiny_256"))
    assert set(official.read_official(path)) == set(sd)

    class Payload:  # unpickling this would run os.system
        def __reduce__(self):
            import os
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = save_official(sd, name="evil.pth", extra=Payload())
    with pytest.raises(UmmaeError, match="refusing to load.*os.system|refusing to load.*posix.system"):
        official.read_official(evil)
    assert not (tmp_path / "pwned").exists()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UmmaeError, match="not a readable checkpoint"):
        official.read_official(junk)
    torch.save({"model": {"a": 1}}, tmp_path / "plain.pth")
    with pytest.raises(UmmaeError, match="no model state dict"):
        official.read_official(tmp_path / "plain.pth")
