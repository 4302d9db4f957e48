"""PVT encoder: true-position sin-cos embedding of compact tokens, spatial-reduction attention
shared by both paths, secondary masking, gradients, mask and size checks."""

import math

import pytest
import torch

from ummae.compaction import compact_coordinates, compact_image, compact_unit_flags
from ummae.errors import ConfigError, UmmaeError
from ummae.masking import MaskSample, RandomMasking, UniformMasking
from ummae.models.pvt import PyramidVisionTransformer, SpatialReductionAttention, masked_sr_ratio

UNIT = 8  # 2x2 patches of 4 px: a 64 px image has an 8x8 unit grid
C1 = 8


def tiny_pvt(**kw) -> PyramidVisionTransformer:
    torch.manual_seed(0)
    args = dict(embed_dims=(C1, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2),
                mlp_ratios=(2, 2, 2, 2))
    args.update(kw)
    return PyramidVisionTransformer(**args).eval()


def uniform_masks(batch: int, grid=(8, 8), secondary_ratio: float = 0.25, seed: int = 0) -> MaskSample:
    return UniformMasking(grid, secondary_ratio)(batch, generator=torch.Generator().manual_seed(seed))


def true_patch_indices(masks: MaskSample) -> torch.Tensor:
    """`[B, h, w, 2]` (row, col) of the full-grid patch each compact patch comes from."""
    return compact_coordinates(masks.ids_keep, masks.grid_size, UNIT // 4).floor().long()


def gather_grid(x: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
    """`x` `[B, H, W, C]` at per-sample indices `rc` `[B, h, w, 2]` -> `[B, h, w, C]`."""
    b = torch.arange(x.shape[0]).view(-1, 1, 1)
    return x[b, rc[..., 0], rc[..., 1]]


# -- shapes ----------------------------------------------------------------------------------
def test_shapes_of_full_masked_and_non_square_inputs():
    model = tiny_pvt(num_classes=5)
    assert (model.patch_size, model.stride, model.num_features) == (4, 32, 32)
    assert model.sr_ratios == (8, 4, 2, 1) and model.masked_sr_ratios == (4, 2, 1, 1)
    with torch.no_grad():
        imgs = torch.randn(2, 3, 64, 64)
        assert model.forward_features(imgs).shape == (2, 2, 2, 32)
        assert model.forward_masked(imgs, uniform_masks(2), UNIT).shape == (2, 1, 1, 32)
        assert model(imgs).shape == (2, 5)

        wide = torch.randn(2, 3, 64, 128)
        assert model.forward_features(wide).shape == (2, 2, 4, 32)
        out = model.forward_masked(wide, uniform_masks(2, grid=(8, 16)), UNIT)
        assert out.shape == (2, 1, 2, 32) and torch.isfinite(out).all()


# -- positions -------------------------------------------------------------------------------
def test_position_table_is_row_major_sincos_of_the_full_grid():
    """Entry (r, c): sin/cos of r in the first and third quarters, of c in the second and
    fourth (lowest frequency band = 1), for a non-square grid."""
    model = tiny_pvt()
    table = model.position_embedding(5, 7)
    assert table.shape == (5, 7, C1)
    q = C1 // 4
    r, c = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    torch.testing.assert_close(table[..., 0], torch.sin(r))
    torch.testing.assert_close(table[..., q], torch.sin(c))
    torch.testing.assert_close(table[..., 2 * q], torch.cos(r))
    torch.testing.assert_close(table[..., 3 * q], torch.cos(c))


def test_position_table_follows_the_input_size_and_is_not_saved():
    model = tiny_pvt()
    with torch.inference_mode():  # a table first built here must still serve training
        model.forward_features(torch.randn(1, 3, 64, 64))
    assert model.pos_embed.shape == (16, 16, C1)
    model.train()
    model.forward_features(torch.randn(1, 3, 96, 128)).square().mean().backward()
    assert model.pos_embed.shape == (24, 32, C1)
    assert "pos_embed" not in model.state_dict()


@pytest.mark.parametrize("secondary", ["none", "all_false"])
def test_compact_tokens_equal_full_image_tokens_at_their_true_positions(secondary):
    """Reference computation: embed the FULL image, add the full-grid table, gather at each
    compact token's true patch. The compacted path must give exactly that."""
    model = tiny_pvt()
    imgs = torch.randn(2, 3, 64, 128)
    masks = uniform_masks(2, grid=(8, 16), seed=3)
    masks.secondary = None if secondary == "none" else torch.zeros_like(masks.mask)
    with torch.no_grad():
        compact = model.embed_compact(imgs, masks, UNIT)  # [B, 8, 16, C1]
        full = model.embed(imgs) + model.position_embedding(16, 32)  # [B, 16, 32, C1]
        rc = true_patch_indices(masks)
        expected = gather_grid(full, rc)
        # What a compact-grid (wrong) position embedding would give.
        wrong = model.embed(compact_image(imgs, masks.ids_keep, UNIT)) + model.position_embedding(8, 16)
    assert compact.shape == (2, 8, 16, C1)
    torch.testing.assert_close(compact, expected, atol=1e-5, rtol=1e-5)
    assert (compact - wrong).abs().max() > 0.1


def test_secondary_units_get_the_mask_token_and_keep_their_position():
    model = tiny_pvt()
    imgs = torch.randn(2, 3, 64, 64)
    masks = uniform_masks(2, secondary_ratio=0.25)
    plain_masks = MaskSample(masks.mask, masks.ids_keep, masks.grid_size, None)
    with torch.no_grad():
        tokens = model.embed_compact(imgs, masks, UNIT)
        plain = model.embed_compact(imgs, plain_masks, UNIT)
        pos = gather_grid(model.position_embedding(16, 16).expand(2, -1, -1, -1), true_patch_indices(masks))
        token = model.patch_norm(model.mask_token)[0, 0, 0]  # [C1]: the token passes the norm
    replaced = compact_unit_flags(masks.secondary, masks.ids_keep, masks.grid_size, UNIT // 4)
    assert replaced.sum() == 2 * 4 * 4  # 4 of 16 units per sample, 2x2 patches each
    torch.testing.assert_close(tokens[replaced], (token + pos)[replaced])
    torch.testing.assert_close(tokens[~replaced], plain[~replaced])


# -- spatial-reduction attention -------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_reduction_is_average_pool_then_linear_then_norm(ratio):
    torch.manual_seed(0)
    attn = SpatialReductionAttention(dim=6, num_heads=2, has_reduction=True)
    with torch.no_grad():
        attn.norm.weight.normal_()
        attn.norm.bias.normal_()
    x = torch.randn(2, 8, 4, 6)  # [B, H, W, C]
    B, H, W, C = x.shape
    pooled = x.reshape(B, H // ratio, ratio, W // ratio, ratio, C).mean(dim=(2, 4))
    lin = pooled @ attn.sr.weight.T + attn.sr.bias
    mu, var = lin.mean(-1, keepdim=True), lin.var(-1, unbiased=False, keepdim=True)
    expected = (lin - mu) / torch.sqrt(var + attn.norm.eps) * attn.norm.weight + attn.norm.bias
    torch.testing.assert_close(attn.reduce(x, ratio), expected, atol=1e-5, rtol=1e-5)

    # ... and the attention attends over exactly those reduced keys/values.
    heads, hd = 2, 3
    q = (x @ attn.q.weight.T + attn.q.bias).reshape(B, H * W, heads, hd).transpose(1, 2)
    k, v = (expected @ attn.kv.weight.T + attn.kv.bias).reshape(B, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, H, W, C) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, ratio), out, atol=1e-5, rtol=1e-5)


def test_both_paths_use_the_same_weights_and_state_dict():
    model = tiny_pvt()
    keys = set(model.state_dict())
    # Reduction weights iff the full-image ratio is > 1: stages 1-3 (8, 4, 2), not stage 4 (1).
    assert {f"stages.{i}.blocks.0.attn.sr.weight" for i in range(3)} <= keys
    assert "stages.3.blocks.0.attn.sr.weight" not in keys
    imgs = torch.randn(2, 3, 64, 64)
    masks = uniform_masks(2)
    with torch.no_grad():
        masked = model.forward_masked(imgs, masks, UNIT)
        assert set(model.state_dict()) == keys
        full = model.forward_features(imgs)
        assert set(model.state_dict()) == keys
    # A checkpoint of one loads strictly into a fresh model and gives the same numbers.
    other = tiny_pvt()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other.forward_masked(imgs, masks, UNIT), masked)
        torch.testing.assert_close(other.forward_features(imgs), full)


def test_masked_ratios_are_halved_full_ratios():
    assert [masked_sr_ratio(r) for r in (8, 4, 2, 1)] == [4, 2, 1, 1]


def test_ratio_that_does_not_divide_the_grid_pools_partial_edge_cells():
    # 6x8 grid, ratio 4: keys/values from a 2x2 map whose bottom cells average only the 2 rows
    # they have (not zeros, not dropped).
    attn = SpatialReductionAttention(dim=4, num_heads=1, has_reduction=True)
    x = torch.randn(1, 6, 8, 4)
    pooled = torch.stack([torch.stack([x[0, r:r + 4, c:c + 4].mean(dim=(0, 1)) for c in (0, 4)])
                          for r in (0, 4)])[None]  # [1, 2, 2, 4]
    torch.testing.assert_close(attn.reduce(x, 4), attn.norm(attn.sr(pooled)))
    assert attn(x, 4).shape == x.shape


def test_ratio_without_reduction_weights_is_a_clear_error():
    no_weights = SpatialReductionAttention(dim=4, num_heads=1, has_reduction=False)
    with pytest.raises(ConfigError, match="without reduction weights"):
        no_weights(torch.randn(1, 4, 4, 4), 2)


@pytest.mark.parametrize("size", [(48, 64), (30, 32), (61, 67), (224, 224)])
def test_full_image_takes_any_size(size):
    # Sides are zero-padded to the patch, odd stage grids by one row / column (ceil), and the
    # reduction pools partial edge cells: the final map is ceil(side / 32).
    model = tiny_pvt()
    out = model.forward_features(torch.randn(1, 3, *size))
    assert out.shape == (1, -(-size[0] // 32), -(-size[1] // 32), 32)
    assert torch.isfinite(out).all()
    maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(-(-size[0] // s), -(-size[1] // s)) for s in (4, 8, 16, 32)]


def test_masked_sizes_that_do_not_fit_are_clear_errors():
    model = tiny_pvt()
    with pytest.raises(ConfigError, match="compact image size 16x32"):  # 32 px: compact 16 px
        model.forward_masked(torch.randn(1, 3, 32, 64), uniform_masks(1, grid=(4, 8)), UNIT)
    with pytest.raises(ConfigError, match="does not match"):
        model.forward_masked(torch.randn(1, 3, 64, 128), uniform_masks(1), UNIT)


def test_masked_path_refuses_a_non_uniform_mask():
    model = tiny_pvt()
    masks = RandomMasking((8, 8), 0.75)(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UmmaeError, match="uniform mask"):
        model.forward_masked(torch.randn(2, 3, 64, 64), masks, UNIT)


# -- gradients -------------------------------------------------------------------------------
def _assert_every_parameter_has_a_gradient(model):
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_every_parameter_gets_a_gradient_through_the_masked_path():
    model = tiny_pvt(drop_path_rate=0.1).train()
    out = model.forward_masked(torch.randn(2, 3, 64, 64), uniform_masks(2, secondary_ratio=0.25), UNIT)
    (out * torch.randn_like(out)).sum().backward()  # a plain sum would cancel in the final norm
    _assert_every_parameter_has_a_gradient(model)


def test_every_parameter_gets_a_gradient_through_the_full_path_with_replace():
    model = tiny_pvt().train()
    replace = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    out = model.forward_features(torch.randn(2, 3, 64, 64), replace)
    (out * torch.randn_like(out)).sum().backward()
    _assert_every_parameter_has_a_gradient(model)


def test_grad_checkpointing_gives_the_same_output():
    model = tiny_pvt().train()
    imgs, masks = torch.randn(2, 3, 64, 64), uniform_masks(2)
    ref = model.forward_masked(imgs, masks, UNIT)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model.forward_masked(imgs, masks, UNIT), ref)


def test_no_weight_decay_names_the_mask_token():
    model = tiny_pvt()
    assert model.no_weight_decay() == {"mask_token"}
    assert "mask_token" in dict(model.named_parameters())


# -- PVT-Small -------------------------------------------------------------------------------
def test_pvt_small_parameter_count():
    """PVT-S is 24.5M in its paper. Ours differs by design, and exactly by: the strided r x r
    reduction conv (here a 1x1 linear after pooling) and the learnable per-stage position
    tables at 224 px (here one fixed sin-cos buffer)."""
    with torch.device("meta"):
        model = PyramidVisionTransformer(num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    head = 512 * 1000 + 1000
    assert 19.8e6 < n - head < 20.2e6  # encoder alone: 19.98M

    dims, depths, ratios = (64, 128, 320, 512), (3, 4, 6, 3), (8, 4, 2, 1)
    conv_extra = sum(d * (r * r - 1) * d * k for d, k, r in zip(dims, depths, ratios))
    learned_pos = 56 * 56 * 64 + 28 * 28 * 128 + 14 * 14 * 320 + (7 * 7 + 1) * 512 + 512  # + cls token
    assert abs(n + conv_extra + learned_pos - 24.5e6) < 0.1e6
