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
same picture. The picture's format follows the extension of --out (.png, .jpg/.jpeg, .webp,
.bmp, .tif/.tiff). Unreadable images are left out and named in the summary line, as pretraining
skips them; if none can be read, the command fails.

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
    p.add_argument("--out", metavar="FILE", required=True,
                   help="where to write the picture; its extension chooses the format (.png, .jpg, .webp, .bmp, .tif)")
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
                         masks: int = 3, seed: int = 0, device: str = "auto") -> tuple[Path, int, list[str]]:
    """Write the reconstruction grid of `images` x `masks` random masks to `out`.

    Unreadable images are left out (warned about once each); none readable is a UmmaeError.

    Returns:
        `(out, rows, skipped)`: `rows = readable images * masks` (x K parts for EMAE), `skipped`
        the unreadable files in the order given.
    """
    import torch  # here, not at the top: `ummae --help` must not pay torch's import

    with torch.no_grad():
        return _visualize(checkpoint, images, out, masks, seed, device)


def _visualize(checkpoint, images, out, masks: int, seed: int, device: str) -> tuple[Path, int, list[str]]:
    import warnings

    import torch

    from ..data.folder import load_rgb
    from ..data.transforms import eval_transform
    from ..engine.distributed import resolve_device
    from ..engine.loop import training_autocast
    from ..errors import ConfigError, UmmaeError
    from ..masking import MaskSample
    from ..visualize import picture_format, picture_rows, save_reconstruction_grid

    if masks < 1:
        raise ConfigError(f"--masks must be >= 1, got {masks}")
    image_format = picture_format(out)  # before any work
    dev = resolve_device(device)
    model, cfg = load_pretrain_model(checkpoint)
    model.to(dev)
    transform = eval_transform(cfg.data.img_size)
    # Read every image before running anything; an unreadable one is left out and named.
    pictures, skipped = [], []
    for path in images:
        try:
            pictures.append(transform(load_rgb(path)))  # [3, H, W]
        except UmmaeError as err:
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            skipped.append(str(path))
    if not pictures:
        raise UmmaeError(f"none of the {len(images)} image(s) could be read (e.g. '{skipped[0]}')")

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
                                        norm_pix_loss=model.norm_pix_loss, max_rows=rows,
                                        image_format=image_format)
    except OSError as e:
        raise UmmaeError(f"cannot write '{out}': {e.strerror or e}") from None
    return path, rows, skipped


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .checks import check_input, check_output

    # Before importing torch (`cli.checks`): a typo costs no import.
    if args.masks < 1:
        raise ConfigError(f"--masks must be >= 1, got {args.masks}")
    check_input("--checkpoint", args.checkpoint)
    check_output("--out", args.out, "file")
    path, rows, skipped = visualize_checkpoint(args.checkpoint, args.images, args.out, args.masks, args.seed,
                                               args.device)
    print(f"ummae visualize: {path}  ({len(args.images) - len(skipped)} image(s) x {args.masks} mask(s) -> "
          f"{rows} rows: original | masked input | reconstruction | prediction)")
    if skipped:
        print(f"  skipped          {len(skipped)} unreadable image(s): {', '.join(skipped)}")
    return 0
