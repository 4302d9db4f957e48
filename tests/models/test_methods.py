"""Every method on every backbone (the tiny `*_demo` presets), and SimMIM's own invariants."""

import pytest
import torch

from ummae.resolve import resolve_config
from ummae.masking import RandomMasking
from ummae.models import SimMIM, SwinTransformer, build_encoder, build_pretrain_model
from ummae.objectives import patchify
from ummae.presets import PRESETS

DEMO_PRESETS = sorted(name for name in PRESETS if name.endswith("_demo"))


def build(name: str, **sets):
    cfg = resolve_config(preset=name, sets=[f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(0)
    return cfg, build_pretrain_model(cfg)


def test_the_grid_has_a_demo_of_every_method_and_backbone():
    assert DEMO_PRESETS == ["emae_hiera_demo", "emae_pvt_demo", "emae_swin_demo", "emae_swinv2_demo", "emae_vit_demo",
                            "mae_hiera_demo",
                            "mae_vit_demo", "simmim_pvt_demo", "simmim_swin_demo", "simmim_swinv2_demo",
                            "ummae_pvt_demo", "ummae_swin_demo", "ummae_swinv2_demo", "ummae_vit_demo"]


@pytest.mark.parametrize("name", DEMO_PRESETS)
def test_forward_backward_gives_a_finite_loss_and_every_parameter_a_gradient(name):
    cfg, model = build(name)
    if cfg.model.arch == "swinv2":
        # timm's Swin V2 starts every block's post-norms at zero weight (res-post-norm init), so
        # each block is the identity and its inner weights get their first gradient only after
        # step 1; set the norms to one to see that every weight is reached.
        with torch.no_grad():
            for n, mod in model.encoder.named_modules():
                if n.endswith(("norm1", "norm2")) and ".blocks." in n:
                    mod.weight.fill_(1.0)
    imgs = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size)
    loss, pred, masks = model(imgs, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    rows = 2 * (cfg.emae.num_parts if cfg.method == "emae" else 1)  # EMAE: K parts per image
    assert pred.shape == (rows, (cfg.data.img_size // cfg.masking.unit_size) ** 2, cfg.masking.unit_size ** 2 * 3)
    loss.backward()
    no_grad = {n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)}
    assert no_grad == set()
    # Plain MAE (random masks, no secondary masking) never uses the encoder's mask token, so it
    # is frozen rather than left without a gradient (DDP would wait for one).
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {"encoder.pos_embed"} if cfg.model.arch == "vit" else set()  # ViT's fixed sin-cos table
    # timm's Hiera has no mask token
    if cfg.model.arch == "vit" and (cfg.method == "mae" or (cfg.method == "emae" and cfg.emae.parts == "random")):
        expected.add("encoder.mask_token")
    assert frozen == expected


@pytest.mark.parametrize("backbone", ["swin", "pvt"])
def test_ummae_and_simmim_encoders_load_each_others_weights(backbone):
    _, um = build(f"ummae_{backbone}_demo")
    _, sim = build(f"simmim_{backbone}_demo")
    assert um.encoder.state_dict().keys() == sim.encoder.state_dict().keys()
    sim.encoder.load_state_dict(um.encoder.state_dict())  # strict
    um.encoder.load_state_dict(sim.encoder.state_dict())
    for key, value in um.encoder.state_dict().items():
        assert torch.equal(value, sim.encoder.state_dict()[key])


@pytest.mark.parametrize("backbone", ["swin", "pvt"])
def test_ummae_weights_run_the_full_image_as_simmim_does(backbone):
    """The UM-trained encoder, windows/reductions set for the full image, gives SimMIM's features."""
    _, um = build(f"ummae_{backbone}_demo")
    _, sim = build(f"simmim_{backbone}_demo")
    sim.encoder.load_state_dict(um.encoder.state_dict())
    if backbone == "swin":
        um.encoder.set_window_size(sim.encoder.window_size)
    imgs = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(um.encoder.forward_features(imgs), sim.encoder.forward_features(imgs))


def test_simmim_loss_counts_only_masked_units_and_uses_raw_pixels():
    _, model = build("simmim_swin_demo")
    imgs = torch.randn(2, 3, 128, 128)
    masks = model.sample_masks(2, generator=torch.Generator().manual_seed(0))
    target = patchify(imgs, 16)
    perfect_on_masked = torch.where(masks.mask.unsqueeze(-1), target, target + 5.0)
    assert model.forward_loss(imgs, perfect_on_masked, masks.mask) == 0
    off_by_one = target + 1.0
    torch.testing.assert_close(model.forward_loss(imgs, off_by_one, masks.mask), torch.tensor(1.0))


def test_simmim_replaces_exactly_the_patches_of_masked_units():
    _, model = build("simmim_swin_demo")
    masks = RandomMasking((8, 8), 0.75)(2, generator=torch.Generator().manual_seed(1))
    patch_mask = model.patch_mask(masks.mask)  # [B, 32, 32] patches of 4 px
    assert patch_mask.shape == (2, 32, 32)
    for b in range(2):
        for unit in range(64):
            r, c = divmod(unit, 8)
            block = patch_mask[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
            assert bool(block.all()) == bool(masks.mask[b, unit]) and bool(block.any()) == bool(masks.mask[b, unit])


def test_simmim_head_maps_each_feature_to_the_pixels_it_covers():
    """Pixel shuffle: the stride-32 feature at (r, c) predicts the 32x32 pixels at (32r, 32c)."""
    encoder = SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)
    model = SimMIM(encoder, img_size=64, unit=16)
    features = torch.zeros(1, 2, 2, encoder.num_features)
    features[0, 1, 0] = 1.0  # only the bottom-left token is on
    with torch.no_grad():
        model.decoder.bias.zero_()
        model.decoder.weight.fill_(1.0)
        pred = model.forward_decoder(features)  # [1, 16, 768]: 4x4 units of 16 px
    lit = pred[0].abs().sum(-1).view(4, 4) > 0
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2:, :2] = True
    assert torch.equal(lit, expected)


def test_build_encoder_matches_the_encoder_inside_the_pretrain_model():
    cfg, model = build("ummae_pvt_demo")
    assert type(build_encoder(cfg)) is type(model.encoder)
