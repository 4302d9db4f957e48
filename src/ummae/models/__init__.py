"""Models: one file per backbone (`swin.py`; PVT and ViT later), the shared MAE decoder
(`decoder.py`) and the masked-image-modeling wrappers (`mim.py`)."""

from __future__ import annotations

from .decoder import MAEDecoder
from .mim import MaskedAutoencoder
from .swin import SwinTransformer

__all__ = ["MAEDecoder", "SwinTransformer", "MaskedAutoencoder", "build_pretrain_model"]


def _swin_encoder(model_cfg) -> SwinTransformer:
    return SwinTransformer(
        patch_size=model_cfg.patch_size, embed_dim=model_cfg.embed_dim, depths=model_cfg.depths,
        num_heads=model_cfg.num_heads, window_size=model_cfg.window_size,
        mlp_ratio=model_cfg.mlp_ratio, pos_hidden_dim=model_cfg.pos_hidden_dim,
        drop_path_rate=model_cfg.drop_path_rate)


# Backbone family -> encoder builder. New backbones (PVT, ViT) register here.
ENCODERS = {"swin": _swin_encoder}


def build_pretrain_model(cfg) -> MaskedAutoencoder:
    """The pre-training model described by a `PretrainConfig` (see `ummae.config`)."""
    encoder = ENCODERS[cfg.model.arch](cfg.model)
    return MaskedAutoencoder(encoder, img_size=cfg.data.img_size, unit=cfg.masking.unit_size,
                 secondary_ratio=cfg.masking.secondary_ratio, norm_pix_loss=cfg.model.norm_pix_loss,
                 decoder_dim=cfg.model.decoder_dim, decoder_depth=cfg.model.decoder_depth,
                 decoder_heads=cfg.model.decoder_heads)
