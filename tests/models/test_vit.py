"""ViT encoder: visible-token path against a by-hand reference, order, secondary tokens, timm keys."""

import pytest
import timm.models.vision_transformer as timm_vit
import torch

from ummae.errors import ConfigError
from ummae.masking import MaskSample, RandomMasking, UniformMasking
from ummae.models.decoder import MAEDecoder
from ummae.models.vit import VisionTransformer

IMG, PATCH, DIM = 32, 8, 32  # 4x4 patch grid, one mask unit per patch
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=2)


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**dict(TINY, **kw)).eval()


def images(B=2, H=IMG, W=IMG) -> torch.Tensor:
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(1))


def reference_masked(model: VisionTransformer, imgs: torch.Tensor, masks: MaskSample) -> torch.Tensor:
    """MAE's encoder written out with the model's own modules, one sample at a time."""
    out = []
    for b in range(imgs.shape[0]):
        tokens = model.patch_embed(imgs[b:b + 1])[0]  # [N, C]
        if masks.secondary is not None:
            hidden = masks.secondary[b].unsqueeze(-1)
            tokens = torch.where(hidden, model.mask_token[0, 0], tokens)
        tokens = tokens + model.pos_embed[0, 1:]
        visible = tokens[masks.ids_keep[b]]  # [N_vis, C]
        cls = model.cls_token[0] + model.pos_embed[0, :1]  # [1, C]
        x = torch.cat([cls, visible], dim=0).unsqueeze(0)
        for blk in model.blocks:
            x = blk(x)
        out.append(model.norm(x)[0, 1:])
    return torch.stack(out)


@pytest.mark.parametrize("masking", [RandomMasking((4, 4), 0.75), UniformMasking((4, 4))],
                         ids=["random", "uniform"])
def test_forward_masked_returns_one_token_per_visible_unit(masking):
    model = tiny_vit()
    masks = masking(2, generator=torch.Generator().manual_seed(0))
    out = model.forward_masked(images(), masks, unit=PATCH)
    assert out.shape == (2, 4, DIM)
    assert torch.isfinite(out).all()


def test_forward_masked_equals_reference_computation():
    model = tiny_vit()
    masks = RandomMasking((4, 4), 0.75)(3, generator=torch.Generator().manual_seed(2))
    imgs = images(3)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_masked(imgs, masks, PATCH),
                                   reference_masked(model, imgs, masks), atol=1e-5, rtol=1e-5)


def test_permuting_ids_keep_permutes_the_output_tokens():
    """Global attention is order-equivariant, so the decoder may place tokens by ids_keep."""
    model = tiny_vit()
    masks = RandomMasking((4, 4), 0.5)(2, generator=torch.Generator().manual_seed(3))
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = MaskSample(masks.mask, masks.ids_keep[:, perm], masks.grid_size)
    imgs = images()
    with torch.no_grad():
        out = model.forward_masked(imgs, masks, PATCH)
        out_shuffled = model.forward_masked(imgs, shuffled, PATCH)
    torch.testing.assert_close(out_shuffled, out[:, perm], atol=1e-5, rtol=1e-5)


def test_secondary_units_enter_as_mask_token_plus_position():
    model = tiny_vit()
    masks = UniformMasking((4, 4), secondary_ratio=0.5)(2, generator=torch.Generator().manual_seed(4))
    imgs = images()
    seen = {}
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        out = model.forward_masked(imgs, masks, PATCH)
    handle.remove()

    x = seen["x"]  # [B, 1+N_vis, C], input of the first block
    pos = model.pos_embed[0, 1:]
    hidden = masks.secondary.gather(1, masks.ids_keep)  # [B, N_vis]
    assert hidden.sum() == 4  # 2 of 4 visible units per sample
    for b in range(2):
        for k, u in enumerate(masks.ids_keep[b].tolist()):
            if hidden[b, k]:
                torch.testing.assert_close(x[b, 1 + k], model.mask_token[0, 0] + pos[u])
            else:
                patch = imgs[b:b + 1, :, (u // 4) * PATCH:(u // 4 + 1) * PATCH, (u % 4) * PATCH:(u % 4 + 1) * PATCH]
                torch.testing.assert_close(x[b, 1 + k], model.patch_embed.proj(patch).flatten() + pos[u])
    with torch.no_grad():
        torch.testing.assert_close(out, reference_masked(model, imgs, masks), atol=1e-5, rtol=1e-5)


def test_mask_token_gets_a_gradient_only_with_secondary_masking():
    model = tiny_vit()
    imgs = images()
    um = UniformMasking((4, 4), secondary_ratio=0.5)(2, generator=torch.Generator().manual_seed(5))
    model.forward_masked(imgs, um, PATCH).square().mean().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    rs = RandomMasking((4, 4), 0.75)(2, generator=torch.Generator().manual_seed(5))
    model.forward_masked(imgs, rs, PATCH).square().mean().backward()
    assert model.mask_token.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.pos_embed.grad is None


def test_pos_embed_is_the_fixed_sincos_table_of_the_patch_grid():
    model = tiny_vit(img_size=(32, 48))  # non-square: 4x6 patches
    assert not model.pos_embed.requires_grad
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}
    table = model.pos_embed[0]
    assert table.shape == (1 + 4 * 6, DIM)
    assert (table[0] == 0).all()  # class token: no position
    # Independent formula: quarters sin(r*w), sin(c*w), cos(r*w), cos(c*w), w_i = 10000^(-i/(C/4)).
    omega = 10000.0 ** (-torch.arange(DIM // 4, dtype=torch.float64) / (DIM // 4))
    for u in range(4 * 6):
        r, c = divmod(u, 6)
        expected = torch.cat([torch.sin(r * omega), torch.sin(c * omega),
                              torch.cos(r * omega), torch.cos(c * omega)]).float()
        torch.testing.assert_close(table[1 + u], expected)
    # The decoder uses the same layout, so encoder and decoder positions agree.
    dec = MAEDecoder((4, 6), unit=PATCH, encoder_dim=DIM, decoder_dim=DIM, depth=0, num_heads=2)
    torch.testing.assert_close(table[1:], dec.pos_embed[0])


def test_non_square_images_and_decoder_placement():
    model = tiny_vit(img_size=(32, 48))
    masks = RandomMasking((4, 6), 0.75)(2, generator=torch.Generator().manual_seed(6))
    out = model.forward_masked(images(2, 32, 48), masks, PATCH)
    assert out.shape == (2, 6, DIM)
    dec = MAEDecoder((4, 6), unit=PATCH, encoder_dim=DIM, decoder_dim=16, depth=1, num_heads=2)
    assert dec(out, masks.ids_keep).shape == (2, 24, PATCH * PATCH * 3)


def test_configuration_errors():
    model = tiny_vit()
    masks = RandomMasking((2, 2), 0.75)(2)
    with pytest.raises(ConfigError, match="must equal the patch size"):
        model.forward_masked(images(), masks, unit=16)
    with pytest.raises(ConfigError, match="built for 32x32 images"):
        model.forward_masked(images(2, 48, 48), RandomMasking((6, 6), 0.75)(2), unit=PATCH)
    with pytest.raises(ConfigError, match="built for 32x32 images"):
        model.forward_features(images(2, 32, 40))
    with pytest.raises(ConfigError, match="does not match the ViT patch grid"):
        model.forward_masked(images(), masks, unit=PATCH)
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        VisionTransformer(img_size=36, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="reg_tokens"):
        VisionTransformer(**TINY, reg_tokens=4)


def test_forward_features_full_image_and_replace():
    model = tiny_vit(num_classes=5)
    imgs = images()
    none = torch.zeros(2, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        full = model.forward_features(imgs)
        assert full.shape == (2, 1 + 16, DIM)
        torch.testing.assert_close(model.forward_features(imgs, replace=none), full)
        assert model(imgs).shape == (2, 5)
        replace = none.clone()
        replace[0, 1, 2] = True
        seen = {}
        handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
        model.forward_features(imgs, replace=replace)
        handle.remove()
    u = 1 * 4 + 2
    torch.testing.assert_close(seen["x"][0, 1 + u], model.mask_token[0, 0] + model.pos_embed[0, 1 + u])


def test_state_dict_keys_are_timms_plus_mask_token():
    model = tiny_vit()
    reference = timm_vit.VisionTransformer(**TINY, num_classes=0, global_pool="avg", fc_norm=False)
    assert set(model.state_dict()) == set(reference.state_dict()) | {"mask_token"}
    # ... so the encoder exports to timm as is, and timm computes the same features.
    weights = {k: v for k, v in model.state_dict().items() if k != "mask_token"}
    reference.load_state_dict(weights)
    reference.eval()
    imgs = images()
    with torch.no_grad():
        torch.testing.assert_close(reference.forward_features(imgs), model.forward_features(imgs))
    assert model.no_weight_decay() >= {"mask_token", "pos_embed", "cls_token"}
    assert model.stride == model.patch_size == PATCH and model.num_features == DIM


def test_vit_base_parameter_count():
    with torch.device("meta"):
        model = VisionTransformer()  # ViT-B/16 at 224, no head
    total = sum(p.numel() for p in model.parameters())
    # timm's headless ViT-B/16 (85,798,656) + the 768-d mask token: "86M" as the papers round it.
    assert total == 85_798_656 + 768
    assert round(total / 1e6, 1) == 85.8
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total - trainable == 197 * 768  # the fixed position table
