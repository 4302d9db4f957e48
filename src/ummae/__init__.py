"""ummae: efficient masked-image-modeling pre-training (UM-MAE) of vision backbones.

Start with `ummae.masking` (uniform / random masks), `ummae.models` (encoders, decoder, the
UM-MAE wrapper) and `ummae.engine.pretrain` (the training loop); `ummae --help` for the CLI.
"""

__version__ = "0.1.0"
