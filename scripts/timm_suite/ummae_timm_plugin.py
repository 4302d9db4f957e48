"""pytest plugin: run timm's own `tests/test_models.py` against ummae's registered models.

Loaded with `-p ummae_timm_plugin` (see `scripts/timm_model_tests.py`), before timm's test module
is collected. It

- imports ummae, so `ummae_swin`, `ummae_pvt`, `ummae_vit` are in timm's registry;
- replaces `timm.list_models` / `timm.list_pretrained`, which `test_models.py` calls at import
  time to parametrize its tests, by versions that answer with ummae's models only. Each model is
  matched the way timm matches its own family: `ummae_vit` as a `vit_*` name from module
  `vision_transformer` (so it is one of timm's "non-standard" ViTs, with their tests),
  `ummae_swin` from `swin_transformer`, `ummae_pvt` from `pvt_v2`. There are no hosted weights,
  so the `pretrained=True` lists are empty (`test_pretrained_local.py` makes the same calls on
  local files instead);
- deselects what is not about these models: tests parametrized with timm's own model names
  (resnet18, convnext_atto, ...) and TorchScript (`torch.jit.script`; deprecated in current
  PyTorch, and ummae's models are not written for it).
"""

from __future__ import annotations

import fnmatch

import timm

import ummae  # noqa: F401 - registers the models with timm
from ummae.models import registry  # noqa: F401 - registration without waiting for the lazy hook

# ummae name -> (name to match timm's name filters, timm module of the same family)
FAMILY = {
    "ummae_swin": ("ummae_swin", "swin_transformer"),
    "ummae_pvt": ("ummae_pvt", "pvt_v2"),
    "ummae_vit": ("vit_ummae", "vision_transformer"),
}
DESELECT_KEYWORDS = ("torchscript",)


def _patterns(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    """timm's `list_models`, answered from ummae's three models only."""
    if pretrained:
        return []  # no hosted weights
    names = []
    for name, (alias, family) in FAMILY.items():
        candidates = (name, alias)
        if _patterns(module) and not any(fnmatch.fnmatch(family, m) for m in _patterns(module)):
            continue
        if _patterns(filter) and not any(fnmatch.fnmatch(c, f) for c in candidates for f in _patterns(filter)):
            continue
        if any(fnmatch.fnmatch(c, f) for c in candidates for f in _patterns(exclude_filters)):
            continue
        names.append(name)
    return names


def list_pretrained(filter="", exclude_filters=""):
    return []


timm.list_models = list_models
timm.list_pretrained = list_pretrained


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        ours = name in FAMILY or item.path.name == "test_pretrained_local.py"
        if ours and not any(k in item.name for k in DESELECT_KEYWORDS):
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
