"""The pre-training loop: data -> masks -> loss -> AdamW, resumable, on one or many processes.

A run directory holds:
    config.yaml          the resolved configuration (`--config` it to reproduce the run)
    metrics.jsonl        one JSON object per logged step: step, epoch, loss, lr, images_per_sec
    tb/                  TensorBoard events of the same scalars
    checkpoints/         step-00001000.pt ... every `save_every` steps, the last `keep_last` kept
    checkpoint.pt        the final checkpoint: encoder + decoder + optimizer + scheduler + step
    reconstructions.png  original | masked input | reconstruction | prediction, at the end
    loss.png             the loss curve, at the end
    skipped_images.txt   unreadable images that were passed over, if any

Exactness: the data order, every crop and every mask are seeded by (seed, epoch, sample index)
(`ummae.data.sampling`) and the global generator (drop path) is re-seeded by (seed, rank, step)
at every optimizer step, so the run is a pure function of its configuration and step count. A
checkpoint therefore only needs the model, optimizer, scheduler, grad scaler and step to resume
exactly, and a multi-process run sees the same samples as a one-process run with the same
effective batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import PretrainConfig, config_to_dict
from ..data import build_pretrain_dataset
from ..data.sampling import EpochSampler, SeededSamples, draw_masks, seed_for
from ..errors import ConfigError, UmmaeError
from ..masking import MaskSample
from ..models import build_pretrain_model
from ..visualize import save_loss_curve, save_reconstruction_grid
from .checkpoint import (link_or_copy, load_checkpoint, prune_step_checkpoints, save_checkpoint,
                         step_checkpoint_path)
from .distributed import (DistEnv, all_reduce_mean, all_reduce_sum, any_rank, gather_strings,
                          init_distributed, resolve_device, shared_run_dir, shutdown_distributed)
from .metrics import MetricsWriter
from .optim import build_optimizer, build_scheduler, schedule_lengths

__all__ = ["pretrain", "RunResult", "resolve_device", "training_autocast", "NonFiniteLossError"]

# Sections a resumed checkpoint must agree with: they decide the parameters and the data stream.
_ARCHITECTURE_KEYS = ("method", "model", "masking")


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
    world_size: int = 1
    resumed_from: Path | None = None
    skipped_images: list[str] | None = None
    skipped_steps: int = 0


def training_autocast(device: torch.device, precision: str):
    """The autocast context of training: bf16 on CUDA for precision `auto`, else as configured."""
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# set-up

def _check_same_architecture(state: dict, cfg: PretrainConfig, source: str) -> None:
    saved = state.get("config") or {}
    current = config_to_dict(cfg)
    for section in _ARCHITECTURE_KEYS:
        if section not in saved:
            continue
        if saved[section] != current[section]:
            if isinstance(saved[section], dict):
                diff = next(k for k in current[section] if saved[section].get(k) != current[section][k])
                raise ConfigError(
                    f"{source} was trained with {section}.{diff}={saved[section].get(diff)!r}, this run has "
                    f"{current[section][diff]!r}: a checkpoint of another architecture")
            raise ConfigError(f"{source} was trained with {section}={saved[section]!r}, this run has "
                              f"{current[section]!r}: a checkpoint of another architecture")


def _load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a checkpoint's model weights, refusing (one line) those of another architecture."""
    weights = state["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"shape of {wrong[0]} is {tuple(weights[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
                  if wrong else f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected")
        raise ConfigError(f"{source} is a checkpoint of another architecture: {detail}")
    model.load_state_dict(weights)


def _make_loader(cfg: PretrainConfig, dataset, sampler: EpochSampler, masking,
                 device: torch.device) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(
        SeededSamples(dataset, cfg.train.seed, masking),
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,  # every step sees full batches, so the lr scaling holds
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def _batch_masks(batch: dict, grid_size: tuple[int, int], has_secondary: bool) -> MaskSample:
    return MaskSample(batch["mask"], batch["ids_keep"], grid_size, batch["secondary"] if has_secondary else None)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint being resumed."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    path.write_text("".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------------------------------------
# the run

def pretrain(cfg: PretrainConfig, progress: bool = True, resume: str | Path | None = None) -> RunResult:
    """Run pre-training as configured (continuing from checkpoint `resume` if given).

    Under `torchrun` every process calls this; only rank 0 writes files and shows progress.
    """
    env, device = init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, env, device, progress and env.is_main, resume)
    finally:
        shutdown_distributed()


def _pretrain(cfg: PretrainConfig, env: DistEnv, device: torch.device, progress: bool,
              resume: str | Path | None) -> RunResult:
    seed, accum, batch = cfg.train.seed, cfg.train.accum_steps, cfg.train.batch_size
    # Everything that can be wrong with the input is checked before anything is written.
    dataset = build_pretrain_dataset(cfg.data.path, cfg.data.img_size, scale=(cfg.data.min_crop_scale, 1.0),
                                     demo_length=cfg.data.demo_length)
    sampler = EpochSampler(len(dataset), seed, env.world_size, env.rank)
    steps_per_epoch = sampler.per_rank // batch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the data has {len(dataset)} images, fewer than one optimizer step needs "
            f"(--batch-size {batch} x --accum-steps {accum} x {env.world_size} processes); lower them")
    resume_state = load_checkpoint(resume) if resume else None
    if resume_state is not None:
        _check_same_architecture(resume_state, cfg, f"--resume '{resume}'")
    # A resumed run takes its weights from the checkpoint; init_weights is then provenance only.
    init_state = None
    if cfg.train.init_weights and resume is None:
        if not Path(cfg.train.init_weights).is_file():
            raise ConfigError(f"--init-weights: '{cfg.train.init_weights}' does not exist")
        if cfg.model.arch == "hiera":  # also timm's / Hiera's own backbone weights (`.mae`)
            from ..models.hiera import read_init_weights

            init_state = read_init_weights(cfg.train.init_weights)
        else:
            init_state = load_checkpoint(cfg.train.init_weights)

    run_dir = shared_run_dir(cfg.train.out, cfg.preset, env)
    config_path = run_dir / "config.yaml"
    if env.is_main:
        config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg).to(device)
    loader = _make_loader(cfg, dataset, sampler, model.masking, device)
    has_secondary = cfg.method == "ummae"
    if init_state is not None and "model" not in init_state:  # a Hiera backbone's weights: encoder only
        from ..models.hiera import load_backbone_weights

        load_backbone_weights(model, init_state, f"--init-weights '{cfg.train.init_weights}'")
    elif init_state is not None:
        _load_weights(model, init_state, f"--init-weights '{cfg.train.init_weights}'")
    if resume_state is not None:
        _load_weights(model, resume_state, f"--resume '{resume}'")
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.peak_lr(env.world_size), cfg.optim.weight_decay, cfg.optim.betas)
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, cfg.train.epochs,
                                                 cfg.optim.warmup_epochs, cfg.train.max_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.optim.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    step = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        step = int(resume_state["step"])

    train_model = torch.compile(model) if cfg.train.compile else model
    if env.enabled:
        train_model = DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None)

    def checkpoint_state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "world_size": env.world_size, "config": config_to_dict(cfg),
                # No generator state: every draw is seeded from (seed, epoch, index) or (seed, rank, step).
                "rng": {"scheme": "counter-v1", "seed": seed}}

    metrics = MetricsWriter(run_dir) if env.is_main else None
    if metrics is not None and step:
        _truncate_metrics(metrics.path, step)
    bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {cfg.preset}", unit="step",
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    skipped_files: set[str] = set()
    skipped_steps = 0
    window_loss, window_batches, window_images = 0.0, 0, 0
    last_loss = float("nan")
    start_step, start = step, time.perf_counter()
    window_start = start
    train_model.train()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch, start=(step % steps_per_epoch) * accum * batch)
            micro, group_ok = 0, True
            for batch_data in loader:
                if micro == 0:
                    torch.manual_seed(seed_for(seed, "step", env.rank, step))  # drop path etc.
                skipped_files.update(p for s in batch_data["skipped"] if s for p in s.split("\n"))
                imgs = batch_data["image"].to(device, non_blocking=True)
                masks = _batch_masks(batch_data, model.grid_size, has_secondary).to(device)
                with training_autocast(device, cfg.train.precision):
                    loss, _, _ = train_model(imgs, masks)
                loss_value = loss.item()
                bad = any_rank(not math.isfinite(loss_value), env, device)  # all ranks agree
                if bad and cfg.train.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"loss became {loss_value} at step {step + 1} (epoch {epoch}); training stopped, "
                        f"checkpoints in '{run_dir}' are untouched; try a lower lr, --set optim.clip_grad=1.0, "
                        f"or --set train.on_nonfinite=skip")
                micro += 1
                if bad:
                    group_ok = False
                else:
                    sync = micro == accum or not env.enabled
                    with contextlib.nullcontext() if sync else train_model.no_sync():
                        scaler.scale(loss / accum).backward()
                    window_loss += loss_value
                    window_batches += 1
                    window_images += imgs.shape[0]
                if micro < accum:
                    continue

                if group_ok:
                    if cfg.optim.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    skipped_steps += 1  # the step is spent (data and schedule move on) but not applied
                optimizer.zero_grad(set_to_none=True)
                step += 1
                micro, group_ok = 0, True
                scheduler.step_update(step)
                bar.update(1)

                if step % cfg.train.log_every == 0 or step == total_steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    now = time.perf_counter()
                    mean_loss = window_loss / window_batches if window_batches else float("nan")
                    last_loss = all_reduce_mean(mean_loss, env, device)
                    images = all_reduce_sum(window_images, env, device)
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": last_loss,
                              "lr": optimizer.param_groups[0]["lr"],
                              "images_per_sec": images / max(now - window_start, 1e-9)}
                    if metrics is not None:
                        metrics.log(record)
                        if skipped_files:  # kept on disk as we go, so a killed run keeps its list
                            _record_skipped(run_dir, skipped_files)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}")
                    window_loss, window_batches, window_images, window_start = 0.0, 0, 0, now
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                    if env.is_main:
                        save_checkpoint(step_checkpoint_path(run_dir, step), checkpoint_state())
                        prune_step_checkpoints(run_dir, cfg.train.keep_last)
                if step >= total_steps or step % steps_per_epoch == 0:
                    break  # next epoch (partial accumulation groups at an epoch's end are dropped)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        _shutdown_workers(loader)
    seconds = time.perf_counter() - start
    skipped_all = sorted(gather_strings(skipped_files, env))

    final = run_dir / "checkpoint.pt"
    recon = curve = None
    if env.is_main:
        periodic = save_checkpoint(step_checkpoint_path(run_dir, step), checkpoint_state())
        prune_step_checkpoints(run_dir, cfg.train.keep_last)
        link_or_copy(periodic, final)
        recon = _save_reconstructions(model, dataset, cfg, device, run_dir / "reconstructions.png")
        curve = save_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
        if skipped_all:
            skipped_all = _record_skipped(run_dir, set(skipped_all))
    done = step - start_step
    return RunResult(
        run_dir=run_dir, config=config_path, metrics=run_dir / "metrics.jsonl", tensorboard=run_dir / "tb",
        checkpoint=final, reconstructions=recon, loss_curve=curve, steps=step,
        epochs=step / steps_per_epoch, final_loss=last_loss, seconds=seconds,
        images_per_sec=done * cfg.effective_batch * env.world_size / max(seconds, 1e-9), device=str(device),
        num_params=num_params, world_size=env.world_size, resumed_from=Path(resume) if resume else None,
        skipped_images=skipped_all, skipped_steps=skipped_steps)


def _record_skipped(run_dir: Path, paths: set[str]) -> list[str]:
    """Merge `paths` into run_dir/skipped_images.txt (with what earlier sessions listed there)."""
    listing = run_dir / "skipped_images.txt"
    known = set(listing.read_text().splitlines()) if listing.exists() else set()
    merged = sorted((known | paths) - {""})
    if set(merged) != known:
        listing.write_text("".join(f"{p}\n" for p in merged))
    return merged


def _shutdown_workers(loader: DataLoader) -> None:
    """Stop persistent DataLoader workers now. After an error the live iterator is held by the
    traceback, and its workers would linger until a garbage collection (which then blocks ~10 s);
    torch has no public call for this, hence the private one, guarded."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


@torch.no_grad()
def _save_reconstructions(model, dataset, cfg: PretrainConfig, device: torch.device,
                          path: Path) -> Path | None:
    """Reconstructions of the first `vis_images` images under fixed masks and crops."""
    n = min(cfg.train.vis_images, len(dataset))
    if n == 0:
        return None
    samples = SeededSamples(dataset, cfg.train.seed)
    imgs = torch.stack([samples[(0, i)]["image"] for i in range(n)]).to(device)
    model.eval()
    masks = draw_masks(model.masking, cfg.train.seed, 0, list(range(n))).to(device)
    with training_autocast(device, cfg.train.precision):
        _, pred, _ = model(imgs, masks)
    return save_reconstruction_grid(path, imgs, pred, masks.mask, model.unit,
                                    secondary=masks.secondary, norm_pix_loss=model.norm_pix_loss)
