"""`ummae bench`: the report of real tiny models, FLOPs checked by hand, interleaving, JSON, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import ummae.perf.bench as bench
from ummae.perf import count_flops, format_table, run_benchmark
from ummae.cli import main
from ummae.config import PretrainConfig
from ummae.resolve import resolve_config

RESULT_KEYS = ("preset", "batch_size", "img_size", "params", "step_time_s", "step_time_min_s",
               "step_time_max_s", "step_time_iqr_s", "images_per_s", "peak_memory_bytes",
               "peak_memory_method", "flops_per_image", "flops_per_image_scope",
               "model_forward_flops_per_image", "train_flops_per_step", "achieved_flops_per_s",
               "fraction_of_matmul")
REPORT_KEYS = ("matmul_flops_per_s", "device", "torch", "threads", "results")


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- a model whose FLOPs are known

IN, HIDDEN, OUT = 3 * 8 * 8, 10, 5  # 8 px images, flattened


class LinearMIM(nn.Module):
    """Linear "encoder" and linear "decoder" with the pre-training models' interface."""

    def __init__(self, calls: list | None = None, name: str = ""):
        super().__init__()
        self.enc = nn.Linear(IN, HIDDEN)
        self.dec = nn.Linear(HIDDEN, OUT)
        self.calls, self.name = calls, name

    def _encode(self, imgs):
        return self.enc(imgs.flatten(1))

    def forward(self, imgs, masks=None, generator=None):
        if self.calls is not None:
            self.calls.append(self.name)
        masks = torch.rand(imgs.shape[0], generator=generator) if masks is None else masks
        pred = self.dec(self._encode(imgs))
        return pred.pow(2).mean(), pred, masks


class LinearMIMWithEncoder(LinearMIM):
    def forward_encoder(self, imgs, masks):
        return self._encode(imgs)


def fake_config(name: str) -> PretrainConfig:
    cfg = PretrainConfig(preset=name)
    cfg.data.img_size = 8
    return cfg


def test_flops_of_linear_layers_match_the_hand_count():
    B = 4
    flops = count_flops(LinearMIMWithEncoder(), torch.randn(B, 3, 8, 8))
    enc, dec = 2 * B * IN * HIDDEN, 2 * B * HIDDEN * OUT
    assert flops["encoder_forward"] == enc
    assert flops["encoder_scope"] == "encoder_forward"
    assert flops["model_forward"] == enc + dec
    # backward: decoder weight + decoder input gradients, encoder weight gradient only (the
    # images need no gradient)
    assert flops["train_step"] == enc + dec + 2 * dec + enc


def test_cpu_attention_is_counted_like_the_same_attention_written_as_matmuls():
    """`F.scaled_dot_product_attention` on the CPU (timm's fused path) must count the FLOPs of
    its two matmuls, as the unfused path (q @ k^T, attn @ v) does (torch 2.14 alone counts 0 there)."""
    from timm.layers import Attention

    attn = Attention(dim=16, num_heads=2).eval()
    x = torch.randn(3, 10, 16)
    counts = {}
    for fused in (True, False):
        attn.fused_attn = fused
        with torch.no_grad(), bench.flop_counter() as counter:
            attn(x)
        counts[fused] = counter.get_total_flops()
    qkv_and_proj = 2 * 3 * 10 * 16 * (3 * 16 + 16)
    attention_matmuls = 2 * 2 * 3 * 2 * 10 * 10 * 8  # 2 matmuls, B 3, 2 heads, 10x10 pairs, head dim 8
    assert counts[False] == qkv_and_proj + attention_matmuls
    assert counts[True] == counts[False]


def test_report_of_known_flops_and_fallback_without_forward_encoder():
    B = 2
    report = run_benchmark([fake_config("enc"), fake_config("noenc")], batch_size=B, steps=3,
                           warmup=1, device="cpu", measure_memory=False, matmul_n=64,
                           build_model=lambda cfg: (LinearMIMWithEncoder() if cfg.preset == "enc"
                                                    else LinearMIM()))
    with_enc, without = report["results"]
    assert with_enc["flops_per_image"] == 2 * IN * HIDDEN
    assert with_enc["flops_per_image_scope"] == "encoder_forward"
    assert without["flops_per_image"] == 2 * IN * HIDDEN + 2 * HIDDEN * OUT  # whole forward
    assert without["flops_per_image_scope"] == "model_forward"
    for r in (with_enc, without):
        assert r["train_flops_per_step"] == B * (4 * IN * HIDDEN + 6 * HIDDEN * OUT)
        assert r["achieved_flops_per_s"] == pytest.approx(r["train_flops_per_step"] / r["step_time_s"])
        assert r["peak_memory_bytes"] is None and r["peak_memory_method"] == "not_measured"
    assert "no forward_encoder" in format_table(report)
    with pytest.raises(ValueError, match="measure_memory=False"):  # the CPU probe can't build these
        run_benchmark([fake_config("enc")], device="cpu", build_model=lambda cfg: LinearMIM())


def test_steps_are_interleaved_between_configurations():
    calls: list[str] = []
    run_benchmark([fake_config("a"), fake_config("b"), fake_config("c")], batch_size=2, steps=4,
                  warmup=2, device="cpu", measure_memory=False, matmul_n=64,
                  build_model=lambda cfg: LinearMIMWithEncoder(calls, cfg.preset))
    # one FLOP-counting forward, then 2 warm-up and 4 timed rounds: a, b, c, a, b, c, ...
    assert calls == ["a", "b", "c"] * (1 + 2 + 4)


# ---------------------------------------------------------------- real tiny models


def test_two_real_configurations(tiny_sets):
    small = resolve_config("demo", sets=tiny_sets)
    wide = resolve_config("demo", sets=tiny_sets + ["model.embed_dim=16", "model.decoder_dim=32"])
    small.preset, wide.preset = "tiny", "tiny-wide"
    report = run_benchmark([small, wide], batch_size=2, steps=2, warmup=1, device="cpu", matmul_n=128)

    assert all(k in report for k in REPORT_KEYS)
    assert report["device"] == "cpu" and report["threads"] == torch.get_num_threads()
    assert report["matmul_flops_per_s"] > 0 and math.isfinite(report["matmul_flops_per_s"])
    assert [r["preset"] for r in report["results"]] == ["tiny", "tiny-wide"]
    for r in report["results"]:
        assert all(k in r for k in RESULT_KEYS)
        for k in ("step_time_s", "images_per_s", "peak_memory_bytes", "flops_per_image",
                  "train_flops_per_step", "achieved_flops_per_s", "fraction_of_matmul", "params"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
        assert r["batch_size"] == 2 and len(r["step_times_s"]) == 2
        assert r["peak_memory_method"] == "cpu_child_rss_delta"
        assert r["flops_per_image_scope"] == "encoder_forward"
        assert r["flops_per_image"] < r["model_forward_flops_per_image"]  # the decoder is extra
        assert r["model_forward_flops_per_image"] * 2 < r["train_flops_per_step"]  # + backward
        assert r["images_per_s"] == pytest.approx(2 / r["step_time_s"])
        assert r["achieved_flops_per_s"] == pytest.approx(r["train_flops_per_step"] / r["step_time_s"])
        assert r["fraction_of_matmul"] == pytest.approx(r["achieved_flops_per_s"] / report["matmul_flops_per_s"])
    small_r, wide_r = report["results"]
    assert wide_r["flops_per_image"] > small_r["flops_per_image"]
    assert wide_r["params"] > small_r["params"]

    table = format_table(report)
    assert "tiny-wide / tiny: step time " in table and "peak memory " in table
    assert "peak memory n/a" not in table
    json.dumps(report, allow_nan=False)  # plain, finite JSON


# ---------------------------------------------------------------- command line


@pytest.fixture
def fast_bench(monkeypatch):
    """A small reference matmul, and no child processes (the real probe is tested above)."""
    monkeypatch.setattr(bench, "MATMUL_N", {"cpu": 128, "cuda": 128})
    monkeypatch.setattr(bench, "_cpu_memory_probe", lambda configs, threads: [123 * 2**20] * len(configs))


def test_cli_prints_the_table_and_writes_json(tmp_path, tiny_sets, fast_bench, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "demo", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
            "--json", str(out)]
    for item in tiny_sets:
        args += ["--set", item]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "step time (s, median)" in captured.out and "% of matmul" in captured.out
    row = [line for line in captured.out.splitlines() if line.startswith("demo ")]
    assert len(row) == 1 and "123.0" in row[0]
    assert str(out) in captured.out

    report = json.loads(out.read_text())
    assert all(k in report for k in REPORT_KEYS)
    (r,) = report["results"]
    assert all(k in r for k in RESULT_KEYS)
    assert r["preset"] == "demo" and r["batch_size"] == 2 and r["img_size"] == 64
    assert r["peak_memory_bytes"] == 123 * 2**20
    assert report["matmul_n"] == 128


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "--device"),
    (["--json", "/no/such/dir/b.json"], "--json: directory"),
])
def test_bad_values_are_one_line_errors(extra, message, capsys):
    code = main(["bench", "demo", *extra])
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("ummae bench: error:") and message in line


def test_unknown_preset_is_a_one_line_error(capsys):
    assert main(["bench", "demo", "no_such_preset"]) == 2
    assert "unknown preset 'no_such_preset'" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- --profile


def _tiny_swin_step_cli(mode: str, out, tiny_sets, capsys):
    """`ummae bench demo MODE` on the tiny Swin, batch 2, one step after one warm-up; its output."""
    args = ["bench", "demo", mode, "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
            "--json", str(out)]
    for item in tiny_sets:
        args += ["--set", item]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def test_cli_profile_reports_every_component_of_a_swin_step(tmp_path, tiny_sets, capsys):
    out = tmp_path / "p.json"
    captured = _tiny_swin_step_cli("--profile", out, tiny_sets, capsys)
    assert "component" in captured.out and "swin.position_bias" in captured.out
    (prof,) = json.loads(out.read_text())["profiles"]
    comps = prof["components"]
    for name in ("patch_embed", "compaction", "swin.position_bias", "swin.attention", "swin.mlp",
                 "swin.merging", "decoder", "loss", "optimizer", "masks"):
        assert name in comps, name
    # Backward time is attributed to the component whose forward made it.
    for name in ("swin.attention", "swin.mlp", "decoder", "swin.qkv"):
        assert comps[name]["forward_ms"] > 0 and comps[name]["backward_ms"] > 0, name
    assert comps["optimizer"]["backward_ms"] == 0
    assert sum(c["share"] for c in comps.values()) == pytest.approx(1.0)
    assert comps["swin.mlp"]["allocated_bytes"] > 0


def test_profile_labels_vit_blocks_and_pvt_stages():
    from ummae.perf import profile_step

    for name, expected in (("ummae_vit_demo", ("vit.attention", "vit.mlp", "patch_embed")),
                           ("ummae_pvt_demo", ("pvt.attention", "pvt.spatial_reduction", "compaction"))):
        cfg = resolve_config(name, None, ["data.img_size=64"], {})
        comps = profile_step(cfg, torch.device("cpu"), 2, steps=1, warmup=0)["components"]
        for label in expected:
            assert comps[label]["total_ms"] > 0, (name, label)


def test_hiera_is_benchmarked_and_its_encoder_flops_shrink_with_the_mask_ratio():
    """`ummae bench` on MAE-Hiera: FLOPs of the masked encoder counted (Hiera drops the units)."""
    from tiny import TINY_HIERA_SETS

    from ummae.models import build_pretrain_model

    sets = [*TINY_HIERA_SETS, "data.img_size=128"]
    cfgs = [resolve_config("mae_hiera_demo", sets=[*sets, f"masking.mask_ratio={r}"]) for r in (0.0, 0.75)]
    report = run_benchmark(cfgs, batch_size=2, steps=1, warmup=0, device="cpu", matmul_n=64,
                           measure_memory=False)
    full, masked = report["results"]
    assert full["flops_per_image_scope"] == masked["flops_per_image_scope"] == "encoder_forward"
    # 16 units of 32 px: 16 visible vs 4. timm's Hiera runs its 7x7 patch convolution over the
    # whole (zeroed) image; every op after it is per visible token or worse, so falls >= 4x.
    patch_conv = 2 * (128 // 4) ** 2 * 8 * 7 * 7 * 3  # 2 FLOPs per MAC, 32x32 tokens of width 8
    assert full["flops_per_image"] - patch_conv >= 4 * (masked["flops_per_image"] - patch_conv) > 0
    assert masked["train_flops_per_step"] > 0 and masked["step_time_s"] > 0
    # Negative control: the encoder FLOPs counted are those of the encoder alone (less than the model's).
    model = build_pretrain_model(cfgs[1])
    flops = count_flops(model, torch.randn(2, 3, 128, 128))
    assert 0 < flops["encoder_forward"] < flops["model_forward"]


# ---------------------------------------------------------------- --matmul-ceiling


def test_recorded_calls_are_grouped_by_shape_and_counted_like_flop_counter():
    from ummae.perf import record_flop_calls

    a, b, c = torch.randn(6, 4), torch.randn(4, 5), torch.randn(5, 3)
    calls = record_flop_calls(lambda: (a @ b, a @ b, (a @ b) @ c, torch.relu(a)))
    by_count = sorted((call["count"], call["flops"]) for call in calls)
    assert by_count == [(1, 2 * 6 * 5 * 3), (3, 2 * 6 * 4 * 5)]  # relu has no FLOP formula: not recorded


def test_cli_matmul_ceiling_replays_every_counted_call_of_a_swin_step(tmp_path, tiny_sets, fast_bench, capsys):
    out = tmp_path / "c.json"
    captured = _tiny_swin_step_cli("--matmul-ceiling", out, tiny_sets, capsys)
    assert "ceiling, % of matmul" in captured.out
    (report,) = json.loads(out.read_text())["ceilings"]
    # every FLOP the step's counter sees is in a replayed call (matmuls, attention, convolution)
    assert report["counted_flops"] == report["train_flops_per_step"] > 0
    ops = {c["op"] for c in report["calls"]}
    assert any("convolution" in op for op in ops)  # the patch embedding, forward and backward
    assert any("scaled_dot_product" in op for op in ops) and any("mm" in op for op in ops)
    for c in report["calls"]:
        assert c["count"] >= 1 and c["seconds"] > 0 and math.isfinite(c["flops_per_s"])
    assert report["ceiling_flops_per_s"] == pytest.approx(report["counted_flops"] / report["matmul_only_s"])


def test_matmul_ceiling_is_cpu_only(capsys):
    # without a GPU: "CUDA is not available"; with one: "--matmul-ceiling runs on the CPU only"
    code = main(["bench", "demo", "--matmul-ceiling", "--device", "cuda"])
    assert code == 2
    assert "cuda" in one_line_error(capsys.readouterr().err).lower()
