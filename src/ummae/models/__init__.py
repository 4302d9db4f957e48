"""Models: one file per backbone (`swin.py`, `pvt.py`, `vit.py`; `hiera.py` is MAE around timm's
own Hiera, not a copy; `swinv2.py` runs timm's own Swin V2 on the compact image), the shared MAE decoder (`decoder.py`) and the pre-training methods around
them, each a `method.MaskedImageModel`: `mim.py` (MAE / UM-MAE), `emae.py` (EMAE: K disjoint
parts + self-consistency, on a `MaskedAutoencoder` or on Hiera) and `simmim.py` (the SimMIM
baseline). Every backbone serves every method it supports, so the encoder weights of a UM-MAE
run and of a SimMIM run of the same backbone are interchangeable.

Each of those files ends by registering its spec (`specs.py`); importing this package registers
them all, in this order. `build_pretrain_model(cfg)` and `build_encoder(cfg)` ask the specs.
"""

from __future__ import annotations

# Registered in this order (the order error messages list them in).
from . import swin, pvt, vit, hiera, swinv2  # noqa: F401, I001 - backbones: `model.arch` swin, pvt, vit, hiera, swinv2
from . import mim, simmim, emae  # noqa: F401, I001 - methods: ummae, mae, simmim, emae
from .decoder import MAEDecoder
from .emae import EfficientMaskedAutoencoder
from .mim import MaskedAutoencoder
from .simmim import SimMIM
from .specs import build_encoder, build_pretrain_model
from .swin import SwinTransformer

__all__ = ["MAEDecoder", "MaskedAutoencoder", "EfficientMaskedAutoencoder", "SimMIM", "SwinTransformer",
           "build_encoder", "build_pretrain_model"]
