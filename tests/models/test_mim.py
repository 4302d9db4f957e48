"""UM-MAE model: the loss, gradients, learning, and input checks."""

import pytest
import torch

from ummae.errors import ConfigError, UmmaeError
from ummae.masking import RandomMasking
from ummae.models import MaskedAutoencoder, SwinTransformer


def tiny_ummae(secondary_ratio=0.25, img_size=64) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = SwinTransformer(embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 4), window_size=4)
    # stride 16 on the compact image, unit 8 -> each final token spans 2x2 units
    return MaskedAutoencoder(encoder, img_size=img_size, unit=8, secondary_ratio=secondary_ratio,
                 decoder_dim=32, decoder_depth=1, decoder_heads=4)


def test_forward_shapes_and_mask_statistics():
    model = tiny_ummae()
    imgs = torch.randn(3, 3, 64, 64)
    loss, pred, masks = model(imgs, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (3, 64, 8 * 8 * 3)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert masks.mask.sum(1).tolist() == [48, 48, 48]
    assert masks.secondary.sum(1).tolist() == [4, 4, 4]


def test_only_masked_units_enter_the_loss():
    model = tiny_ummae()
    imgs = torch.randn(2, 3, 64, 64)
    masks = model.sample_masks(2, generator=torch.Generator().manual_seed(0))
    _, pred, _ = model(imgs, masks)
    pred = pred.detach().requires_grad_(True)
    loss = model.forward_loss(imgs, pred, masks.mask)
    loss.backward()
    grad_per_unit = pred.grad.abs().sum(-1)  # [B, L]
    assert (grad_per_unit[masks.mask] > 0).all()
    assert (grad_per_unit[~masks.mask] == 0).all()  # visible units, secondary ones included
    assert masks.secondary.any()

    # Changing a visible unit's prediction leaves the loss alone; a masked one changes it.
    with torch.no_grad():
        visible = pred.clone()
        visible[~masks.mask] += 10.0
        masked = pred.clone()
        masked[masks.mask] += 10.0
    assert torch.equal(model.forward_loss(imgs, visible, masks.mask), loss.detach())
    assert model.forward_loss(imgs, masked, masks.mask) > loss.detach() + 1


def test_norm_pix_loss_is_invariant_to_per_unit_brightness():
    """With normalised targets, adding a constant to a whole unit does not change its target."""
    model = tiny_ummae()
    imgs = torch.randn(1, 3, 64, 64)
    pred = torch.randn(1, 64, 192)
    mask = torch.ones(1, 64, dtype=torch.bool)
    brighter = imgs.clone()
    brighter[..., :8, :8] += 3.0  # exactly unit 0
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), model.forward_loss(brighter, pred, mask))


def test_every_parameter_gets_a_gradient_including_the_secondary_token():
    model = tiny_ummae()
    loss, _, _ = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert model.encoder.mask_token.grad.abs().sum() > 0


def test_without_secondary_masking_the_token_gets_no_gradient():
    model = tiny_ummae(secondary_ratio=0.0)
    loss, _, masks = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert not masks.secondary.any()
    grad = model.encoder.mask_token.grad
    assert grad is None or grad.abs().sum() == 0


def test_tiny_model_overfits_one_batch():
    model = tiny_ummae()
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64).cumsum(-1).cumsum(-2) / 8  # smooth, learnable structure
    masks = model.sample_masks(2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss, _, _ = model(imgs, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first / 10, (first, loss.item())


def test_random_mask_is_refused_with_a_clear_error():
    model = tiny_ummae()
    masks = RandomMasking((8, 8), 0.75)(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UmmaeError, match="uniform mask"):
        model(torch.randn(2, 3, 64, 64), masks)


@pytest.mark.parametrize("img_size, match", [(72, "stride"), (60, "not divisible by the mask unit")])
def test_image_sizes_that_do_not_fit_are_config_errors(img_size, match):
    with pytest.raises(ConfigError, match=match):
        tiny_ummae(img_size=img_size)


def test_wrong_input_size_is_refused():
    with pytest.raises(ConfigError, match="built for"):
        tiny_ummae()(torch.randn(1, 3, 96, 96))
