"""Supervised fine-tuning of a pre-trained encoder on a labeled folder (SPEC sec. 6), on one or many processes.

The recipe: the encoder rebuilt for full images (`ummae.models.loading`) + global average pool,
LayerNorm and a linear head (`ummae.models.classifier.Classifier`); AdamW with layer-wise lr
decay (timm's `param_groups_layer_decay`); linear warm-up + half-cosine per optimizer update
(`engine.optim`); RandAugment + random erasing (timm's `create_transform`), mixup/cutmix (timm's
`Mixup`) or RecursiveMix (`engine.recursive_mix`), label smoothing, stochastic depth;
`lr = blr * effective_batch / 256`.

A run directory holds:
    config.yaml     the resolved fine-tuning settings, the encoder's configuration, the classes
    metrics.jsonl   one JSON object per epoch: epoch, step, loss, lr, val_loss, val_top1, val_top5 (%)
    tb/             TensorBoard events of the same scalars
    best.pt         the weights of the epoch with the best validation top-1
    last.pt         the weights after the latest epoch

Both checkpoints keep the encoder under `encoder.` with its configuration under `config`, so they
are encoder sources for every tool that reads `ummae pretrain` checkpoints (and for another
fine-tuning); `ummae.models.classifier.load_finetuned` rebuilds the classifier with its classes.

Under `torchrun` every process trains on its share of each epoch (`DistributedSampler`) and
evaluates its share of the validation set; the counts are summed over processes, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from ..config import PretrainConfig, config_to_dict
from ..errors import ConfigError, UmmaeError
from .checkpoint import save_checkpoint
from .determinism import deterministic_on_cpu
from .distributed import (DistEnv, all_reduce_mean, all_reduce_sum, any_rank, gather_strings, init_distributed,
                          shared_run_dir, shutdown_distributed)
from .metrics import MetricsWriter
from .optim import build_scheduler, schedule_lengths
from .pretrain import training_autocast
from .recursive_mix import RecursiveMix, smooth_one_hot, soft_cross_entropy

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "recipe_defaults", "build_finetune_optimizer",
           "finetune_transforms", "evaluate_classifier"]

# The recipe's RandAugment (m9, mstd 0.5), with sampled magnitudes clipped at 9 instead of 10:
# at 10, timm's "increasing" posterize keeps 0 bits, which Pillow >= 13 rejects (ValueError in a
# data worker, mid-run). The cap only changes draws above 9.
AUTO_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on. `None` = the recipe's value (see `recipe_defaults`)."""

    checkpoint: str = ""  # encoder source: an `ummae pretrain` (or `ummae finetune`) checkpoint
    data: str = ""  # labeled folder DIR/<class>/*.jpg
    val_data: str | None = None  # a second labeled folder with the same classes
    val_fraction: float = 0.1  # without val_data: stratified share of `data` held out
    out: str | None = None
    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 64  # per process and micro-step
    accum_steps: int = 1
    blr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float | None = None  # None: 0.85 (ViT 0.8, Swin-L-sized 0.7)
    drop_path: float | None = None  # None: 0.1 (Swin-L-sized 0.2)
    augment: bool = True  # random resized crop + flip + RandAugment (+ random erasing)
    re_prob: float | None = None  # random erasing; None: 0.25 (0 with augment off)
    mixup: float | None = None  # None: 0.8 (0 with augment off or recursive mix)
    cutmix: float | None = None  # None: 1.0 (0 with augment off or recursive mix)
    smoothing: float = 0.1
    recursive_mix: bool = False
    rm_alpha: float = 0.5
    rm_omega: float = 0.5
    img_size: int | None = None  # None: the encoder's pre-training size
    init_random: bool = False  # same architecture, random weights (the from-scratch baseline)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA) | fp32 | bf16 | fp16 (CUDA)
    num_workers: int = 4


@dataclass
class FinetuneResult:
    run_dir: Path
    config: Path
    metrics: Path
    best: Path
    last: Path
    classes: list[str]
    train_images: int
    val_images: int
    best_top1: float
    best_top5: float
    best_epoch: int
    final_top1: float
    final_top5: float
    final_loss: float
    steps: int
    epochs: int
    seconds: float
    device: str
    num_params: int
    lr: float
    effective_batch: int
    settings: dict  # the resolved recipe values (layer_decay, drop_path, mixup, ...)
    world_size: int = 1
    skipped_images: list[str] = dataclasses.field(default_factory=list)  # unreadable, passed over


# ---------------------------------------------------------------------------------------------
# recipe

def recipe_defaults(cfg: FinetuneConfig, encoder_cfg: PretrainConfig) -> dict:
    """The values the run uses for every `None` of `cfg` (SPEC sec. 6)."""
    m = encoder_cfg.model
    large = m.arch == "swin" and m.embed_dim >= 192  # Swin-L and wider
    augment = cfg.augment
    mix_on = augment and not cfg.recursive_mix
    values = {
        "layer_decay": cfg.layer_decay if cfg.layer_decay is not None
        else (0.8 if m.arch == "vit" else 0.7 if large else 0.85),
        "drop_path": cfg.drop_path if cfg.drop_path is not None else (0.2 if large else 0.1),
        "re_prob": cfg.re_prob if cfg.re_prob is not None else (0.25 if augment else 0.0),
        "mixup": cfg.mixup if cfg.mixup is not None else (0.8 if mix_on else 0.0),
        "cutmix": cfg.cutmix if cfg.cutmix is not None else (1.0 if mix_on else 0.0),
        "img_size": cfg.img_size if cfg.img_size is not None else encoder_cfg.data.img_size,
    }
    if cfg.recursive_mix:  # RecursiveMix replaces mixup/cutmix
        values["mixup"] = values["cutmix"] = 0.0
    return values


def _validate(cfg: FinetuneConfig) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def finite(v) -> bool:
        return v is not None and math.isfinite(v)

    check(bool(cfg.checkpoint), "--checkpoint is required")
    check(bool(cfg.data), "--data is required")
    check(finite(cfg.val_fraction) and 0 < cfg.val_fraction < 1,
          f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    check(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    check(cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}")
    check(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    check(cfg.accum_steps >= 1, f"--accum-steps must be >= 1, got {cfg.accum_steps}")
    check(finite(cfg.blr) and cfg.blr > 0, f"--blr must be > 0, got {cfg.blr}")
    check(finite(cfg.min_lr) and cfg.min_lr >= 0, f"min_lr must be >= 0, got {cfg.min_lr}")
    check(finite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0,
          f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    check(finite(cfg.weight_decay) and cfg.weight_decay >= 0,
          f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    check(cfg.layer_decay is None or (finite(cfg.layer_decay) and 0 < cfg.layer_decay <= 1),
          f"--layer-decay must be in (0, 1], got {cfg.layer_decay}")
    check(cfg.drop_path is None or (finite(cfg.drop_path) and 0 <= cfg.drop_path < 1),
          f"--drop-path must be in [0, 1), got {cfg.drop_path}")
    check(cfg.re_prob is None or (finite(cfg.re_prob) and 0 <= cfg.re_prob <= 1),
          f"--reprob must be in [0, 1], got {cfg.re_prob}")
    for name in ("mixup", "cutmix"):
        v = getattr(cfg, name)
        check(v is None or (finite(v) and v >= 0), f"--{name} must be >= 0, got {v}")
    check(finite(cfg.smoothing) and 0 <= cfg.smoothing < 1, f"--smoothing must be in [0, 1), got {cfg.smoothing}")
    check(finite(cfg.rm_alpha) and 0 < cfg.rm_alpha <= 1, f"--rm-alpha must be in (0, 1], got {cfg.rm_alpha}")
    check(finite(cfg.rm_omega) and cfg.rm_omega >= 0, f"--rm-omega must be >= 0, got {cfg.rm_omega}")
    check(cfg.img_size is None or cfg.img_size >= 1, f"--img-size must be >= 1, got {cfg.img_size}")
    check(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    check(cfg.num_workers >= 0, f"--workers must be >= 0, got {cfg.num_workers}")
    check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
          f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    check(cfg.precision in ("auto", "fp32", "bf16", "fp16"),
          f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    check(cfg.precision != "fp16" or cfg.device.startswith("cuda"),
          "--precision fp16 needs --device cuda (use bf16 or fp32 on a CPU)")


def finetune_transforms(img_size: int, augment: bool, re_prob: float):
    """`(train, eval)` transforms: PIL RGB -> normalised `[3, img_size, img_size]`.

    Training with augment: timm's ImageNet recipe (random resized crop, flip, RandAugment
    m9-mstd0.5, random erasing `re_prob`, bicubic). Evaluation, and training without augment:
    shorter side resized, centre crop (`ummae.data.eval_transform`).
    """
    from timm.data import create_transform

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

    if not augment:
        return eval_transform(img_size), eval_transform(img_size)
    train = create_transform(input_size=img_size, is_training=True, auto_augment=AUTO_AUGMENT,
                             re_prob=re_prob, re_mode="pixel", re_count=1, interpolation="bicubic",
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return train, eval_transform(img_size)


def build_finetune_optimizer(model, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay: group `lr_scale = layer_decay ** (last_layer - layer)`.

    Layers come from `model.group_matcher()`; biases, norms and `model.no_weight_decay()` are not
    decayed. The scheduler (`engine.optim.build_scheduler`) multiplies each group's lr by its scale.
    """
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate_classifier(model, loader, env: DistEnv, device: torch.device, precision: str = "auto",
                        skipped: set[str] | None = None) -> dict:
    """`{"val_loss", "val_top1", "val_top5"}` (top-k in %) over the loader, summed over processes.

    With `collate_skipping` batches `(images, labels, passed_over)`, unreadable images are left
    out (added to `skipped`); a batch of only unreadable images is `(None, None, ...)`.
    """
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    unreadable: set[str] = set()
    for batch in loader:
        images, labels = batch[0], batch[1]
        if len(batch) > 2:
            unreadable.update(batch[2])
        if images is None:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with training_autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, k]
        hits = top.eq(labels.unsqueeze(1))
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.shape[0]
    if skipped is not None:
        skipped.update(unreadable)
    count = all_reduce_sum(count, env, device)
    if count == 0:
        raise UmmaeError("none of the validation images could be read" + (
            f" (e.g. '{min(unreadable)}')" if unreadable else ""))
    loss_sum, correct1, correct5 = (all_reduce_sum(v, env, device) for v in (loss_sum, correct1, correct5))
    n = max(count, 1.0)
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * correct1 / n, "val_top5": 100.0 * correct5 / n}


# ---------------------------------------------------------------------------------------------
# set-up

def _encoder_config(encoder_cfg: PretrainConfig, img_size: int, drop_path: float) -> dict:
    """The encoder's configuration as the fine-tuned checkpoint stores it (this run's size)."""
    cfg = copy.deepcopy(encoder_cfg)
    cfg.data.img_size = img_size
    cfg.model.drop_path_rate = drop_path
    return config_to_dict(cfg)


def _check_runs(model, img_size: int, device: torch.device) -> None:
    """One tiny forward at the fine-tuning size: size/window/stride mismatches surface now, before
    anything is written, as the encoders' one-line `ConfigError`s."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    model.train(was_training)


# ---------------------------------------------------------------------------------------------
# the run

def finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """Fine-tune as configured. Under `torchrun` every process calls this; rank 0 writes and prints."""
    _validate(cfg)
    env, device = init_distributed(cfg.device)
    try:
        with deterministic_on_cpu(device):  # bit-identical fresh CPU runs (engine.determinism)
            return _finetune(cfg, env, device, progress and env.is_main)
    finally:
        shutdown_distributed()


def _finetune(cfg: FinetuneConfig, env: DistEnv, device: torch.device, progress: bool) -> FinetuneResult:
    from ..data.labeled import (SkipUnreadable, collate_skipping, require_two_classes, train_val_datasets,
                               write_skipped)
    from ..models.classifier import build_classifier, encoder_source

    seed, batch, accum = cfg.seed, cfg.batch_size, cfg.accum_steps
    # Everything that can be wrong with the input is checked before anything is written.
    encoder_cfg, weights = encoder_source(cfg.checkpoint)
    settings = recipe_defaults(cfg, encoder_cfg)
    img_size = settings["img_size"]
    train_tf, val_tf = finetune_transforms(img_size, cfg.augment, settings["re_prob"])
    train_set, val_set, classes = train_val_datasets(cfg.data, cfg.val_data, train_tf, val_tf,
                                                     cfg.val_fraction, seed)
    # Unreadable images: a training one is replaced by the next readable one (full batches), a
    # validation one is left out (nothing counted twice); all are listed in skipped_images.txt.
    train_set, val_set = SkipUnreadable(train_set, replace=True), SkipUnreadable(val_set, replace=False)
    require_two_classes(cfg.data, classes)
    num_classes = len(classes)
    if len(val_set) == 0:
        raise UmmaeError(f"the validation set is empty: give --val-data, or more images per class in "
                         f"'{cfg.data}' for --val-fraction {cfg.val_fraction}")
    mixup_on = settings["mixup"] > 0 or settings["cutmix"] > 0
    if mixup_on and batch % 2:
        raise ConfigError(f"mixup/cutmix need an even --batch-size, got {batch} (or pass --mixup 0 --cutmix 0)")
    sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    steps_per_epoch = len(sampler) // batch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {len(train_set)} images, fewer than one optimizer step needs "
            f"(--batch-size {batch} x --accum-steps {accum} x {env.world_size} processes); lower them")

    torch.manual_seed(seed)  # identical head (and, with --init-random, encoder) on every rank
    model, _ = build_classifier(encoder_cfg, None if cfg.init_random else weights, num_classes,
                                drop_path_rate=settings["drop_path"], img_size=img_size)
    model = model.to(device)
    _check_runs(model, img_size, device)
    del weights

    run_dir = shared_run_dir(cfg.out, f"finetune-{Path(cfg.checkpoint).stem}", env)
    effective_batch = batch * accum * env.world_size
    lr = cfg.blr * effective_batch / 256
    encoder_dict = _encoder_config(encoder_cfg, img_size, settings["drop_path"])
    run_config = {"finetune": dataclasses.asdict(cfg), "resolved": {**settings, "lr": lr,
                                                                     "effective_batch": effective_batch,
                                                                     "world_size": env.world_size},
                  "classes": list(classes), "encoder": encoder_dict}
    config_path = run_dir / "config.yaml"
    if env.is_main:
        config_path.write_text(yaml.safe_dump(run_config, sort_keys=False))

    # Per-rank streams for augmentation (python `random`: RandAugment; numpy: timm's Mixup).
    random.seed(seed * 1000 + env.rank)
    np.random.seed((seed * 1000 + env.rank) % 2**32)
    torch.manual_seed(seed * 1000 + env.rank)

    optimizer = build_finetune_optimizer(model, lr, cfg.weight_decay, settings["layer_decay"])
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.max_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    mixup_fn = None
    if mixup_on:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=settings["mixup"], cutmix_alpha=settings["cutmix"],
                         label_smoothing=cfg.smoothing, num_classes=num_classes)
    rmix = None
    if cfg.recursive_mix:
        rmix = RecursiveMix(cfg.rm_alpha, cfg.rm_omega,
                            torch.Generator().manual_seed(seed * 1000 + env.rank + 1))

    workers = cfg.num_workers
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        collate_fn=collate_skipping)
    val_shard = Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
    val_loader = DataLoader(val_shard, batch_size=batch, shuffle=False, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                            collate_fn=collate_skipping)
    skipped_files: set[str] = set()

    train_model = model
    if env.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    num_params = sum(p.numel() for p in model.parameters())

    def checkpoint_state(epoch: int, step: int, scores: dict) -> dict:
        return {"model": model.state_dict(), "config": encoder_dict, "finetune": run_config["finetune"],
                "classes": list(classes), "epoch": epoch, "step": step, **scores}

    metrics = MetricsWriter(run_dir) if env.is_main else None
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    bar = tqdm(total=total_steps, desc="finetune", unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=0.5)
    best = {"val_top1": -1.0, "val_top5": 0.0, "epoch": 0}
    scores = {"val_top1": float("nan"), "val_top5": float("nan")}
    step, epoch, last_loss = 0, 0, float("nan")
    start = time.perf_counter()
    try:
        for epoch in range(1, num_epochs + 1):
            sampler.set_epoch(epoch - 1)
            train_model.train()
            loss_sum, loss_count, micro = 0.0, 0, 0
            for images, labels, passed_over in loader:
                skipped_files.update(passed_over)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, labels)
                else:
                    targets = smooth_one_hot(labels, num_classes, cfg.smoothing)
                with training_autocast(device, cfg.precision):
                    if rmix is not None:
                        logits, mixed, consistency = rmix.step(train_model, images, targets)
                        loss = soft_cross_entropy(logits, mixed.targets) + consistency
                    else:
                        loss = soft_cross_entropy(train_model(images), targets)
                loss_value = loss.item()
                if any_rank(not math.isfinite(loss_value), env, device):
                    raise UmmaeError(f"loss became {loss_value} at step {step + 1} (epoch {epoch}); training "
                                     f"stopped (best.pt / last.pt in '{run_dir}' are untouched); try a lower --blr")
                micro += 1
                sync = micro == accum or not env.enabled
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    scaler.scale(loss / accum).backward()
                loss_sum += loss_value
                loss_count += 1
                if micro < accum:
                    continue
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                micro = 0
                step += 1
                scheduler.step_update(step)
                bar.update(1)
                if step >= total_steps or step % steps_per_epoch == 0:
                    break  # a partial accumulation group at an epoch's end is dropped
            optimizer.zero_grad(set_to_none=True)

            last_loss = all_reduce_mean(loss_sum / max(loss_count, 1), env, device)
            scores = evaluate_classifier(model, val_loader, env, device, cfg.precision, skipped_files)
            skipped_files = gather_strings(skipped_files, env)  # every rank's, kept by all
            record = {"epoch": epoch, "step": step, "loss": last_loss,
                      "lr": max(group["lr"] for group in optimizer.param_groups), **scores}
            improved = scores["val_top1"] > best["val_top1"]
            if improved:
                best = {"val_top1": scores["val_top1"], "val_top5": scores["val_top5"], "epoch": epoch}
            if env.is_main:
                metrics.log(record)
                if skipped_files:  # kept on disk as we go, so a killed run keeps its list
                    write_skipped(run_dir, skipped_files)
                state = checkpoint_state(epoch, step, scores)
                save_checkpoint(last_path, state)
                if improved:
                    save_checkpoint(best_path, state)
                line = (f"epoch {epoch}/{num_epochs}  step {step}  loss {last_loss:.4f}  lr {record['lr']:.3g}  "
                        f"val top-1 {scores['val_top1']:.2f}  top-5 {scores['val_top5']:.2f}  "
                        f"(best top-1 {best['val_top1']:.2f}, epoch {best['epoch']})")
                if progress:
                    bar.write(line)
                else:
                    print(line, flush=True)
            if step >= total_steps:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        for each in (loader, val_loader):  # persistent workers: stop them now (see engine.pretrain)
            iterator = getattr(each, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
    seconds = time.perf_counter() - start
    return FinetuneResult(
        run_dir=run_dir, config=config_path, metrics=run_dir / "metrics.jsonl", best=best_path, last=last_path,
        classes=list(classes), train_images=len(train_set), val_images=len(val_set),
        best_top1=best["val_top1"], best_top5=best["val_top5"], best_epoch=best["epoch"],
        final_top1=scores["val_top1"], final_top5=scores["val_top5"], final_loss=last_loss, steps=step,
        epochs=epoch, seconds=seconds, device=str(device), num_params=num_params, lr=lr,
        effective_batch=effective_batch, settings=settings, world_size=env.world_size,
        skipped_images=sorted(skipped_files))
