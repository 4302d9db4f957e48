"""MAE on timm's Hiera: the encoder is timm's own, masked units are dropped by Hiera itself, the
multi-scale fusion is used, any MaskSample works, and bad configurations are one-line errors."""

from __future__ import annotations

import pytest
import torch
from timm.models.hiera import Hiera

from tiny import TINY_HIERA_SETS
from ummae.resolve import resolve_config
from ummae.errors import ConfigError, UmmaeError
from ummae.masking import MaskSample
from ummae.models import build_pretrain_model
from ummae.models.emae import HieraEMAE
from ummae.models.hiera import HieraMAE, load_backbone_weights
from ummae.objectives import masked_mse_loss, normalize_targets, patchify, self_consistency_loss


def tiny_cfg(*sets: str, preset: str = "mae_hiera_demo"):
    return resolve_config(preset, sets=[*TINY_HIERA_SETS, "data.img_size=128", *sets])


def tiny_model(*sets: str, seed: int = 0) -> HieraMAE:
    torch.manual_seed(seed)
    return build_pretrain_model(tiny_cfg(*sets)).eval()


def images(n: int = 2, size: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_presets_build_timms_hiera_with_its_own_keys_and_mask_units():
    import timm

    cfg = resolve_config("mae_hiera_tiny_224")
    assert (cfg.method, cfg.model.arch, cfg.masking.unit_size, cfg.masking.mask_ratio) == ("mae", "hiera", 32, 0.6)
    model = build_pretrain_model(cfg)
    assert type(model.encoder) is Hiera  # timm's class itself, not a copy or a subclass
    reference = timm.create_model("hiera_tiny_224", num_classes=0)
    assert model.encoder.state_dict().keys() == reference.state_dict().keys()
    assert all(v.shape == reference.state_dict()[k].shape for k, v in model.encoder.state_dict().items())
    assert model.grid_size == (7, 7) and model.masking.num_visible == 49 - 29  # 60% of 49 units hidden
    base = resolve_config("mae_hiera_base_224")
    assert base.model.depths == [2, 3, 16, 3] and base.data.img_size == 224
    demo = build_pretrain_model(resolve_config("mae_hiera_demo"))
    assert demo.grid_size == (4, 4) and demo.unit == 32


def test_masked_units_are_dropped_before_the_encoder_sees_them():
    model = tiny_model()
    imgs = images(1)
    masks = model.sample_masks(1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = model.forward_encoder(imgs, masks)
    assert feats.shape == (1, int((~masks.mask).sum()), model.encoder.num_features)  # one token per visible unit
    unit, (h, w) = model.unit, model.grid_size
    pixel_mask = masks.mask.view(1, h, w).repeat_interleave(unit, 1).repeat_interleave(unit, 2)  # [1, H, W]
    # Anything in the masked units: the visible units' features do not move.
    changed = torch.where(pixel_mask.unsqueeze(1), images(1, seed=9) * 5, imgs)
    with torch.no_grad():
        assert torch.allclose(model.forward_encoder(changed, masks), feats, atol=1e-5)
    # Negative control: changing a visible unit does change them.
    changed = torch.where(pixel_mask.unsqueeze(1), imgs, images(1, seed=9))
    with torch.no_grad():
        assert not torch.allclose(model.forward_encoder(changed, masks), feats, atol=1e-3)


def test_multiscale_fusion_is_used_and_is_exactly_pooled_stages_added_to_the_last():
    model = tiny_model()
    assert len(model.fusion) == 3  # stages 1-3 pooled to the last stage's one token per unit
    assert [f.kernel_size for f in model.fusion] == [(8, 8), (4, 4), (2, 2)]
    imgs = images(2)
    masks = model.sample_masks(2, generator=torch.Generator().manual_seed(1))
    keep, _ = model.visible_units(masks)
    with torch.no_grad():
        fused = model.forward_encoder(imgs, masks)
        plain_last = model.encoder.head.norm(model.encoder.forward_features(imgs, mask=keep))  # [B, N_vis, C]
        assert not torch.allclose(fused, plain_last, atol=1e-3)  # the fusion changes the features
        for conv in model.fusion:
            conv.weight.zero_()
            conv.bias.zero_()
        # With the fusion heads at zero, what remains is timm's own masked forward + its final norm.
        assert torch.allclose(model.forward_encoder(imgs, masks), plain_last, atol=1e-5)


def test_training_step_gives_every_parameter_a_gradient_and_the_loss_is_on_masked_units():
    model = tiny_model().train()
    imgs = images(2)
    loss, pred, masks = model(imgs, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 16, 32 * 32 * 3) and torch.isfinite(loss)
    expected = masked_mse_loss(pred, normalize_targets(patchify(imgs, 32)), masks.mask)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []  # DDP needs this


def test_any_mask_sample_works_whatever_the_order_of_ids_keep():
    """EMAE's disjoint parts (a flattened B*K batch, ids in any order) need only a MaskSample."""
    model = tiny_model()
    imgs = images(1)
    gen = torch.Generator().manual_seed(5)
    a = model.sample_masks(1, generator=gen)
    b = model.sample_masks(1, generator=gen)
    parts = MaskSample.cat([a, b])  # the same image twice, two different masks
    shuffled = MaskSample(parts.mask, parts.ids_keep.flip(1), parts.grid_size)  # descending order
    with torch.no_grad():
        loss1, pred1, _ = model(imgs.expand(2, -1, -1, -1), parts)
        loss2, pred2, _ = model(imgs.expand(2, -1, -1, -1), shuffled)
        single, _, _ = model(imgs, a)
    assert torch.allclose(pred1, pred2, atol=1e-6) and torch.allclose(loss1, loss2)
    assert torch.allclose(pred1[:1], model(imgs, a)[1], atol=1e-5)  # each row is its own sample
    assert torch.isfinite(single)


def test_secondary_masking_and_a_wrong_grid_are_refused():
    model = tiny_model()
    m = model.sample_masks(1)
    with pytest.raises(UmmaeError, match="mask token"):
        model(images(1), MaskSample(m.mask, m.ids_keep, m.grid_size, secondary=~m.mask))
    with pytest.raises(ConfigError, match="mask grid"):
        model.forward_encoder(images(1), MaskSample(torch.zeros(1, 4, dtype=torch.bool),
                                                    torch.arange(4).view(1, 4), (2, 2)))


def test_bf16_autocast_on_cpu_trains():
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(images(2), generator=torch.Generator().manual_seed(0))
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mask_ratio_and_unit_are_configurable():
    model = tiny_model("masking.mask_ratio=0.25")
    assert model.masking.num_visible == 12
    # The unit is Hiera's 8x8 tokens: 16 px with patch stride 2 (timm's 7x7 patch conv runs it).
    model = tiny_model("masking.unit_size=16", "model.patch_size=2", "data.img_size=64")
    assert model.grid_size == (4, 4) and tuple(model.encoder.patch_stride) == (2, 2)
    loss, pred, _ = model(images(1, size=64), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (1, 16, 16 * 16 * 3) and torch.isfinite(loss)


@pytest.mark.parametrize("sets, match", [
    (["method=ummae"], "method mae"),
    (["method=simmim"], "method mae"),
    (["model.depths=[1,1,1]", "model.num_heads=[1,2,4]"], "4 stages"),
    (["model.num_heads=[1,1,1,1]"], "doubles"),
    (["model.patch_size=8"], "8 x model.patch_size"),
    (["masking.unit_size=64"], "8 x model.patch_size"),
    (["data.img_size=80"], "divide data.img_size"),
])
def test_configurations_hiera_cannot_run_are_one_line_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(*sets)


def test_backbone_weights_from_timm_and_mae_checkpoints_load_into_the_encoder_only():
    import timm

    cfg = tiny_cfg()
    torch.manual_seed(7)
    source = timm.create_model("hiera_tiny_224", num_classes=0, img_size=128, embed_dim=8, stages=(1, 1, 1, 1))
    weights = source.state_dict()
    model = tiny_model()
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert load_backbone_weights(model, weights, "test") == []
    assert all(torch.equal(v, weights[k]) for k, v in model.encoder.state_dict().items())
    assert all(torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())

    # The official `.mae` layout: under `model_state`, final norm as `encoder_norm`, MAE head alongside.
    official = {("encoder_norm." + k[len("head.norm."):] if k.startswith("head.norm.") else k): v + 1
                for k, v in weights.items()}
    official.update({"multi_scale_fusion_heads.0.weight": torch.zeros(3), "decoder_embed.weight": torch.zeros(2),
                     "mask_token": torch.zeros(1)})
    skipped = load_backbone_weights(model, {"model_state": official}, "test")
    assert sorted(skipped) == ["decoder_embed.weight", "mask_token", "multi_scale_fusion_heads.0.weight"]
    assert torch.equal(model.encoder.head.norm.weight, weights["head.norm.weight"] + 1)

    # Another architecture's weights: one line naming what does not fit.
    other = build_pretrain_model(tiny_cfg("model.embed_dim=16")).encoder.state_dict()
    with pytest.raises(ConfigError, match="does not hold weights of this Hiera: shape"):
        load_backbone_weights(model, other, "test")
    del cfg


def test_classifier_uses_hieras_final_norm_and_timms_layer_groups():
    from timm.optim import param_groups_layer_decay

    from ummae.models.classifier import build_classifier

    cfg = tiny_cfg()
    clf, fresh = build_classifier(cfg, None, num_classes=3)
    assert clf.is_hiera and clf.num_blocks == 4
    x = images(2)
    fmap = clf.forward_feature_map(x)
    assert fmap.shape == (2, clf.num_features, 4, 4)
    with torch.no_grad():
        tokens = clf.encoder.head.norm(clf.encoder.forward_features(x))  # [B, 16, C], raster order
    assert torch.allclose(fmap.flatten(2).transpose(1, 2), tokens, atol=1e-6)
    groups = param_groups_layer_decay(clf, weight_decay=0.05, no_weight_decay_list=clf.no_weight_decay(),
                                      layer_decay=0.5)
    names = {id(p): n for n, p in clf.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.5 ** 5)  # stem: layer 0 of 0..5
    assert scale["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** 4)
    assert scale["encoder.blocks.3.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["head.weight"] == scale["encoder.head.norm.weight"] == 1.0
    assert "encoder.pos_embed" in clf.no_weight_decay()


def test_static_gather_of_visible_units_equals_timms_boolean_index():
    """The encoder's gather (static shape: no host sync, compiles as one graph) keeps exactly the
    tokens timm's own `forward_features(x, mask=...)` keeps, in its order, at every stage."""
    model = tiny_model().eval()
    x = images(3)
    masks = model.sample_masks(3, generator=torch.Generator().manual_seed(3))
    # EMAE-style unsorted ids_keep must give the same result as sorted ones.
    shuffled = MaskSample(masks.mask, masks.ids_keep.flip(1), masks.grid_size)
    keep, ids = model.visible_units(shuffled)
    with torch.no_grad():
        ours = model._masked_stages(x, keep, ids)
        _, timms = model.encoder.forward_features(x, mask=keep, return_intermediates=True)
        other = model._masked_stages(x, keep, ids.roll(1, dims=1))  # negative control: wrong order
    assert len(ours) == len(timms) == 4
    for a, b in zip(ours, timms):
        assert a.shape == b.shape and torch.equal(a, b)
    assert not torch.equal(other[0], timms[0])


# ---------------------------------------------------------------- EMAE on Hiera (random parts)


def tiny_emae(*sets: str, seed: int = 0) -> HieraEMAE:
    torch.manual_seed(seed)
    return build_pretrain_model(tiny_cfg(*sets, preset="emae_hiera_demo")).eval()


def test_emae_batched_pass_equals_k_separate_hiera_mae_passes():
    """The K parts of each image as ONE batch of B*K through Hiera == each part run on its own by a
    plain HieraMAE holding the same weights; the loss is the mean of the K MAE losses + consistency."""
    emae = tiny_emae()
    assert isinstance(emae, HieraEMAE) and emae.num_parts == 4
    mae = tiny_model(seed=1)
    mae.load_state_dict(emae.state_dict())  # strict: EMAE adds no weights, a checkpoint is MAE's
    imgs = images(2)
    parts = emae.sample_masks(2, generator=torch.Generator().manual_seed(1))
    assert parts.mask.shape == (2, 4, 16) and parts.mask.sum(-1).eq(12).all()  # 75% per part
    assert parts.mask.logical_not().sum(1).eq(1).all()  # every unit visible in exactly one part
    with torch.no_grad():
        loss, pred, _ = emae(imgs, parts)
        pred = pred.reshape(2, 4, *pred.shape[1:])
        losses = []
        for k in range(4):
            loss_k, pred_k, _ = mae(imgs, MaskSample(parts.mask[:, k], parts.ids_keep[:, k], parts.grid_size))
            torch.testing.assert_close(pred[:, k], pred_k, rtol=1e-4, atol=1e-5)
            losses.append(loss_k)
    # not vacuous: the parts see different units, so their predictions differ
    assert not torch.allclose(pred[:, 0], pred[:, 1], atol=1e-3)
    expected = torch.stack(losses).mean() + self_consistency_loss(pred, parts.mask)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_emae_consistency_is_zero_when_the_parts_agree_and_counts_from_its_start_epoch():
    model = tiny_emae("emae.consistency_weight=0.5", "emae.consistency_start_epoch=1")
    imgs = images(2)
    parts = model.sample_masks(2, generator=torch.Generator().manual_seed(2))
    perfect = normalize_targets(patchify(imgs, 32)).repeat_interleave(4, dim=0)  # [B*K, L, D], all agree
    terms = model.loss_terms(imgs, perfect, parts)
    assert terms["reconstruction"] == 0 and terms["consistency"] == 0
    noisy = perfect + 0.1 * torch.randn(perfect.shape, generator=torch.Generator().manual_seed(0))
    assert model.loss_terms(imgs, noisy, parts)["consistency"] > 0  # control: disagreeing parts
    with torch.no_grad():
        model.set_epoch(0)
        loss, pred, _ = model(imgs, parts)
        terms = model.loss_terms(imgs, pred, parts)
        torch.testing.assert_close(loss, terms["reconstruction"])
        model.set_epoch(1)
        loss, _, _ = model(imgs, parts)
    torch.testing.assert_close(loss, terms["reconstruction"] + 0.5 * terms["consistency"])


def test_emae_on_hiera_trains_with_two_parts_and_every_parameter_gets_a_gradient():
    model = tiny_emae("emae.num_parts=2").train()
    loss, pred, parts = model(images(2), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (4, 16, 32 * 32 * 3) and parts.mask.sum(-1).eq(8).all()  # K = 2: 50% each
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("sets, match", [
    (["emae.parts=uniform"], "does not apply to model.arch hiera"),
    (["emae.num_parts=3"], "does not divide"),  # 4x4 = 16 units
])
def test_emae_settings_hiera_cannot_run_are_one_line_errors(sets, match):
    with pytest.raises(ConfigError, match=match) as e:
        tiny_cfg(*sets, preset="emae_hiera_demo")
    assert "\n" not in str(e.value)
