"""Configuration: layer precedence, YAML round trip, type coercion, validation, the lr rule."""

from __future__ import annotations

import pytest
import yaml

from ummae.config import PretrainConfig, TrainConfig, apply_overrides, config_to_dict, parse_set_option
from ummae.resolve import resolve_config
from ummae.errors import ConfigError, UmmaeError


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------- layer precedence


def test_each_layer_overrides_the_one_below(tmp_path):
    """preset < config file < --set < named flags, key by key."""
    file = write_yaml(tmp_path / "c.yaml", {
        "train": {"epochs": 5, "seed": 11, "batch_size": 6},
        "optim": {"blr": 2e-4, "weight_decay": 0.01},
        "model": {"embed_dim": 64},
    })
    cfg = resolve_config(
        preset="demo", config_file=file,
        sets=["train.epochs=7", "optim.blr=3e-4", "train.seed=12"],
        flags={"train.epochs": 9, "train.seed": None, "train.batch_size": None},
    )
    assert cfg.train.epochs == 9          # flag beats --set, file and preset (12)
    assert cfg.optim.blr == 3e-4          # --set beats file and preset (1.5e-4)
    assert cfg.train.seed == 12           # --set beats file; a None flag is ignored
    assert cfg.train.batch_size == 6      # file beats preset (32); a None flag is ignored
    assert cfg.optim.weight_decay == 0.01  # file beats preset (0.05)
    assert cfg.model.embed_dim == 64      # file beats preset (32)
    assert cfg.data.img_size == 128       # untouched preset value
    assert cfg.model.window_size == 4     # preset beats the dataclass default (8)


def test_preset_alone_and_later_set_items_win():
    from ummae.presets import PRESETS

    default = resolve_config()
    assert default.preset == "demo"
    assert default.train.epochs == PRESETS["demo"][1]["train"]["epochs"] != TrainConfig().epochs
    cfg = resolve_config(sets=["train.epochs=3", "train.epochs=4"])
    assert cfg.train.epochs == 4


def test_file_preset_key_is_used_unless_preset_is_given(tmp_path):
    file = write_yaml(tmp_path / "c.yaml", {"preset": "ummae_swin_tiny_256", "train": {"epochs": 3}})
    from_file = resolve_config(config_file=file)
    assert from_file.preset == "ummae_swin_tiny_256"
    assert from_file.model.embed_dim == 96 and from_file.train.epochs == 3
    explicit = resolve_config(preset="demo", config_file=file)
    assert explicit.preset == "demo"
    assert explicit.model.embed_dim == 32 and explicit.train.epochs == 3


# ---------------------------------------------------------------- YAML round trip


@pytest.mark.parametrize("preset", ["demo", "ummae_swin_tiny_256"])
def test_dumped_config_fed_back_as_file_reproduces_it(tmp_path, preset, tiny_sets):
    sets = ["optim.lr=none", "optim.clip_grad=1.0", "data.path=/some/images", "train.out=/x/run",
            "optim.min_lr=1e-7", "model.norm_pix_loss=false", "train.precision=fp32"]
    if preset == "demo":
        sets = tiny_sets + sets
    cfg = resolve_config(preset=preset, sets=sets, flags={"train.seed": 5, "train.accum_steps": 3})
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    again = resolve_config(config_file=file)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again == cfg


def test_config_dict_holds_only_plain_values(tiny_config):
    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str)
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert value is None or type(value) in (str, int, float, bool), value

    check(config_to_dict(tiny_config))


# ---------------------------------------------------------------- type coercion


def overridden(key: str, value):
    return apply_overrides(PretrainConfig(), {key: value}, "test")


@pytest.mark.parametrize("key, raw, expected", [
    ("train.epochs", "3", 3),
    ("train.epochs", 3.0, 3),
    ("optim.blr", "1e-4", 1e-4),
    ("optim.blr", 2, 2.0),
    ("model.depths", "[1,2]", [1, 2]),
    ("model.depths", "1,2", [1, 2]),
    ("model.depths", ["1", 2.0], [1, 2]),
    ("optim.betas", "0.8, 0.9", [0.8, 0.9]),
    ("model.norm_pix_loss", "false", False),
    ("model.norm_pix_loss", "True", True),
    ("model.norm_pix_loss", "off", False),
    ("model.norm_pix_loss", "yes", True),
    ("model.norm_pix_loss", "0", False),
    ("model.norm_pix_loss", "1", True),
    ("optim.lr", "none", None),
    ("optim.lr", "null", None),
    ("optim.lr", None, None),
    ("optim.lr", "0.5", 0.5),
    ("data.path", 123, "123"),
])
def test_values_are_coerced_to_the_field_type(key, raw, expected):
    section, name = key.split(".")
    value = getattr(getattr(overridden(key, raw), section), name)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list):
        assert [type(v) for v in value] == [type(v) for v in expected]


@pytest.mark.parametrize("item, key, expected", [
    ("train.epochs=3", ("train", "epochs"), 3),
    ("optim.blr=1e-4", ("optim", "blr"), 1e-4),  # YAML 1.1 reads 1e-4 as a string
    ("model.depths=[1,1,2,1]", ("model", "depths"), [1, 1, 2, 1]),
    ("model.depths=1,1,2,1", ("model", "depths"), [1, 1, 2, 1]),
    ("optim.lr=none", ("optim", "lr"), None),
    ("optim.lr=", ("optim", "lr"), None),
    ("optim.lr=~", ("optim", "lr"), None),
    ("model.norm_pix_loss=false", ("model", "norm_pix_loss"), False),
    ("model.norm_pix_loss=off", ("model", "norm_pix_loss"), False),
    ("train.device=cpu", ("train", "device"), "cpu"),
])
def test_set_items_are_parsed_and_coerced(item, key, expected):
    cfg = resolve_config(sets=[item])
    value = getattr(getattr(cfg, key[0]), key[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw, expected", [("0", False), ("1", True)])
def test_set_accepts_0_and_1_for_a_boolean_like_the_coercion_rules(raw, expected):
    """`--set` parses its value as YAML first, so "0"/"1" reach the coercion as ints; they must
    still mean false/true, as the strings "0"/"1" do."""
    cfg = resolve_config(sets=[f"model.norm_pix_loss={raw}"])
    assert cfg.model.norm_pix_loss is expected


def test_parse_set_option_splits_at_the_first_equals_sign():
    assert parse_set_option("data.path=/a=b") == ("data.path", "/a=b")
    assert parse_set_option(" train.epochs =3") == ("train.epochs", 3)


# ---------------------------------------------------------------- validation


INVALID = {
    # id: (resolve_config kwargs, substrings the message must contain)
    "unknown section": (dict(sets=["nosuch.key=1"]), ["nosuch"]),
    "unknown key": (dict(sets=["model.nosuch=1"]), ["model.nosuch"]),
    "unknown preset": (dict(preset="nope"), ["nope", "--preset"]),
    "batch size 0": (dict(flags={"train.batch_size": 0}), ["train.batch_size", "--batch-size"]),
    "accum steps 0": (dict(flags={"train.accum_steps": 0}), ["train.accum_steps", "--accum-steps"]),
    "epochs 0": (dict(flags={"train.epochs": 0}), ["train.epochs", "--epochs"]),
    "max steps 0": (dict(flags={"train.max_steps": 0}), ["train.max_steps", "--max-steps"]),
    "negative seed": (dict(flags={"train.seed": -1}), ["train.seed", "--seed"]),
    "img not divisible by unit": (dict(sets=["data.img_size=100"]), ["data.img_size", "masking.unit_size"]),
    "odd unit grid": (dict(sets=["data.img_size=48", "masking.unit_size=16"]), ["data.img_size", "odd"]),
    "secondary ratio 1.0": (dict(sets=["masking.secondary_ratio=1.0"]), ["masking.secondary_ratio"]),
    "secondary ratio -0.1": (dict(sets=["masking.secondary_ratio=-0.1"]), ["masking.secondary_ratio"]),
    "bad device": (dict(flags={"train.device": "tpu"}), ["train.device", "--device", "tpu"]),
    "bad precision": (dict(sets=["train.precision=fp16"]), ["train.precision", "fp16"]),
    "num_heads length": (dict(sets=["model.num_heads=[1,2]"]), ["model.num_heads"]),
    "heads do not divide width": (dict(sets=["model.num_heads=[3,2,4,8]"]), ["model.num_heads[0]"]),
    "non-integer for int": (dict(sets=["train.epochs=2.5"]), ["train.epochs"]),
    "non-integer string for int": (dict(sets=["train.epochs='2.5'"]), ["train.epochs"]),
    "list for scalar": (dict(sets=["model.embed_dim=[1,2]"]), ["model.embed_dim"]),
    "list for string": (dict(sets=["train.device=[cpu]"]), ["train.device"]),
    "word for number": (dict(sets=["optim.blr=fast"]), ["optim.blr"]),
    "bool for int": (dict(sets=["train.epochs=true"]), ["train.epochs"]),
    "int 2 for bool": (dict(sets=["model.norm_pix_loss=2"]), ["model.norm_pix_loss"]),
    "scalar for list": (dict(sets=["model.depths=3"]), ["model.depths"]),
    "set without =": (dict(sets=["train.epochs"]), ["--set", "train.epochs"]),
    "set without section": (dict(sets=["epochs=3"]), ["--set", "epochs=3"]),
    "nan lr": (dict(sets=["optim.lr=nan"]), ["optim.lr"]),
    "negative weight decay": (dict(sets=["optim.weight_decay=-0.1"]), ["optim.weight_decay"]),
    "three betas": (dict(sets=["optim.betas=[0.9,0.95,0.99]"]), ["optim.betas"]),
    "drop path 1": (dict(sets=["model.drop_path_rate=1.0"]), ["model.drop_path_rate"]),
    "zero decoder heads": (dict(sets=["model.decoder_heads=0"]), ["model.decoder_heads"]),
    "unknown arch": (dict(sets=["model.arch=resnet"]), ["model.arch", "resnet"]),
    "empty data path": (dict(flags={"train.epochs": None, "data.path": " "}), ["data.path", "--data"]),
}


@pytest.mark.parametrize("kwargs, names", list(INVALID.values()), ids=list(INVALID))
def test_invalid_value_raises_config_error_naming_the_key(kwargs, names):
    with pytest.raises(ConfigError) as info:
        resolve_config(**kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for name in names:
        assert name in message


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UmmaeError)


def test_set_on_the_preset_pseudo_section_is_rejected_not_ignored():
    """`--set preset.name=X` is neither a section key nor a way to pick a preset.

    It is silently skipped today (the run uses the demo preset as if nothing was said), where
    every other unknown key raises a `ConfigError` naming it.
    """
    with pytest.raises(ConfigError, match="preset"):
        resolve_config(sets=["preset.name=ummae_swin_tiny_256"])


@pytest.mark.parametrize("item", ["optim.blr=inf", "optim.lr=.inf"])
def test_infinite_learning_rate_is_rejected(item):
    """An infinite lr passes validation today (only NaN and <= 0 are checked); the run then
    dies a few steps in with 'loss became nan' instead of a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=item.split("=")[0]):
        resolve_config(sets=[item])


def test_missing_config_file_is_named(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        resolve_config(config_file=path)
    assert str(path) in str(info.value) and "--config" in str(info.value)


@pytest.mark.parametrize("content", [
    "train: [1, 2\n",
    "train:\n  epochs: 3\n epochs: 4\n",
    b"\xff\xfe\x00\x81 not text",
], ids=["unclosed bracket", "bad indentation", "binary"])
def test_invalid_yaml_file_is_a_one_line_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        resolve_config(config_file=path)
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1


def test_yaml_list_is_refused_as_config_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- model\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        resolve_config(config_file=path)
    assert str(path) in str(info.value)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochz": 3}})
    with pytest.raises(ConfigError) as info:
        resolve_config(config_file=path)
    assert "train.epochz" in str(info.value) and path in str(info.value)


def test_section_that_is_not_a_mapping_is_refused(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": 3})
    with pytest.raises(ConfigError, match="'train'"):
        resolve_config(config_file=path)


def test_empty_config_file_means_no_overrides(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert resolve_config(config_file=path) == resolve_config()


# ---------------------------------------------------------------- learning rate


@pytest.mark.parametrize("batch, accum", [(64, 1), (32, 4), (256, 16), (3, 5)])
def test_lr_scales_blr_with_the_effective_batch(batch, accum):
    cfg = resolve_config(sets=["optim.lr=none", "optim.blr=2e-4"],
                         flags={"train.batch_size": batch, "train.accum_steps": accum})
    assert cfg.effective_batch == batch * accum
    assert cfg.lr == pytest.approx(2e-4 * batch * accum / 256, rel=1e-12)


def test_absolute_lr_wins_over_blr():
    cfg = resolve_config(sets=["optim.lr=0.003", "optim.blr=2e-4"],
                         flags={"train.batch_size": 512, "train.accum_steps": 2})
    assert cfg.lr == 0.003
    assert cfg.effective_batch == 1024
