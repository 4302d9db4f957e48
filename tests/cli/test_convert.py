"""`ummae convert` end to end: an official-layout file in, an ummae checkpoint out that `export`,
`finetune` and `pretrain --init-weights` take; bad files are one line and exit status 2."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from official_spec import PVT_SETS, SWIN_SETS, fill, pvt_spec, swin_spec
from tiny import run_cli_captured
from ummae.engine.checkpoint import load_checkpoint
from ummae.models.loading import load_backbone


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    files = {}
    for arch, spec in (("swin", swin_spec), ("pvt", pvt_spec)):
        files[arch] = root / f"mae_{arch}.pth"
        # As MAE-style `save_model` writes them: the training arguments ride along as a Namespace.
        torch.save({"model": fill(spec()), "epoch": 199, "args": argparse.Namespace(lr=1.5e-4)}, files[arch])
    return files


@pytest.fixture(scope="module")
def converted(official_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for arch, preset, sets in (("swin", "ummae_swin_demo", SWIN_SETS), ("pvt", "ummae_pvt_demo", PVT_SETS)):
        paths[arch] = out / f"{arch}.pt"
        res = run_cli_captured(["convert", str(official_files[arch]), "--preset", preset, "--out", str(paths[arch]),
                                *_sets(sets)], out)
        assert res.code == 0, res.err
        assert f"wrote {paths[arch]}" in res.out and "dropped: " in res.out and "--init-weights" in res.out
    return paths


def test_the_converted_file_is_an_ordinary_pretrain_checkpoint(converted, official_files):
    state = load_checkpoint(converted["swin"])
    assert state["config"]["model"]["merge"] == "conv" and state["config"]["model"]["norm_eps"] == 1e-6
    assert state["converted_from"]["dropped"] == ["decoder_pos_embed"]
    backbone, cfg = load_backbone(converted["pvt"])
    assert cfg.model.embed_norm is False and cfg.model.sr_every_stage is True
    assert isinstance(backbone.patch_norm, torch.nn.Identity)


@pytest.mark.parametrize("arch", ["swin", "pvt"])
def test_export_takes_a_converted_checkpoint(converted, arch, tmp_path):
    """`ummae export` checks that timm rebuilds the backbone from the card (with the official
    options in its model_args) and reproduces its features exactly."""
    out = tmp_path / f"{arch}.safetensors"
    res = run_cli_captured(["export", "--checkpoint", str(converted[arch]), "--out", str(out)], tmp_path)
    assert res.code == 0, res.err
    args = json.loads(out.with_suffix(".json").read_text())["model_args"]
    expected = {"swin": {"merge": "conv", "norm_eps": 1e-6},
                "pvt": {"embed_norm": False, "sr_every_stage": True, "norm_eps": 1e-6}}[arch]
    assert {k: args[k] for k in expected} == expected
    # timm's own Swin cannot hold the official conv merging (nor timm PVT v2 the official PVT):
    # the export falls back to ummae's registered model and says why, in one line.
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["model"] == f"ummae_{arch}" and card["needs_ummae"] is True
    notes = [line for line in res.out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0] == f"note: {card['note']}"
    assert {"swin": "model.merge=conv", "pvt": "PVT v2"}[arch] in notes[0]


def test_finetune_takes_a_converted_checkpoint(converted, tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (data / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (40, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(data / name / f"{i}.png")
    out = tmp_path / "ft"
    res = run_cli_captured(["finetune", "--no-progress", "--num-workers", "0", "--out", str(out), "--batch-size", "4",
                            "--checkpoint", str(converted["swin"]), "--data", str(data), "--val-fraction", "0.25",
                            "--max-steps", "1", "--no-augment"], out)
    assert res.code == 0, res.err


def test_pretraining_continues_from_a_converted_checkpoint(converted, tmp_path):
    def pretrain(out, options):
        return run_cli_captured(
            ["pretrain", "--no-progress", "--out", str(out), "--preset", "ummae_swin_demo", "--batch-size", "2",
             "--max-steps", "1", *_sets(SWIN_SETS + options + ["data.num_workers=0", "data.demo_length=4"]),
             "--init-weights", str(converted["swin"])], out)

    res = pretrain(tmp_path / "pt", ["model.merge=conv", "model.norm_eps=1e-6", "model.decoder_norm_eps=1e-6"])
    assert res.code == 0, res.err
    # Without the official options the same weights are another architecture: refused in one line.
    res = pretrain(tmp_path / "pt2", [])
    assert res.code == 2 and "another architecture" in res.err and len(res.err.strip().splitlines()) == 1


def test_pretrain_init_weights_takes_an_official_file_directly(official_files, tmp_path):
    def pretrain(out, options, preset="ummae_pvt_demo", sets=PVT_SETS):
        return run_cli_captured(
            ["pretrain", "--no-progress", "--out", str(out), "--preset", preset, "--batch-size", "2",
             "--max-steps", "1", *_sets(sets + options + ["data.num_workers=0", "data.demo_length=4"]),
             "--init-weights", str(official_files["pvt"])], out)

    options = ["model.embed_norm=false", "model.sr_every_stage=true", "model.norm_eps=1e-6",
               "model.decoder_norm_eps=1e-6"]
    res = pretrain(tmp_path / "pt", options)
    assert res.code == 0, res.err
    # Without the official options: one line naming what to add.
    res = pretrain(tmp_path / "pt2", [])
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
    assert "--set model.embed_norm=false" in res.err and "ummae convert" in res.err


def test_init_weights_conversion_is_the_same_as_ummae_convert(official_files, converted):
    from ummae.models.official import official_config, read_init_weights

    cfg = official_config("ummae_pvt_demo", PVT_SETS)
    direct = read_init_weights(official_files["pvt"], cfg)["model"]
    written = load_checkpoint(converted["pvt"])["model"]
    assert direct.keys() == written.keys()
    assert all(torch.equal(direct[k], written[k]) for k in direct)
    assert read_init_weights(converted["pvt"], cfg)["config"]  # an ummae checkpoint passes through


def _one_line_error(res) -> str:
    assert res.code == 2, (res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ummae convert: error: "), res.err
    return lines[0]


def test_bad_files_are_one_line_errors(official_files, tmp_path):
    def convert(path, preset="ummae_swin_demo", sets=SWIN_SETS):
        return run_cli_captured(["convert", str(path), "--preset", preset, "--out", str(tmp_path / "x.pt"),
                                 *_sets(sets)], tmp_path)

    assert "does not exist" in _one_line_error(convert(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02 definitely not a checkpoint")
    assert "not a readable checkpoint" in _one_line_error(convert(junk))

    class Payload:  # unpickling this would create a file
        def __reduce__(self):
            return (open, (str(tmp_path / "created-by-unpickling"), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"model": fill(swin_spec()), "hook": Payload()}, evil)
    assert "refusing to load" in _one_line_error(convert(evil))
    assert not (tmp_path / "created-by-unpickling").exists()
    # A PVT file given a Swin preset, and a Swin file given a wider Swin.
    line = _one_line_error(convert(official_files["pvt"]))  # the cause, not a missing key
    assert "looks like an official UM-MAE pvt checkpoint" in line and "ummae_pvt_small_256" in line, line
    # Undoing an official option: named, and no advice to run the command being run.
    line = _one_line_error(convert(official_files["swin"], sets=SWIN_SETS + ["model.merge=linear"]))
    assert "--set model.merge=linear" in line and "model.merge=conv" in line and "with `ummae convert`" not in line
    wide = [s.replace("embed_dim=8", "embed_dim=16") for s in SWIN_SETS]
    assert "wrong --preset" in _one_line_error(convert(official_files["swin"], sets=wide))
    assert "unknown preset" in _one_line_error(convert(official_files["swin"], preset="nope"))
    assert not (tmp_path / "x.pt").exists()
