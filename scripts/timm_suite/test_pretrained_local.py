"""timm's `test_model_load_pretrained` / `test_model_features_pretrained`, with the weights from a
local file instead of the hub (ummae has no hosted weights): the same `create_model` calls, plus
`pretrained_cfg_overlay=dict(file=...)`. Run by `scripts/timm_model_tests.py` next to timm's
`test_models.py`."""

import pytest
import torch
from timm import create_model

import ummae  # noqa: F401 - registers the models

MODELS = ["ummae_pvt", "ummae_swin", "ummae_vit"]
NON_STD = ["ummae_vit"]  # timm's NON_STD_FILTERS ("vit_*") leave ViTs out of the features test


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """`weights(name)` -> a local file with the default model's weights (mask token included, as
    `ummae export` writes it)."""
    root = tmp_path_factory.mktemp("weights")

    def get(name):
        path = root / f"{name}.pth"
        if not path.exists():
            torch.save(create_model(name, mask_token=True).state_dict(), path)
        return str(path)

    return get


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_load_pretrained(model_name, batch_size, weights):
    overlay = dict(file=weights(model_name))
    create_model(model_name, pretrained=True, in_chans=1, num_classes=5, pretrained_cfg_overlay=overlay)
    create_model(model_name, pretrained=True, in_chans=1, num_classes=0, pretrained_cfg_overlay=overlay)


@pytest.mark.parametrize("model_name", [m for m in MODELS if m not in NON_STD])
@pytest.mark.parametrize("batch_size", [1])
def test_model_features_pretrained(model_name, batch_size, weights):
    create_model(model_name, pretrained=True, features_only=True,
                 pretrained_cfg_overlay=dict(file=weights(model_name)))
