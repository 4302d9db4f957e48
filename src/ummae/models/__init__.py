"""Models: one file per backbone (`swin.py`, `pvt.py`, `vit.py`), the shared MAE decoder
(`decoder.py`) and the pre-training methods around them: `mim.py` (MAE / UM-MAE), `emae.py`
(EMAE: K disjoint parts + self-consistency, on a `MaskedAutoencoder` or on Hiera) and `simmim.py` (the SimMIM
baseline); `hiera.py` is MAE around timm's own Hiera (not a copy). Every backbone serves every
method it supports, so the
encoder weights of a UM-MAE run and of a SimMIM run of the same backbone are interchangeable."""

from __future__ import annotations

from .decoder import MAEDecoder
from .emae import EfficientMaskedAutoencoder
from .mim import MaskedAutoencoder
from .simmim import SimMIM
from .swin import SwinTransformer

__all__ = ["MAEDecoder", "MaskedAutoencoder", "EfficientMaskedAutoencoder", "SimMIM", "SwinTransformer", "ENCODERS",
           "build_encoder", "build_pretrain_model"]


def _swin(m, img_size: int):
    return SwinTransformer(
        patch_size=m.patch_size, embed_dim=m.embed_dim, depths=m.depths, num_heads=m.num_heads,
        window_size=m.window_size, mlp_ratio=m.mlp_ratio, pos_hidden_dim=m.pos_hidden_dim,
        drop_path_rate=m.drop_path_rate, merge=m.merge, norm_eps=m.norm_eps)


def _pvt(m, img_size: int):
    from .pvt import PyramidVisionTransformer

    return PyramidVisionTransformer(
        patch_size=m.patch_size, embed_dims=m.embed_dims, depths=m.depths, num_heads=m.num_heads,
        mlp_ratios=m.mlp_ratios, sr_ratios=m.sr_ratios, drop_path_rate=m.drop_path_rate,
        embed_norm=m.embed_norm, sr_every_stage=m.sr_every_stage, norm_eps=m.norm_eps)


def _vit(m, img_size: int):
    from .vit import VisionTransformer

    return VisionTransformer(
        img_size=img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depths[0],
        num_heads=m.num_heads[0], mlp_ratio=m.mlp_ratio, drop_path_rate=m.drop_path_rate)


def _hiera(m, img_size: int, unit: int = 32):
    from .hiera import build_hiera

    return build_hiera(m, img_size, unit)


# Backbone family -> encoder builder (explicit: no lookup of arbitrary names).
ENCODERS = {"swin": _swin, "pvt": _pvt, "vit": _vit, "hiera": _hiera}


def build_encoder(cfg):
    """The encoder described by a `PretrainConfig`'s model section."""
    if cfg.model.arch == "hiera":  # timm's Hiera: its mask units (attention windows) are the config's
        return _hiera(cfg.model, cfg.data.img_size, cfg.masking.unit_size)
    return ENCODERS[cfg.model.arch](cfg.model, cfg.data.img_size)


def build_pretrain_model(cfg):
    """The pre-training model of a `PretrainConfig`: UM-MAE, MAE, EMAE or SimMIM around its encoder."""
    encoder = build_encoder(cfg)
    if cfg.model.arch == "hiera" and cfg.method == "emae":  # EMAE on timm's Hiera: random parts
        from .emae import HieraEMAE

        e = cfg.emae
        return HieraEMAE(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size, num_parts=e.num_parts,
                         consistency_weight=e.consistency_weight, consistency_distance=e.consistency_distance,
                         consistency_start_epoch=e.consistency_start_epoch, norm_pix_loss=cfg.model.norm_pix_loss,
                         decoder_dim=cfg.model.decoder_dim, decoder_depth=cfg.model.decoder_depth,
                         decoder_heads=cfg.model.decoder_heads)
    if cfg.model.arch == "hiera":  # MAE on timm's Hiera, masked through its own mask-unit API
        from .hiera import HieraMAE

        return HieraMAE(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size,
                        mask_ratio=cfg.masking.mask_ratio, norm_pix_loss=cfg.model.norm_pix_loss,
                        decoder_dim=cfg.model.decoder_dim, decoder_depth=cfg.model.decoder_depth,
                        decoder_heads=cfg.model.decoder_heads)
    if cfg.method == "simmim":
        return SimMIM(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size,
                      mask_ratio=cfg.masking.mask_ratio)
    if cfg.method == "emae":
        e = cfg.emae
        return EfficientMaskedAutoencoder(
            encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size, num_parts=e.num_parts,
            uniform=e.parts == "uniform", secondary_ratio=cfg.masking.secondary_ratio,
            consistency_weight=e.consistency_weight, consistency_distance=e.consistency_distance,
            consistency_start_epoch=e.consistency_start_epoch, norm_pix_loss=cfg.model.norm_pix_loss,
            decoder_dim=cfg.model.decoder_dim, decoder_depth=cfg.model.decoder_depth,
            decoder_heads=cfg.model.decoder_heads, decoder_norm_eps=cfg.model.decoder_norm_eps)
    return MaskedAutoencoder(
        encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size,
        masking="uniform" if cfg.method == "ummae" else "random",
        mask_ratio=cfg.masking.mask_ratio, secondary_ratio=cfg.masking.secondary_ratio,
        norm_pix_loss=cfg.model.norm_pix_loss, decoder_dim=cfg.model.decoder_dim,
        decoder_depth=cfg.model.decoder_depth, decoder_heads=cfg.model.decoder_heads,
        decoder_norm_eps=cfg.model.decoder_norm_eps)
