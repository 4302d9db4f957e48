"""`ummae visualize`: reconstructions of your own images by a pre-trained model.

The whole pre-training model (encoder *and* decoder) is rebuilt from the checkpoint's
configuration, each image is shown under several random masks, and the picture is the same grid
pre-training writes (`ummae.visualize.save_reconstruction_grid`): one row per (image, mask draw),
original | masked input | reconstruction | prediction.
"""

from __future__ import annotations

import argparse
from pathlib import Path


__all__ = ["add_parser", "run", "visualize_checkpoint"]

EPILOG = """\
Images are resized (shorter side) and centre-cropped to the pre-training size. Rows are ordered
image by image: image 1 with mask 1..M, then image 2, ... Masks are the checkpoint's own kind
(UM-MAE: uniform + secondary masking, shown tinted; MAE / SimMIM: random; EMAE: each draw is
K disjoint parts, one row per part) and are seeded by --seed, so the same command draws the
same picture.

examples:
  ummae visualize --checkpoint runs/demo/checkpoint.pt cat.jpg dog.png --out recon.png
  ummae visualize --checkpoint ckpt.pt photos/*.jpg --masks 1 --out recon.png --seed 3
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "visualize", help="reconstruct your own images with a pre-trained model",
        description="Draw what a pre-training checkpoint's encoder sees and what its decoder makes of it, "
                    "for your own images under several random masks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (jpg/png/webp/bmp/tif/gif)")
    p.add_argument("--checkpoint", metavar="CKPT", required=True,
                   help="an `ummae pretrain` checkpoint (it holds the decoder too)")
    p.add_argument("--out", metavar="FILE.png", required=True, help="where to write the picture (PNG)")
    p.add_argument("--masks", type=int, default=3, metavar="M", help="random masks per image (default 3)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the masks (default 0)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.set_defaults(run=run)


def load_pretrain_model(checkpoint: str | Path):
    """`(model, cfg)`: the pre-training model of a checkpoint with all its weights, in eval mode."""
    from ..errors import UmmaeError
    from ..models import build_pretrain_model
    from ..models.loading import load_pretrain_checkpoint

    cfg, state = load_pretrain_checkpoint(checkpoint)
    model = build_pretrain_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights
        lines = str(e).strip().splitlines()
        raise UmmaeError(f"'{checkpoint}': the weights do not fit the model its configuration describes "
                         f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from None
    return model.eval(), cfg


def visualize_checkpoint(checkpoint: str | Path, images: list[str | Path], out: str | Path,
                         masks: int = 3, seed: int = 0, device: str = "auto") -> tuple[Path, int]:
    """Write the reconstruction grid of `images` x `masks` random masks to `out`.

    Returns:
        `(out, rows)`, `rows = len(images) * masks` (x K parts for EMAE).
    """
    import torch  # here, not at the top: `ummae --help` must not pay torch's import

    with torch.no_grad():
        return _visualize(checkpoint, images, out, masks, seed, device)


def _visualize(checkpoint, images, out, masks: int, seed: int, device: str) -> tuple[Path, int]:
    import torch

    from ..data.folder import load_rgb
    from ..data.transforms import eval_transform
    from ..engine.pretrain import resolve_device, training_autocast
    from ..errors import ConfigError, UmmaeError
    from ..masking import MaskSample
    from ..visualize import picture_rows, save_reconstruction_grid

    if masks < 1:
        raise ConfigError(f"--masks must be >= 1, got {masks}")
    dev = resolve_device(device)
    model, cfg = load_pretrain_model(checkpoint)
    model.to(dev)
    transform = eval_transform(cfg.data.img_size)
    # Read every image before running anything: a bad file is reported at once, by name.
    pictures = [transform(load_rgb(path)) for path in images]  # each [3, H, W]

    generator = torch.Generator().manual_seed(seed)  # masks drawn on the CPU: the same on any device
    rows_img, rows_pred, rows_masks = [], [], []
    for picture in pictures:
        imgs = picture.unsqueeze(0).expand(masks, -1, -1, -1).to(dev)  # one row per mask draw
        drawn = model.sample_masks(masks, generator=generator).to(dev)
        with training_autocast(dev, "auto"):
            _, pred, _ = model(imgs, drawn)
        imgs, drawn = picture_rows(imgs, drawn)  # EMAE: K rows (parts) per mask draw
        rows_img.append(imgs.cpu())
        rows_pred.append(pred.float().cpu())
        rows_masks.append(drawn.to("cpu"))
    all_masks = MaskSample.cat(rows_masks)
    rows = sum(r.shape[0] for r in rows_img)
    try:
        path = save_reconstruction_grid(out, torch.cat(rows_img), torch.cat(rows_pred), all_masks.mask,
                                        model.unit, secondary=all_masks.secondary,
                                        norm_pix_loss=model.norm_pix_loss, max_rows=rows)
    except OSError as e:
        raise UmmaeError(f"cannot write '{out}': {e.strerror or e}") from None
    return path, rows


def run(args: argparse.Namespace) -> int:
    path, rows = visualize_checkpoint(args.checkpoint, args.images, args.out, args.masks, args.seed, args.device)
    print(f"ummae visualize: {path}  ({len(args.images)} image(s) x {args.masks} mask(s) -> {rows} rows: "
          f"original | masked input | reconstruction | prediction)")
    return 0
