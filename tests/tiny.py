"""The one tiny configuration every real pre-training run in the tests uses, and helpers to run it.

Imported by test modules as `from tiny import ...` (a unique module name: several folders have a
`conftest.py`, so `from conftest import` would be ambiguous).

The tiny model is a 2-stage Swin (stride 8) on 64 px images with 8 px mask units: the compact
image is 32 px, i.e. 4x4 final tokens, and each final token spans exactly one unit. With the
demo data cut to 8 crops and batch 4, an epoch is 2 optimizer steps; 3 steps take well under a
second on one CPU thread.
"""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


TINY_SETS: tuple[str, ...] = (
    "model.embed_dim=8",
    "model.depths=[1,1]",
    "model.num_heads=[1,1]",
    "model.window_size=4",
    "model.decoder_dim=16",
    "model.decoder_depth=1",
    "model.decoder_heads=2",
    "data.img_size=64",
    "masking.unit_size=8",  # stride 8 of a 2-stage Swin must be a multiple of the unit
    "data.num_workers=0",
    "data.demo_length=8",
    "train.log_every=1",
    "train.vis_images=2",
)
TINY_BATCH = 4
TINY_STEPS = 3


def tiny_pretrain_args(out: str | Path, *extra: str) -> list[str]:
    """`ummae pretrain` arguments of a tiny run into `out`; `extra` comes last, so it wins."""
    args = ["pretrain", "--no-progress", "--out", str(out)]
    for item in TINY_SETS:
        args += ["--set", item]
    args += ["--batch-size", str(TINY_BATCH), "--max-steps", str(TINY_STEPS)]
    return args + list(extra)


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    run_dir: Path


def run_cli_captured(args: list[str], run_dir: str | Path) -> CliResult:
    """`ummae.cli.main(args)` in-process with stdout/stderr captured (usable outside `capsys`)."""
    from ummae.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return CliResult(code, out.getvalue(), err.getvalue(), Path(run_dir))


# timm's Hiera, as small as it goes: 4 stages of one block at 64 px, i.e. a 2x2 grid of 32 px
# mask units (its stride), 2 of them visible at mask ratio 0.6.
TINY_HIERA_SETS: tuple[str, ...] = (
    "model.embed_dim=8", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,4,8]", "model.decoder_dim=16",
    "model.decoder_depth=1", "model.decoder_heads=2", "masking.unit_size=32",
)

# Data/training keys of the shared tiny runs; the model keys are per backbone.
_COMMON = [s for s in TINY_SETS if not s.startswith("model.")]
TINY_MODELS = {
    "swin": ("ummae_swin_demo", [s for s in TINY_SETS if s.startswith("model.")]),
    "pvt": ("ummae_pvt_demo", ["model.embed_dims=[8,16]", "model.depths=[1,1]", "model.num_heads=[1,2]",
                               "model.mlp_ratios=[2,2]", "model.sr_ratios=[2,1]", "model.decoder_dim=16",
                               "model.decoder_depth=1", "model.decoder_heads=2"]),
    "vit": ("mae_vit_demo", ["model.embed_dim=16", "model.depths=[2]", "model.num_heads=[2]",
                             "model.patch_size=8", "model.decoder_dim=16", "model.decoder_depth=1",
                             "model.decoder_heads=2"]),
    "hiera": ("mae_hiera_demo", list(TINY_HIERA_SETS)),
}


def tiny_checkpoint(root: Path, arch: str) -> Path:
    """A one-step `ummae pretrain` checkpoint of a tiny backbone (64 px, 8 px units), made once."""
    out = root / f"pretrain-{arch}"
    ckpt = out / "checkpoint.pt"
    if not ckpt.exists():
        preset, model_sets = TINY_MODELS[arch]
        args = ["pretrain", "--no-progress", "--out", str(out), "--preset", preset,
                "--batch-size", "4", "--max-steps", "1"]
        for item in [*_COMMON, *model_sets]:
            args += ["--set", item]
        result = run_cli_captured(args, out)
        assert result.code == 0, result.err
    return ckpt


# ---------------------------------------------------------------- the mixed folder of bad-data tests

GOOD = ("rgb.jpg", "gray.png", "cmyk.jpg", "palette_alpha.png", "rgba.png", "sixteen_bit.png", "large.jpg")
BAD = ("zero.jpg", "truncated.png", "text.jpg", "noise.webp")


def write_good_images(root: Path) -> None:
    """The readable images of the mixed folder (GOOD): every awkward mode and a 3000x2000 photo."""
    rng = np.random.default_rng(0)

    def noise(*shape: int) -> np.ndarray:
        return rng.integers(0, 256, shape, dtype=np.uint8)

    Image.fromarray(noise(80, 96, 3)).save(root / "rgb.jpg", quality=90)
    Image.fromarray(noise(80, 96)).save(root / "gray.png")  # mode L
    Image.fromarray(noise(80, 96, 4), "CMYK").save(root / "cmyk.jpg")
    Image.fromarray(noise(80, 96, 3)).quantize(16).save(root / "palette_alpha.png", transparency=0)
    Image.fromarray(noise(80, 96, 4), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (80, 96), dtype=np.uint16)).save(root / "sixteen_bit.png")
    # 3000 x 2000: a smooth gradient (noise would make a slow, multi-megabyte JPEG)
    Image.linear_gradient("L").resize((3000, 2000)).convert("RGB").save(root / "large.jpg", quality=85)


def write_bad_images(root: Path) -> None:
    """The unreadable files of the mixed folder (BAD): empty, truncated, text, random bytes."""
    rng = np.random.default_rng(1)
    (root / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    whole = buf.getvalue()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "noise.webp").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())


def sigkill_after_checkpoints(victim: subprocess.Popen, run_dir: Path, count: int = 2,
                              timeout: float = 120) -> None:
    """SIGKILL a running `ummae pretrain` once `run_dir` holds `count` periodic checkpoints
    (mid-run, between two later steps), or when it has ended; wait for it to die."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list((run_dir / "checkpoints").glob("step-*.pt"))) >= count or victim.poll() is not None:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
