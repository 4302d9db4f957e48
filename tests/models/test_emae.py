"""EMAE model and its self-consistency term: the loss, the stop-gradient, one batched pass of the
K parts equal to K separate passes, the consistency schedule, bf16 autocast, input checks."""

from __future__ import annotations

import pytest
import torch

from ummae.errors import ConfigError
from ummae.masking import MaskSample
from ummae.models import EfficientMaskedAutoencoder, MaskedAutoencoder, SwinTransformer
from ummae.models.pvt import PyramidVisionTransformer
from ummae.models.vit import VisionTransformer
from ummae.objectives import normalize_targets, patchify, self_consistency_loss


def _encoder(arch: str):
    if arch == "swin":  # stride 16 on the compact image, unit 8 -> each final token spans 2x2 units
        return SwinTransformer(embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 4), window_size=4)
    if arch == "pvt":
        return PyramidVisionTransformer(patch_size=4, embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2),
                                        mlp_ratios=(2, 2), sr_ratios=(2, 1))
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=16, depth=2, num_heads=2)


def tiny_emae(arch: str = "swin", uniform: bool | None = None, **kwargs) -> EfficientMaskedAutoencoder:
    torch.manual_seed(0)
    uniform = arch != "vit" if uniform is None else uniform
    return EfficientMaskedAutoencoder(_encoder(arch), img_size=64, unit=8, uniform=uniform,
                                      decoder_dim=32, decoder_depth=1, decoder_heads=4, **kwargs)


CASES = [("swin", True), ("pvt", True), ("vit", False), ("vit", True)]


# ---------------------------------------------------------------- the consistency term


def _parts_mask(seed: int = 0, B: int = 2, K: int = 4, L: int = 16) -> torch.Tensor:
    """Random disjoint parts: [B, K, L] bool, True = masked."""
    from ummae.masking import DisjointPartsMasking

    return DisjointPartsMasking((4, L // 4), K, uniform=False)(B, generator=torch.Generator().manual_seed(seed)).mask


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_consistency_is_zero_when_the_parts_agree_and_positive_otherwise(distance):
    mask = _parts_mask()
    agree = torch.randn(2, 1, 16, 12).expand(2, 4, 16, 12)
    assert self_consistency_loss(agree, mask, distance) == 0
    disagree = agree + 0.1 * torch.randn(2, 4, 16, 12)
    assert self_consistency_loss(disagree, mask, distance) > 0


def test_consistency_ignores_predictions_of_visible_units():
    """A part's prediction for a unit it SAW is not compared (it is not trained either)."""
    mask = _parts_mask()
    pred = torch.randn(2, 1, 16, 12).expand(2, 4, 16, 12).clone()
    pred[~mask] += 5.0  # change only visible units' predictions
    assert self_consistency_loss(pred, mask) == 0
    pred[:, 0, :, :] += mask[:, 0, :, None] * 1.0  # now part 0 disagrees on units it did not see
    assert self_consistency_loss(pred, mask) > 0


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_stop_gradient_each_branch_is_pulled_towards_the_other_as_a_fixed_target(distance):
    """K = 2: loss = d(sg(p0), p1) + d(p0, sg(p1)) averaged over units masked in both.

    Its VALUE is 2 d(p0, p1), but each branch's gradient is that of d(p_i, constant other), i.e.
    the gradient of ONE d(p0, p1), not of two: without the stop-gradients both would double."""
    torch.manual_seed(0)
    mask = torch.tensor([[[True, True, False, True], [True, False, True, True]]])  # both: units 0, 3
    p = torch.randn(1, 2, 4, 6, requires_grad=True)
    loss = self_consistency_loss(p, mask, distance)
    loss.backward()
    both = (mask[:, 0] & mask[:, 1]).float()[..., None]  # [1, 4, 1]
    diff = (p[:, 0] - p[:, 1]).detach()
    per_unit = diff.abs() if distance == "l1" else diff.pow(2)
    plain = (per_unit.mean(-1, keepdim=True) * both).sum() / both.sum()
    torch.testing.assert_close(loss.detach(), 2 * plain)
    dplain = (torch.sign(diff) if distance == "l1" else 2 * diff) / (6 * both.sum())
    torch.testing.assert_close(p.grad[:, 0], dplain * both)  # towards p1, only on shared units
    torch.testing.assert_close(p.grad[:, 1], -dplain * both)
    # Negative control: the same term without stop-gradient has twice the gradient.
    q = p.detach().clone().requires_grad_(True)
    d = (q[:, 0] - q[:, 1]).abs() if distance == "l1" else (q[:, 0] - q[:, 1]).pow(2)
    (2 * (d.mean(-1, keepdim=True) * both).sum() / both.sum()).backward()
    torch.testing.assert_close(q.grad[:, 0], 2 * p.grad[:, 0])


def test_one_sided_term_sends_no_gradient_to_the_stopped_branch():
    """The stop-gradient itself: through d(sg(p_i), p_j) only p_j receives a gradient."""
    from ummae.objectives import _distance

    a, b = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    _distance(a.detach(), b, "l1").sum().backward()
    assert a.grad is None and b.grad.abs().sum() > 0


def test_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="l1"):
        self_consistency_loss(torch.zeros(1, 2, 4, 3), torch.ones(1, 2, 4, dtype=torch.bool), "cosine")


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("arch,uniform", CASES)
def test_one_batched_pass_equals_k_separate_passes(arch, uniform):
    """The K parts through encoder and decoder as one batch of B*K == each part on its own
    through the same model as a plain MAE; the loss is the mean of the K MAE losses + consistency."""
    model = tiny_emae(arch, uniform).eval()
    imgs = torch.randn(2, 3, 64, 64)
    parts = model.sample_masks(2, generator=torch.Generator().manual_seed(1))
    loss, pred, _ = model(imgs, parts)
    pred = pred.reshape(2, 4, *pred.shape[1:])
    per_part_losses = []
    for k in range(4):
        secondary = None if parts.secondary is None else parts.secondary[:, k]
        one = MaskSample(parts.mask[:, k], parts.ids_keep[:, k], parts.grid_size, secondary)
        pred_k = MaskedAutoencoder.forward_decoder(model, MaskedAutoencoder.forward_encoder(model, imgs, one), one)
        torch.testing.assert_close(pred[:, k], pred_k, rtol=1e-4, atol=1e-5)
        per_part_losses.append(MaskedAutoencoder.forward_loss(model, imgs, pred_k, one.mask))
    expected = torch.stack(per_part_losses).mean() + self_consistency_loss(pred, parts.mask)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_forward_shapes():
    model = tiny_emae("swin")
    loss, pred, parts = model(torch.randn(3, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (12, 64, 8 * 8 * 3) and loss.ndim == 0 and torch.isfinite(loss)
    assert parts.mask.shape == (3, 4, 64) and parts.secondary.sum(-1).eq(4).all()


def test_reconstruction_term_scores_only_masked_units_against_normalised_targets():
    model = tiny_emae("vit")
    imgs = torch.randn(2, 3, 64, 64)
    parts = model.sample_masks(2, generator=torch.Generator().manual_seed(2))
    target = normalize_targets(patchify(imgs, 8))  # [2, 64, 192]
    pred = target.repeat_interleave(4, dim=0).clone()  # perfect on every unit
    assert model.loss_terms(imgs, pred, parts)["reconstruction"] == 0
    visible = (~parts.mask).flatten(0, 1)  # [8, 64]
    pred[visible] += 3.0  # errors on visible units do not count
    assert model.loss_terms(imgs, pred, parts)["reconstruction"] == 0
    pred[0, parts.mask[0, 0]] += 1.0
    assert model.loss_terms(imgs, pred, parts)["reconstruction"] > 0


def test_weight_and_start_epoch_of_the_consistency_term():
    model = tiny_emae("swin", consistency_weight=0.5, consistency_start_epoch=2)
    imgs = torch.randn(2, 3, 64, 64)
    parts = model.sample_masks(2, generator=torch.Generator().manual_seed(3))
    model.set_epoch(1)
    loss, pred, _ = model(imgs, parts)
    terms = model.loss_terms(imgs, pred, parts)
    assert terms["consistency"] > 0
    torch.testing.assert_close(loss, terms["reconstruction"])
    model.set_epoch(2)
    loss, pred, _ = model(imgs, parts)
    torch.testing.assert_close(loss, terms["reconstruction"] + 0.5 * terms["consistency"])
    assert "epoch" not in str(model.state_dict().keys())  # schedule state is not a weight


@pytest.mark.parametrize("arch,uniform", CASES)
def test_every_trainable_parameter_gets_a_gradient(arch, uniform):
    model = tiny_emae(arch, uniform)
    loss, _, _ = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    # Random parts have no secondary masking: the token is frozen (as for plain MAE).
    assert model.encoder.mask_token.requires_grad == uniform


@pytest.mark.parametrize("arch,uniform", CASES)
def test_bf16_autocast_forward_backward_on_cpu(arch, uniform):
    model = tiny_emae(arch, uniform)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tiny_model_learns_one_batch():
    model = tiny_emae("swin")
    imgs = torch.randn(2, 3, 64, 64).cumsum(-1).cumsum(-2) / 8
    parts = model.sample_masks(2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss, _, _ = model(imgs, parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, (losses[0], losses[-1])


def test_bad_settings_and_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="uniform"):
        tiny_emae("swin", uniform=False)  # a compacting encoder cannot take random parts
    with pytest.raises(ConfigError, match="distance"):
        tiny_emae("vit", consistency_distance="cosine")
    with pytest.raises(ConfigError, match=">= 0"):
        tiny_emae("vit", consistency_weight=-1.0)
    with pytest.raises(ConfigError, match="must be 4"):
        tiny_emae("swin", num_parts=2)
    model = tiny_emae("vit")
    plain = model.masking(2, generator=torch.Generator().manual_seed(0)).flatten()
    with pytest.raises(ConfigError, match="PartsSample"):
        model(torch.randn(2, 3, 64, 64), plain)
