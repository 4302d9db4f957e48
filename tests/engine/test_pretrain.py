"""The pre-training loop, end to end on tiny runs: run directory, metrics, checkpoint,
reproducibility, gradient accumulation and the NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from PIL import Image

import ummae.engine.pretrain as pretrain_module
from ummae.cli import main
from ummae.config import config_to_dict
from ummae.resolve import resolve_config
from ummae.engine.optim import build_scheduler
from ummae.models import build_pretrain_model

METRIC_KEYS = {"step", "epoch", "loss", "lr", "images_per_sec"}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def expected_lrs(peak: float, total: int, warmup: int, min_lr: float = 0.0) -> list[float]:
    """The lr after updates 1..total, straight from the scheduler."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, total, warmup, min_lr)
    out = []
    for u in range(1, total + 1):
        sched.step_update(u)
        out.append(opt.param_groups[0]["lr"])
    return out


# ---------------------------------------------------------------- the run directory


def test_run_directory_holds_every_artifact(tiny_run):
    d = tiny_run.run_dir
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "reconstructions.png", "loss.png"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    events = list((d / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_metrics_lines_are_json_with_consecutive_steps_and_finite_loss(tiny_run):
    records = read_metrics(tiny_run.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5]  # 8 demo crops / batch 4 = 2 steps/epoch
    for r in records:
        assert set(r) == METRIC_KEYS
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["images_per_sec"] > 0
    # demo preset: absolute lr 1e-3, 1 warm-up epoch = 2 updates, cosine over the last one
    assert [r["lr"] for r in records] == pytest.approx(expected_lrs(1e-3, 3, 2), abs=1e-12)
    assert records[1]["lr"] == 1e-3


def test_tensorboard_events_mirror_the_metrics(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run.run_dir / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/epoch", "train/images_per_sec"} <= set(acc.Tags()["scalars"])
    records = read_metrics(tiny_run.run_dir)
    points = acc.Scalars("train/loss")
    assert [p.step for p in points] == [r["step"] for r in records]
    assert [p.value for p in points] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_checkpoint_is_weights_only_and_holds_the_whole_state(tiny_run):
    state = torch.load(tiny_run.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model_state = state["model"]
    assert any(k.startswith("encoder.") for k in model_state)
    assert any(k.startswith("decoder.") for k in model_state)
    assert "encoder.mask_token" in model_state and "decoder.mask_token" in model_state
    assert state["step"] == 3
    optim_state = state["optimizer"]
    assert len(optim_state["state"]) > 0
    assert all("exp_avg" in s for s in optim_state["state"].values())
    assert "scheduler" in state

    # The stored config rebuilds the same model, and the weights load into it strictly.
    cfg = resolve_config(config_file=tiny_run.run_dir / "config.yaml")
    assert state["config"] == config_to_dict(cfg)
    model = build_pretrain_model(cfg)
    model.load_state_dict(model_state, strict=True)
    assert len(optim_state["state"]) == sum(1 for p in model.parameters() if p.requires_grad)


def test_trained_weights_differ_from_the_initialisation(tiny_run):
    state = torch.load(tiny_run.run_dir / "checkpoint.pt", weights_only=True)
    cfg = resolve_config(config_file=tiny_run.run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    fresh = build_pretrain_model(cfg).state_dict()
    changed = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert len(changed) > len(state["model"]) // 2


@pytest.mark.parametrize("name", ["reconstructions.png", "loss.png"])
def test_pictures_are_valid_pngs(tiny_run, name):
    with Image.open(tiny_run.run_dir / name) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(tiny_run.run_dir / name) as img:
        img.load()
        assert img.width > 64 and img.height > 32


def test_reconstruction_grid_has_one_row_per_vis_image(tiny_run, run_cli, tiny_args, tmp_path):
    """vis_images=2 in the tiny run; 4 gives a taller picture of the same width."""
    other = run_cli(tiny_args(tmp_path / "vis4", "--set", "train.vis_images=4", "--max-steps", "1"),
                    tmp_path / "vis4")
    assert other.code == 0, other.err
    with Image.open(tiny_run.run_dir / "reconstructions.png") as two, \
            Image.open(other.run_dir / "reconstructions.png") as four:
        assert two.width == four.width and four.height > two.height * 1.5


# ---------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_losses_and_other_seed_differs(tiny_run, run_cli, tiny_args, tmp_path):
    again = run_cli(tiny_args(tmp_path / "again", "--seed", "0"), tmp_path / "again")
    other = run_cli(tiny_args(tmp_path / "other", "--seed", "1"), tmp_path / "other")
    assert again.code == 0 and other.code == 0
    assert losses(again.run_dir) == losses(tiny_run.run_dir)
    a = torch.load(again.run_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tiny_run.run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(x != y for x, y in zip(losses(other.run_dir), losses(tiny_run.run_dir)))


def test_saved_config_fed_back_reproduces_configuration_and_run(tiny_run, run_cli, tmp_path):
    saved = tiny_run.run_dir / "config.yaml"
    original = yaml.safe_load(saved.read_text())
    assert original == config_to_dict(resolve_config(config_file=saved))

    out = tmp_path / "from_config"
    again = run_cli(["pretrain", "--no-progress", "--config", str(saved), "--out", str(out)], out)
    assert again.code == 0, again.err
    replayed = yaml.safe_load((out / "config.yaml").read_text())
    assert replayed["train"].pop("out") == str(out)
    original["train"].pop("out")
    assert replayed == original
    assert losses(out) == losses(tiny_run.run_dir)


# ---------------------------------------------------------------- gradient accumulation


def test_accumulation_keeps_the_step_count_and_scales_the_lr_by_the_effective_batch(run_cli, tiny_args, tmp_path):
    out = tmp_path / "accum"
    res = run_cli(tiny_args(out, "--batch-size", "2", "--accum-steps", "2", "--set", "optim.lr=none"), out)
    assert res.code == 0, res.err
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]  # optimizer steps, not micro-steps
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5]  # 8 crops / (2 x 2) = 2 steps/epoch
    blr = 1.5e-4  # demo preset
    peak = blr * 4 / 256
    assert records[1]["lr"] == pytest.approx(peak, rel=1e-12)  # end of the 2-update warm-up
    assert [r["lr"] for r in records] == pytest.approx(expected_lrs(peak, 3, 2), rel=1e-12, abs=1e-15)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert "effective batch 4" in res.out


def test_accumulation_counts_micro_batches_in_images_per_second(run_cli, tiny_args, tmp_path, monkeypatch):
    """With accumulation each optimizer step consumes accum_steps micro-batches of data."""
    seen = []
    real = pretrain_module.build_pretrain_model

    def counting_build(cfg):
        model = real(cfg)
        forward = model.forward

        def counted(imgs, *args, **kwargs):
            if model.training:
                seen.append(imgs.shape[0])
            return forward(imgs, *args, **kwargs)

        model.forward = counted
        return model

    monkeypatch.setattr(pretrain_module, "build_pretrain_model", counting_build)
    out = tmp_path / "accum3"
    res = run_cli(tiny_args(out, "--batch-size", "2", "--accum-steps", "2", "--max-steps", "2"), out)
    assert res.code == 0, res.err
    assert seen == [2, 2, 2, 2]


# ---------------------------------------------------------------- NaN stop


def test_nan_loss_stops_the_run_with_a_one_line_error(tiny_args, tmp_path, monkeypatch, capsys):
    real = pretrain_module.build_pretrain_model

    def nan_after_first_step(cfg):
        model = real(cfg)
        forward = model.forward
        calls = []

        def poisoned(imgs, *args, **kwargs):
            loss, pred, masks = forward(imgs, *args, **kwargs)
            calls.append(1)
            if len(calls) >= 2:
                loss = loss * float("nan")
            return loss, pred, masks

        model.forward = poisoned
        return model

    monkeypatch.setattr(pretrain_module, "build_pretrain_model", nan_after_first_step)
    out = tmp_path / "nan"
    out.mkdir()
    good = b"an earlier, good checkpoint"
    (out / "checkpoint.pt").write_bytes(good)

    code = main(tiny_args(out))
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "step 2" in lines[0] and "nan" in lines[0].lower()
    assert "Traceback" not in captured.err
    assert (out / "checkpoint.pt").read_bytes() == good  # not overwritten
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert not (out / "reconstructions.png").exists()


# ---------------------------------------------------------------- library entry point


def test_pretrain_returns_where_everything_was_written(tiny_config, tmp_path):
    tiny_config.train.out = str(tmp_path / "api")
    tiny_config.train.max_steps = 2
    result = pretrain_module.pretrain(tiny_config, progress=False)
    assert result.run_dir == tmp_path / "api"
    for path in (result.config, result.metrics, result.checkpoint, result.reconstructions, result.loss_curve):
        assert path is not None and path.is_file() and path.parent == result.run_dir
    assert result.tensorboard.is_dir()
    assert result.steps == 2 and result.epochs == 1.0
    assert result.final_loss == read_metrics(result.run_dir)[-1]["loss"]
    assert result.device == "cpu"
    assert result.num_params == sum(p.numel() for p in build_pretrain_model(tiny_config).parameters())


def test_too_little_data_for_one_step_is_a_config_error(tiny_config, tmp_path):
    from ummae.errors import ConfigError

    tiny_config.train.out = str(tmp_path / "small")
    tiny_config.data.demo_length = 3  # fewer crops than one batch of 4
    with pytest.raises(ConfigError, match="--batch-size"):
        pretrain_module.pretrain(tiny_config, progress=False)
