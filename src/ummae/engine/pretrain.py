"""The pre-training loop: data -> masks -> UM-MAE loss -> AdamW, with a readable run directory.

A run directory holds:
    config.yaml          the resolved configuration (`--config` it to reproduce the run)
    metrics.jsonl        one JSON object per logged step: step, epoch, loss, lr, images_per_sec
    tb/                  TensorBoard events of the same scalars
    checkpoint.pt        encoder + decoder + optimizer + scheduler + step (weights_only-safe)
    reconstructions.png  original | masked input | reconstruction | prediction, at the end
    loss.png             the loss curve, at the end
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import PretrainConfig, config_to_dict
from ..data import build_pretrain_dataset
from ..errors import ConfigError, UmmaeError
from ..models import build_pretrain_model
from ..visualize import save_loss_curve, save_reconstruction_grid
from .checkpoint import save_checkpoint
from .metrics import MetricsWriter
from .optim import build_optimizer, build_scheduler, schedule_lengths

__all__ = ["pretrain", "RunResult", "resolve_device", "training_autocast"]


class NonFiniteLossError(UmmaeError):
    """The loss became NaN or infinite; training stopped without overwriting good checkpoints."""


@dataclass
class RunResult:
    run_dir: Path
    config: Path
    metrics: Path
    tensorboard: Path
    checkpoint: Path
    reconstructions: Path | None
    loss_curve: Path | None
    steps: int
    epochs: float
    final_loss: float
    seconds: float
    images_per_sec: float
    device: str
    num_params: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_dir(cfg: PretrainConfig) -> Path:
    if cfg.train.out:
        path = Path(cfg.train.out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{cfg.preset}-{stamp}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot write to run directory '{path}': {e.strerror or e}") from None
    return path


def training_autocast(device: torch.device, precision: str):
    """The autocast context of training: bf16 on CUDA for precision `auto`, else fp32 (none)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_loader(cfg: PretrainConfig, dataset, device: torch.device) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,  # every step sees a full batch, so the lr scaling holds
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        # Shuffling and each worker's augmentation seeds derive from this generator.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def pretrain(cfg: PretrainConfig, progress: bool = True) -> RunResult:
    """Run UM-MAE pre-training as configured; returns where everything was written."""
    device = resolve_device(cfg.train.device)
    run_dir = _run_dir(cfg)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    _seed_everything(cfg.train.seed)

    dataset = build_pretrain_dataset(cfg.data.path, cfg.data.img_size,
                                     scale=(cfg.data.min_crop_scale, 1.0),
                                     demo_length=cfg.data.demo_length)
    loader = _make_loader(cfg, dataset, device)
    accum = cfg.train.accum_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the data has {len(dataset)} images, fewer than one optimizer step needs "
            f"(--batch-size {cfg.train.batch_size} x --accum-steps {accum}); lower them")

    model = build_pretrain_model(cfg).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.lr, cfg.optim.weight_decay, cfg.optim.betas)
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, cfg.train.epochs,
                                                 cfg.optim.warmup_epochs, cfg.train.max_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.optim.min_lr)
    # Masks come from their own generator, so they do not depend on how many random numbers
    # the model's initialisation or the data pipeline consumed.
    mask_gen = torch.Generator().manual_seed(cfg.train.seed + 1)

    metrics = MetricsWriter(run_dir)
    bar = tqdm(total=total_steps, desc=f"pretrain {cfg.preset}", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    step, micro, epoch = 0, 0, 0
    window_loss, window_batches, window_images = 0.0, 0, 0
    last_loss = float("nan")
    start = window_start = time.perf_counter()
    model.train()
    try:
        while step < total_steps:
            for imgs in loader:
                imgs = imgs.to(device, non_blocking=True)
                masks = model.sample_masks(imgs.shape[0], generator=mask_gen, device=device)
                with training_autocast(device, cfg.train.precision):
                    loss, _, _ = model(imgs, masks)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss became {loss_value} at step {step + 1} (epoch {epoch}); training stopped, "
                        f"checkpoints already in '{run_dir}' are untouched; try a lower lr or --set optim.clip_grad=1.0")
                (loss / accum).backward()
                micro += 1
                window_loss += loss_value
                window_batches += 1
                window_images += imgs.shape[0]
                if micro % accum:
                    continue

                if cfg.optim.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(step)
                bar.update(1)

                if step % cfg.train.log_every == 0 or step == total_steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    now = time.perf_counter()
                    last_loss = window_loss / window_batches
                    record = {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "loss": last_loss,
                        "lr": optimizer.param_groups[0]["lr"],
                        "images_per_sec": window_images / max(now - window_start, 1e-9),
                    }
                    metrics.log(record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}")
                    window_loss, window_batches, window_images, window_start = 0.0, 0, 0, now
                if step >= total_steps or micro >= (epoch + 1) * steps_per_epoch * accum:
                    break  # partial accumulation groups at the end of an epoch are dropped
            epoch += 1
    finally:
        bar.close()
        metrics.close()
    seconds = time.perf_counter() - start

    checkpoint = save_checkpoint(run_dir / "checkpoint.pt", {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "config": config_to_dict(cfg),
    })
    recon = _save_reconstructions(model, dataset, cfg, device, run_dir / "reconstructions.png")
    curve = save_loss_curve(metrics.path, run_dir / "loss.png")
    return RunResult(
        run_dir=run_dir, config=config_path, metrics=metrics.path, tensorboard=run_dir / "tb",
        checkpoint=checkpoint, reconstructions=recon, loss_curve=curve, steps=step,
        epochs=step / steps_per_epoch, final_loss=last_loss, seconds=seconds,
        images_per_sec=step * cfg.effective_batch / max(seconds, 1e-9), device=str(device),
        num_params=num_params)


@torch.no_grad()
def _save_reconstructions(model, dataset, cfg: PretrainConfig, device: torch.device,
                          path: Path) -> Path | None:
    """Reconstructions of the first `vis_images` images under fresh masks (fixed seed)."""
    n = min(cfg.train.vis_images, len(dataset))
    if n == 0:
        return None
    imgs = torch.stack([dataset[i] for i in range(n)]).to(device)
    model.eval()
    masks = model.sample_masks(n, generator=torch.Generator().manual_seed(cfg.train.seed), device=device)
    with training_autocast(device, cfg.train.precision):
        _, pred, _ = model(imgs, masks)
    return save_reconstruction_grid(path, imgs, pred, masks.mask, model.unit,
                                    secondary=masks.secondary, norm_pix_loss=model.norm_pix_loss)
