"""Pictures for checking a pre-training run by eye.

Two things are drawn here:

* a *reconstruction grid*: for a few images, what the encoder saw and what the decoder
  made of it (`reconstruction_grid`, `save_reconstruction_grid`);
* a *loss curve* from the JSON-lines metrics file a training run writes (`save_loss_curve`).

Images arrive as the training pipeline feeds them, i.e. `[B, 3, H, W]` floats normalised
with the ImageNet mean/std, and predictions as `[B, L, unit*unit*3]` unit pixels (see
`ummae.objectives.patchify` for the unit layout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ummae.objectives import patchify, unpatchify

__all__ = [
    "denormalize_prediction",
    "picture_rows",
    "reconstruction_grid",
    "save_reconstruction_grid",
    "save_loss_curve",
    "spread_indices",
]

PANEL_TITLES = ("original", "masked input", "reconstruction", "prediction")
PANEL_GAP = 2  # white pixels around and between panels and rows
HEADER_HEIGHT = 16  # room for one line of PIL's default font
# Panels are upscaled (nearest neighbour, integer factor) to at least this width so the
# titles fit above them even for tiny images such as 32x32 CIFAR crops.
MIN_PANEL_WIDTH = 96
MASK_GREY = 0.5  # fill of masked units, in [0, 1] display space
# Secondary-masked units keep 40% of their content and are pulled 60% towards a dark blue,
# so they read as "visible position, content hidden" and never look like the grey of masked ones.
SECONDARY_KEEP = 0.4
SECONDARY_TINT = (0.05, 0.15, 0.55)


def denormalize_prediction(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    unit: int,
    norm_pix_loss: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Bring a prediction back into the space of `patchify(imgs, unit)`.

    With `norm_pix_loss` the model learned per-unit normalised targets, so each predicted
    unit is rescaled with the mean and std of the matching unit of the *input* image (the
    inverse of `objectives.normalize_targets`). Without it the prediction already is in
    that space and is returned unchanged.

    Args:
        pred: `[B, L, unit*unit*3]` model output.
        imgs: `[B, 3, H, W]` the ImageNet-normalised images the model was given.
        unit: unit side in pixels.
        norm_pix_loss: whether the model was trained on normalised targets.
        eps: the variance epsilon used when the targets were normalised.

    Returns:
        `[B, L, unit*unit*3]`; float32 when rescaled.
    """
    if not norm_pix_loss:
        return pred
    target = patchify(imgs.float(), unit)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=False)
    return pred.float() * (var + eps) ** 0.5 + mean


def spread_indices(total: int, n: int) -> list[int]:
    """`min(n, total)` indices spread evenly over `range(total)`: the middle of each of n equal parts.

    Which images a picture shows: data sets are listed in sorted order, which for a class-sorted
    folder (`train/<class>/...`) means the first few files are all of one class; the middles of
    n equal slices reach across the whole list. Deterministic, distinct, increasing.
    """
    n = min(n, total)
    return [((2 * i + 1) * total) // (2 * n) for i in range(n)]


def picture_rows(imgs: torch.Tensor, masks):
    """`(imgs, MaskSample)` with one picture row per prediction.

    A `MaskSample` is returned as is. EMAE's `PartsSample` (K parts per image, predictions
    `[B*K, L, D]` image-major) becomes K rows per image: each image repeated K times beside its
    flattened parts, so the picture shows the K parts of one image and their predictions in turn.
    """
    return masks.picture_rows(imgs)


def _unit_to_pixel_mask(unit_mask: torch.Tensor, unit: int, grid: tuple[int, int]) -> torch.Tensor:
    """`[B, L]` bool per unit -> `[B, 1, H, W]` bool per pixel."""
    h, w = grid
    m = unit_mask.reshape(-1, 1, h, w)
    return m.repeat_interleave(unit, dim=2).repeat_interleave(unit, dim=3)


def reconstruction_grid(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    unit: int,
    *,
    secondary: torch.Tensor | None = None,
    norm_pix_loss: bool = True,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    max_rows: int = 8,
) -> Image.Image:
    """Draw original / masked input / reconstruction / prediction, one row per sample.

    Args:
        imgs: `[B, 3, H, W]` normalised images (any device, float32 or bf16).
        pred: `[B, L, unit*unit*3]` prediction for every unit, `L = (H/unit) * (W/unit)`.
        mask: `[B, L]` bool, True = masked (hidden from the encoder, reconstructed).
        unit: unit side in pixels.
        secondary: optional `[B, L]` bool, True = visible unit whose content was replaced
            by a learnable token (UM-MAE secondary masking); shown tinted in "masked input".
        norm_pix_loss: whether `pred` is in per-unit normalised space.
        mean, std: the per-channel normalisation to undo for display.
        max_rows: draw at most this many samples.

    Returns:
        RGB image of `min(B, max_rows)` rows, each of four panels, under a title header.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    # Everything below is plain float32 CPU arithmetic; the model may hand us bf16 on a GPU.
    n = min(imgs.shape[0], max_rows)
    imgs = imgs[:n].detach().to("cpu", torch.float32)
    pred = pred[:n].detach().to("cpu", torch.float32)
    mask = mask[:n].detach().to("cpu").bool()
    _, _, H, W = imgs.shape
    grid = (H // unit, W // unit)
    L = grid[0] * grid[1]
    if pred.shape[1] != L or mask.shape[1] != L:
        raise ValueError(
            f"expected {L} units for {H}x{W} images with unit {unit}, "
            f"got pred {tuple(pred.shape)} and mask {tuple(mask.shape)}"
        )

    # Undo the normalisations, then clamp: a prediction may overshoot the displayable range.
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to_display(x: torch.Tensor) -> torch.Tensor:
        return (x * std_t + mean_t).clamp(0.0, 1.0)

    original = to_display(imgs)
    pred_units = denormalize_prediction(pred, imgs, unit, norm_pix_loss)
    prediction = to_display(unpatchify(pred_units, unit, grid))

    masked_px = _unit_to_pixel_mask(mask, unit, grid)
    masked_input = original.clone()
    if secondary is not None:
        secondary_px = _unit_to_pixel_mask(secondary[:n].detach().to("cpu").bool(), unit, grid)
        tint = torch.tensor(SECONDARY_TINT, dtype=torch.float32).view(1, 3, 1, 1)
        dimmed = SECONDARY_KEEP * original + (1.0 - SECONDARY_KEEP) * tint
        masked_input = torch.where(secondary_px, dimmed, masked_input)
    # Grey goes last so that a unit flagged both ways shows as masked (what gets scored).
    masked_input = masked_input.masked_fill(masked_px, MASK_GREY)
    # Only masked units are reconstructed; the rest is the input the encoder had.
    reconstruction = torch.where(masked_px, prediction, original)

    panels = torch.stack([original, masked_input, reconstruction, prediction], dim=1)  # [n, 4, 3, H, W]
    scale = max(1, math.ceil(MIN_PANEL_WIDTH / W))
    panels = panels.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    pixels = (panels * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # [n, 4, h, w, 3]
    ph, pw = H * scale, W * scale

    # White canvas; panel (row r, column c) starts at gap + c*(pw+gap), header + gap + r*(ph+gap).
    width = len(PANEL_TITLES) * (pw + PANEL_GAP) + PANEL_GAP
    height = HEADER_HEIGHT + n * (ph + PANEL_GAP) + PANEL_GAP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r in range(n):
        y = HEADER_HEIGHT + PANEL_GAP + r * (ph + PANEL_GAP)
        for c in range(len(PANEL_TITLES)):
            x = PANEL_GAP + c * (pw + PANEL_GAP)
            canvas[y : y + ph, x : x + pw] = pixels[r, c]

    image = Image.fromarray(canvas)  # uint8 [H, W, 3] -> RGB
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()  # built into Pillow: needs no font file on disk
    for c, title in enumerate(PANEL_TITLES):
        text_w = draw.textlength(title, font=font)
        x = PANEL_GAP + c * (pw + PANEL_GAP) + max(0.0, (pw - text_w) / 2)
        draw.text((x, 2), title, fill=(0, 0, 0), font=font)
    return image


# File formats a picture may be written in, by extension (lower case).
PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                   ".tif": "TIFF", ".tiff": "TIFF"}


def picture_format(path: str | Path) -> str:
    """PIL's format name for `path`'s extension; an unsupported one is a UmmaeError."""
    from .errors import UmmaeError

    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_FORMATS:
        raise UmmaeError(f"cannot write a picture as '{Path(path).name}': the extension must be one of "
                         f"{', '.join(PICTURE_FORMATS)}")
    return PICTURE_FORMATS[suffix]


def save_reconstruction_grid(path: str | Path, *args, image_format: str = "PNG", **kwargs) -> Path:
    """Render `reconstruction_grid(*args, **kwargs)` to `path` (parents created) as `image_format`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}
    reconstruction_grid(*args, **kwargs).save(path, format=image_format, **extra)
    return path


def _read_series(metrics_path: Path, key: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Read `(step, key)` and `(step, lr)` points from a JSON-lines metrics file."""
    values, lrs = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a truncated last line; a resumed run then
            # appends after it, so such a line can also sit in the middle. Skip it either way.
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            continue
        step = record["step"]
        if isinstance(record.get(key), (int, float)) and math.isfinite(record[key]):
            values.append((step, record[key]))
        if isinstance(record.get("lr"), (int, float)):
            lrs.append((step, record["lr"]))
    return values, lrs


def save_loss_curve(metrics_path: str | Path, out_png: str | Path, key: str = "loss") -> Path | None:
    """Plot `key` (and the learning rate, if logged) against `step`.

    Args:
        metrics_path: JSON-lines file, one object per line with at least `"step"` and `key`.
        out_png: where to write the PNG (parents created).
        key: which metric to plot.

    Returns:
        `out_png` as a Path, or None (nothing written) when the file holds no points.
    """
    values, lrs = _read_series(Path(metrics_path), key)
    if not values:
        return None

    # A bare Figure with an Agg canvas renders off-screen without touching pyplot's
    # global state (current figure, selected backend) that the caller may rely on.
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, ys = zip(*values)
    ax.plot(steps, ys, color="tab:blue", linewidth=1.2, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{key} vs step")
    ax.grid(True, alpha=0.3)
    # Losses fall fast early on; a log axis keeps the late part readable.
    if min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
    handles, legend_ax = ax.get_lines(), ax
    if lrs:
        ax_lr = ax.twinx()
        lr_steps, lr_ys = zip(*lrs)
        ax_lr.plot(lr_steps, lr_ys, color="tab:orange", linewidth=1.0, alpha=0.8, label="lr")
        ax_lr.set_ylabel("learning rate")
        # One legend for both axes, on the twin so that the lr curve is not drawn over it.
        handles, legend_ax = handles + ax_lr.get_lines(), ax_lr
    legend_ax.legend(handles=handles, loc="best")

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
