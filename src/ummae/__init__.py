"""ummae: efficient masked-image-modeling pre-training (UM-MAE) of vision backbones.

Start with `ummae.masking` (uniform / random masks), `ummae.models` (encoders, decoder, the
UM-MAE wrapper) and `ummae.engine.pretrain` (the training loop); `ummae --help` for the CLI.

Importing ummae also puts its backbones in timm's model registry (`ummae_swin`, `ummae_pvt`,
`ummae_vit`; see `ummae.models.registry` and `ummae export`), as soon as timm is imported.
"""

import importlib.util
import sys
import warnings

__version__ = "0.1.0"


def _register_with_timm() -> None:
    try:
        importlib.import_module("ummae.models.registry")
    except Exception as e:  # noqa: BLE001 - never break `import timm` over this
        warnings.warn(f"ummae: could not register its models with timm: {e}", stacklevel=2)


class _RegisterAfterTimmImport:
    """Import hook: register ummae's models right after timm finishes loading.

    Importing timm takes seconds, which `import ummae` (and `ummae --help`) should not pay, yet
    `import ummae; import timm; timm.create_model("ummae_swin", ...)` must work. So the
    registration waits for timm's own import, whichever module triggers it. One-shot: removes
    itself at the first import of timm.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real finder, now that this one is gone
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_timm = loader.exec_module

        def exec_module(module):
            exec_timm(module)
            _register_with_timm()

        loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimmImport())
