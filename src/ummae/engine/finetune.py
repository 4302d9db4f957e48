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
    checkpoints/    step-00001000.pt ...: the whole training state (weights, optimizer, grad scaler,
                    step, best so far, mixing history), every `save_every` steps and at every epoch's
                    end, the last `keep_last` kept: what `--resume` continues
    skipped_images.txt  unreadable images that were passed over, if any

Both checkpoints keep the encoder under `encoder.` with its configuration under `config`, so they
are encoder sources for every tool that reads `ummae pretrain` checkpoints (and for another
fine-tuning); `ummae.models.classifier.load_finetuned` rebuilds the classifier with its classes.

Under `torchrun` every process trains on its share of each epoch (`EpochSampler`) and
evaluates its share of the validation set; the counts are summed over processes, rank 0 writes.

Exactness, as in pre-training (`engine.pretrain`): the data order and every augmentation are seeded
by (seed, epoch, sample index) (`SeededLabeledSamples`), and the draws of the main process (drop
path, mixup/cutmix, RecursiveMix boxes) by (seed, rank, step), so a checkpoint needs no generator
state; with the weights, optimizer, grad scaler, step and RecursiveMix's history a resumed run
continues bit for bit. Nothing non-finite reaches the weights or a checkpoint (`engine.guard`);
SIGTERM/SIGINT stop at the next step boundary with a checkpoint (`engine.signals`); one run per
directory (`engine.rundir`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import PretrainConfig, config_to_dict, refuse_changed_keys
from ..data.labeled import SkipUnreadable, collate_skipping, require_two_classes, train_val_datasets, write_skipped
from ..data.sampling import EpochSampler, SeededLabeledSamples, seed_for
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ..errors import ConfigError, UmmaeError
from ..models.classifier import build_classifier, encoder_source
from ..models.specs import backbone_spec
from .checkpoint import save_checkpoint
from .cpus import fit_threads, resolve_workers, run_plan
from .determinism import deterministic_on_cpu
from .distributed import (DistEnv, all_reduce_sum, gather_objects, gather_strings, init_distributed, shared_run_dir,
                          shutdown_distributed)
from .guard import GRADIENTS, LOSS, WEIGHTS, GuardReport, NonFiniteLossError, StepGuard
from .loop import CheckPoints, StepCheckpoints, TrainStep, shutdown_workers, training_autocast
from .metrics import MetricsWriter, log_line, truncate_metrics
from .optim import build_scheduler, schedule_lengths
from .progress import eta_text, track
from .recursive_mix import RecursiveMix, smooth_one_hot, soft_cross_entropy
from .resume import ResumePoint, find_resume, load_weights
from .rundir import take_run_dir
from .signals import StopSignals, ignore_stop_signals_in_worker

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "resume_finetune", "recipe_defaults",
           "build_finetune_optimizer", "finetune_transforms", "evaluate_classifier", "FINETUNE_RESUMABLE_KEYS",
           "check_finetune_resumable", "absolute_finetune_paths"]

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
    auto_augment: str = AUTO_AUGMENT  # timm's policy string ("rand-m9-...", "augmix", ...); "none": off
    hflip: float = 0.5  # horizontal flip probability (0 for images that flipping changes: digits, text)
    min_crop_scale: float = 0.08  # random resized crop keeps 8%-100% of the image's area
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
    num_workers: int | None = None  # None: fitted to the CPUs (engine/cpus.py)
    save_every: int = 1000  # optimizer steps between periodic checkpoints (0: epoch ends only)
    keep_last: int = 3  # periodic checkpoints kept (0: all)
    log_every: int = 50  # steps between plain log lines (no terminal) and non-finite checks inside an epoch


# What may differ between a fine-tuning checkpoint's settings and the run that resumes it: the
# run's length (extend it), output and the machine. Everything else changes the maths: refused.
FINETUNE_RESUMABLE_KEYS = ("epochs", "max_steps", "save_every", "keep_last", "log_every", "out", "device",
                           "num_workers")


def absolute_finetune_paths(cfg: "FinetuneConfig") -> "FinetuneConfig":
    """Make the run's paths absolute (against the current directory): its config.yaml and
    checkpoints then work from any working directory."""
    for key in ("checkpoint", "data", "val_data", "out"):
        value = getattr(cfg, key)
        if value:
            setattr(cfg, key, os.path.abspath(os.path.expanduser(value)))
    return cfg


def check_finetune_resumable(saved: dict, cfg: "FinetuneConfig", source: str) -> None:
    """Refuse (one line, naming the keys) a configuration that differs from the checkpoint's in
    more than FINETUNE_RESUMABLE_KEYS."""
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    old = dataclasses.asdict(absolute_finetune_paths(FinetuneConfig(**{k: v for k, v in saved.items() if k in known})))
    refuse_changed_keys(old, dataclasses.asdict(cfg), FINETUNE_RESUMABLE_KEYS, source)


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
    resumed_from: Path | None = None
    start_step: int = 0  # the step this session started at (> 0 when resumed)


# ---------------------------------------------------------------------------------------------
# recipe

def recipe_defaults(cfg: FinetuneConfig, encoder_cfg: PretrainConfig) -> dict:
    """The values the run uses for every `None` of `cfg` (SPEC sec. 6)."""
    backbone = backbone_spec(encoder_cfg.model.arch).finetune_defaults(encoder_cfg.model)  # layer decay, drop path
    augment = cfg.augment
    mix_on = augment and not cfg.recursive_mix
    values = {
        "layer_decay": cfg.layer_decay if cfg.layer_decay is not None else backbone["layer_decay"],
        "drop_path": cfg.drop_path if cfg.drop_path is not None else backbone["drop_path"],
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
    check(bool(cfg.auto_augment), "--auto-augment must be a timm policy (e.g. rand-m9-mstd0.5-inc1) or none")
    check(finite(cfg.hflip) and 0 <= cfg.hflip <= 1, f"--hflip must be in [0, 1], got {cfg.hflip}")
    check(finite(cfg.min_crop_scale) and 0 < cfg.min_crop_scale <= 1,
          f"--min-crop-scale must be in (0, 1], got {cfg.min_crop_scale}")
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
    check(cfg.num_workers is None or cfg.num_workers >= 0, f"--workers must be >= 0, got {cfg.num_workers}")
    check(cfg.save_every >= 0, f"--save-every must be >= 0, got {cfg.save_every}")
    check(cfg.keep_last >= 0, f"--keep-last must be >= 0, got {cfg.keep_last}")
    check(cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}")
    check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
          f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    check(cfg.precision in ("auto", "fp32", "bf16", "fp16"),
          f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    check(cfg.precision != "fp16" or cfg.device.startswith("cuda"),
          "--precision fp16 needs --device cuda (use bf16 or fp32 on a CPU)")


CHANCE_CHECK_EPOCH = 3  # "a few epochs": when a training loss still at chance is worth a word


def warmup_warning(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> str | None:
    """One line when the warm-up is not shorter than the run (the lr would peak at its last step,
    or, with the warm-up clipped to leave one update, jump from near 0 to the peak), else None."""
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup == 0 or warmup < total_steps:
        return None
    run_epochs = total_steps / steps_per_epoch
    suggest = max(run_epochs / 5, 1 / steps_per_epoch)
    return (f"ummae finetune: warning: the warm-up ({warmup_epochs:g} epochs, {warmup} steps) is not shorter than "
            f"the run ({run_epochs:g} epochs, {total_steps} steps): the lr barely leaves 0 and the run may end at "
            f"chance; use e.g. --warmup-epochs {suggest:.2g}, or more --epochs")


def chance_warning(loss: float, num_classes: int, epoch: int) -> str | None:
    """One line, at epoch CHANCE_CHECK_EPOCH, when the training loss is still about log(classes):
    the cross-entropy of a uniform guess (label smoothing and mixup do not change that value)."""
    chance = math.log(num_classes)
    if epoch != CHANCE_CHECK_EPOCH or not math.isfinite(loss) or loss < 0.95 * chance:
        return None
    return (f"ummae finetune: warning: after {epoch} epochs the training loss {loss:.3f} is still about "
            f"log({num_classes} classes) = {chance:.3f}, a uniform guess: the classifier is not learning yet; try "
            f"a higher --blr, a shorter --warmup-epochs, more --epochs, or --no-augment on a small data set")


def finetune_transforms(img_size: int, augment: bool, re_prob: float, auto_augment: str = AUTO_AUGMENT,
                        hflip: float = 0.5, min_crop_scale: float = 0.08):
    """`(train, eval)` transforms: PIL RGB -> normalised `[3, img_size, img_size]`.

    Training with augment: timm's ImageNet recipe (random resized crop of `min_crop_scale`-100% of
    the area, flip with probability `hflip`, RandAugment m9-mstd0.5 or another `auto_augment`
    policy of timm's, "none" for none; random erasing `re_prob`, bicubic). Evaluation, and
    training without augment: shorter side resized, centre crop (`ummae.data.eval_transform`).
    A bad policy string raises `ConfigError` (timm's own error is an assertion deep inside).
    """
    from timm.data import create_transform

    if not augment:
        return eval_transform(img_size), eval_transform(img_size)
    policy = None if auto_augment.lower() == "none" else auto_augment
    # without a policy timm falls back to colour jitter 0.4: "none" means none of either
    jitter = {} if policy else {"color_jitter": None}
    bad = ConfigError(f"--auto-augment {auto_augment!r} is not a policy timm knows "
                      f"(e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, none)")
    # timm skips a section without a number ("rand-m9-everything" = "rand-m9"): refuse it here
    if policy and not all(re.fullmatch(r"[a-z]+\d[\d.]*", part) for part in policy.split("-")[1:]):
        raise bad
    try:
        train = create_transform(input_size=img_size, is_training=True, auto_augment=policy, hflip=hflip,
                                 scale=(min_crop_scale, 1.0), re_prob=re_prob, re_mode="pixel", re_count=1,
                                 interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, **jitter)
    except (AssertionError, ValueError, KeyError):
        raise bad from None
    return train, eval_transform(img_size)


def build_finetune_optimizer(model, lr: float, weight_decay: float, layer_decay: float,
                             fused: bool = False) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay: group `lr_scale = layer_decay ** (last_layer - layer)`.

    Layers come from `model.group_matcher()`; biases, norms and `model.no_weight_decay()` are not
    decayed. The scheduler (`engine.optim.build_scheduler`) multiplies each group's lr by its scale.
    `fused`: PyTorch's fused AdamW, which skips an update on the device when `found_inf` is set.
    """
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate_classifier(model, loader, env: DistEnv, device: torch.device, precision: str = "auto",
                        skipped: set[str] | None = None, progress: str = "off", desc: str = "validation") -> dict:
    """`{"val_loss", "val_top1", "val_top5"}` (top-k in %) over the loader, summed over processes.

    With `collate_skipping` batches `(images, labels, passed_over)`, unreadable images are left
    out (added to `skipped`); a batch of only unreadable images is `(None, None, ...)`. `progress`:
    an engine.progress mode (`bar` on stderr, plain `lines` on stdout, `off`).
    """
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    unreadable: set[str] = set()
    stream = sys.stdout if progress == "lines" else sys.stderr
    for batch in track(loader, desc, progress, unit="batch", stream=stream):
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
# resume

def resume_finetune(resume: str | None, out: str | None,
                    configure: Callable[[dict | None, ResumePoint | None], FinetuneConfig]
                    ) -> tuple[FinetuneConfig, ResumePoint | None]:
    """The settings and the periodic checkpoint `--resume` continues (`engine.resume`), found and
    loaded once and checked: `configure(saved_settings, point)` builds the run's settings (over the
    checkpoint's, None for a fresh start), which may differ from them only in
    FINETUNE_RESUMABLE_KEYS. What needs the data (classes, processes, step) is checked by `finetune`."""
    point = find_resume(resume, out)
    saved = None
    if point is not None:
        saved = point.state.get("finetune")
        if not isinstance(saved, dict) or "optimizer" not in point.state:
            raise ConfigError(f"--resume: '{point.path}' is not a periodic fine-tuning checkpoint "
                              f"(RUN/checkpoints/step-*.pt of `ummae finetune`)")
    cfg = configure(saved, point)
    if point is not None:
        check_finetune_resumable(saved, cfg, point.source)
    return cfg, point


def _check_resume_state(point: ResumePoint, env: DistEnv, classes: list[str], steps_per_epoch: int,
                        total_steps: int) -> None:
    """Refuse (one line) a checkpoint this run cannot continue exactly."""
    state, source = point.state, point.source
    if "optimizer" not in state or "finetune" not in state or "steps_per_epoch" not in state:
        raise ConfigError(f"{source} is not a periodic fine-tuning checkpoint (RUN/checkpoints/step-*.pt of "
                          f"`ummae finetune`)")
    if int(state.get("world_size", 1)) != env.world_size:
        raise ConfigError(f"{source} was trained by {state.get('world_size', 1)} process(es), this run has "
                          f"{env.world_size}: the lr, the batches and the mixing draws would differ; resume with "
                          f"the same number of processes")
    if list(state["classes"]) != list(classes) or int(state["steps_per_epoch"]) != steps_per_epoch:
        raise ConfigError(f"{source}: the training data changed since the checkpoint ({len(state['classes'])} "
                          f"classes and {state['steps_per_epoch']} steps per epoch then, {len(classes)} and "
                          f"{steps_per_epoch} now)")
    point.check_within(total_steps)


def _resume_point(resume: ResumePoint | str | Path | None, cfg: FinetuneConfig) -> ResumePoint | None:
    """`finetune`'s `resume` as a checked `ResumePoint` (a path is loaded and checked here)."""
    if resume is None or isinstance(resume, ResumePoint):
        return resume
    return resume_finetune(str(resume), cfg.out, lambda saved, point: cfg)[1]


# ---------------------------------------------------------------------------------------------
# set-up

@dataclass
class _Data:
    """The encoder to fine-tune, the recipe's values, the labeled data and the run's length."""
    encoder_cfg: PretrainConfig
    weights: dict | None
    settings: dict
    train_set: object
    val_set: object
    classes: list[str]
    sampler: EpochSampler
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def mixup_on(self) -> bool:
        return self.settings["mixup"] > 0 or self.settings["cutmix"] > 0


def _prepare_data(cfg: FinetuneConfig, env: DistEnv) -> _Data:
    seed, batch, accum = cfg.seed, cfg.batch_size, cfg.accum_steps
    encoder_cfg, weights = encoder_source(cfg.checkpoint)
    settings = recipe_defaults(cfg, encoder_cfg)
    train_tf, val_tf = finetune_transforms(settings["img_size"], cfg.augment, settings["re_prob"], cfg.auto_augment,
                                           cfg.hflip, cfg.min_crop_scale)
    train_set, val_set, classes = train_val_datasets(cfg.data, cfg.val_data, train_tf, val_tf,
                                                     cfg.val_fraction, seed)
    # Unreadable images: a training one is replaced by the next readable one (full batches), a
    # validation one is left out (nothing counted twice); all are listed in skipped_images.txt.
    train_set, val_set = SkipUnreadable(train_set, replace=True), SkipUnreadable(val_set, replace=False)
    require_two_classes(cfg.data, classes)
    if len(val_set) == 0:
        raise UmmaeError(f"the validation set is empty: give --val-data, or more images per class in "
                         f"'{cfg.data}' for --val-fraction {cfg.val_fraction}")
    if (settings["mixup"] > 0 or settings["cutmix"] > 0) and batch % 2:
        raise ConfigError(f"mixup/cutmix need an even --batch-size, got {batch} (or pass --mixup 0 --cutmix 0)")
    # The data order and every augmentation are seeded by (seed, epoch, index), as in pre-training
    # (`ummae.data.sampling`): the stream is a pure function of the step, so a run resumes exactly.
    sampler = EpochSampler(len(train_set), seed, env.world_size, env.rank)
    steps_per_epoch = sampler.per_rank // batch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {len(train_set)} images, fewer than one optimizer step needs "
            f"(--batch-size {batch} x --accum-steps {accum} x {env.world_size} processes); lower them")
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.max_steps)
    return _Data(encoder_cfg, weights, settings, train_set, val_set, classes, sampler, steps_per_epoch,
                 total_steps, warmup_steps)


def _build_model(cfg: FinetuneConfig, data: _Data, device: torch.device) -> torch.nn.Module:
    """The classifier (identical head, and with --init-random encoder, on every rank), checked to run."""
    img_size = data.settings["img_size"]
    torch.manual_seed(cfg.seed)  # identical head (and, with --init-random, encoder) on every rank
    model, _ = build_classifier(data.encoder_cfg, None if cfg.init_random else data.weights, len(data.classes),
                                drop_path_rate=data.settings["drop_path"], img_size=img_size)
    model = model.to(device)
    _check_runs(model, img_size, device)
    data.weights = None  # the encoder's weights are in the model now
    return model


def _run_config(cfg: FinetuneConfig, data: _Data, env: DistEnv) -> dict:
    """config.yaml: the settings, the resolved recipe, the classes, the encoder's configuration."""
    effective_batch = cfg.batch_size * cfg.accum_steps * env.world_size
    resolved = {**data.settings, "lr": cfg.blr * effective_batch / 256, "effective_batch": effective_batch,
                "world_size": env.world_size}
    return {"finetune": dataclasses.asdict(cfg), "resolved": resolved, "classes": list(data.classes),
            "encoder": _encoder_config(data.encoder_cfg, data.settings["img_size"], data.settings["drop_path"])}


def _loaders(cfg: FinetuneConfig, data: _Data, env: DistEnv, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The training loader (seeded samples, this rank's share) and this rank's validation shard."""
    workers, batch = resolve_workers(cfg.num_workers, device.type), cfg.batch_size
    loader = DataLoader(SeededLabeledSamples(data.train_set, cfg.seed), batch_size=batch, sampler=data.sampler,
                        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, collate_fn=collate_skipping,
                        worker_init_fn=ignore_stop_signals_in_worker)
    val_shard = Subset(data.val_set, list(range(env.rank, len(data.val_set), env.world_size)))
    val_loader = DataLoader(val_shard, batch_size=batch, shuffle=False, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                            collate_fn=collate_skipping, worker_init_fn=ignore_stop_signals_in_worker)
    return loader, val_loader


@dataclass
class _Session:
    """What the loop works on: the classifier and its training state, the data, the run's output."""
    cfg: FinetuneConfig
    env: DistEnv
    device: torch.device
    run_dir: Path
    data: _Data
    run_config: dict
    model: torch.nn.Module
    train_model: torch.nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    guard: StepGuard
    mixup_fn: object | None
    rmix: RecursiveMix | None
    loader: DataLoader
    val_loader: DataLoader
    step: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"val_top1": -1.0, "val_top5": 0.0, "epoch": 0})
    scores: dict = dataclasses.field(default_factory=lambda: {"val_top1": float("nan"), "val_top5": float("nan")})
    last_loss: float = float("nan")
    skipped_files: set[str] = dataclasses.field(default_factory=set)
    train_step: TrainStep | None = None
    checkpoints: StepCheckpoints | None = None

    def weights_state(self, epoch: int) -> dict:
        """best.pt / last.pt: an encoder source and the classifier."""
        return {"model": self.model.state_dict(), "config": self.run_config["encoder"],
                "finetune": self.run_config["finetune"], "classes": list(self.data.classes), "epoch": epoch,
                "step": self.step, **self.scores}

    def checkpoint_state(self) -> dict:
        """The whole training state at `step` (collective: every rank's mixing history and loss window)."""
        ranks = gather_objects({"loss_window": self.guard.window_state(),
                                "rmix": self.rmix.state_dict() if self.rmix is not None else {}}, self.env)
        spe = self.data.steps_per_epoch
        return {**self.weights_state(math.ceil(self.step / spe)), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "steps_per_epoch": spe, "world_size": self.env.world_size,
                "resolved": self.run_config["resolved"], "best": self.best, "scores": self.scores,
                "last_loss": self.last_loss, "ranks": ranks,
                # No generator state: every draw is seeded from (seed, epoch, index) or (seed, rank, step).
                "rng": {"scheme": "counter-v1", "seed": self.cfg.seed}}

    def restore(self, point: ResumePoint) -> None:
        """Continue from `point`: weights, optimizer, grad scaler, step, best so far, loss window, mixing history."""
        state = point.state
        load_weights(self.model, state, point.source)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = point.step
        self.scheduler.step_update(self.step)  # the lr is a function of (step, this configuration)
        self.best, self.scores, self.last_loss = dict(state["best"]), dict(state["scores"]), state["last_loss"]
        mine = state["ranks"][self.env.rank]
        self.guard.restore_window(mine["loss_window"])  # the epoch's losses before the checkpoint
        if self.rmix is not None:
            self.rmix.load_state_dict(mine["rmix"])
        listing = self.run_dir / "skipped_images.txt"
        if listing.exists():
            self.skipped_files = set(listing.read_text(encoding="utf-8").splitlines()) - {""}


def _build_session(cfg: FinetuneConfig, env: DistEnv, device: torch.device, data: _Data, model: torch.nn.Module,
                   run_dir: Path, run_config: dict, point: ResumePoint | None) -> _Session:
    """AdamW with layer decay, the schedule, grad scaler, mixing, loaders; restored from `point` if given."""
    settings = data.settings
    # Fused AdamW: it can skip an update on the device (`found_inf`), see engine/guard.py.
    optimizer = build_finetune_optimizer(model, run_config["resolved"]["lr"], cfg.weight_decay,
                                         settings["layer_decay"], fused=True)
    scheduler = build_scheduler(optimizer, data.total_steps, data.warmup_steps, cfg.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    mixup_fn = None
    if data.mixup_on:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=settings["mixup"], cutmix_alpha=settings["cutmix"],
                         label_smoothing=cfg.smoothing, num_classes=len(data.classes))
    rmix = RecursiveMix(cfg.rm_alpha, cfg.rm_omega, torch.Generator()) if cfg.recursive_mix else None
    loader, val_loader = _loaders(cfg, data, env, device)
    s = _Session(cfg, env, device, run_dir, data, run_config, model, model, optimizer, scheduler, scaler,
                 StepGuard(device), mixup_fn, rmix, loader, val_loader)
    if point is not None:
        s.restore(point)
    if env.enabled:
        s.train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    s.checkpoints = StepCheckpoints(run_dir, cfg.keep_last, env, s.checkpoint_state,
                                    last_saved=s.step if point is not None else None)
    s.train_step = _train_step(s)
    return s


def _train_step(s: _Session) -> TrainStep:
    """The optimizer step of fine-tuning: labeled images -> mixing -> the soft-target loss."""
    cfg, device, num_classes = s.cfg, s.device, len(s.data.classes)

    def prepare(batch):
        images, labels, passed_over = batch
        s.skipped_files.update(passed_over)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if s.mixup_fn is not None:
            images, targets = s.mixup_fn(images, labels)
        else:
            targets = smooth_one_hot(labels, num_classes, cfg.smoothing)
        return (images, targets), images.shape[0]

    def loss(images, targets):
        if s.rmix is not None:
            logits, mixed, consistency = s.rmix.step(s.train_model, images, targets)
            return soft_cross_entropy(logits, mixed.targets) + consistency
        return soft_cross_entropy(s.train_model(images), targets)

    return TrainStep(s.train_model, [p for p in s.model.parameters() if p.requires_grad], s.optimizer,
                     s.scheduler, s.scaler, s.guard, prepare=prepare, loss=loss,
                     seed_step=lambda step: _seed_step(cfg.seed, s.env.rank, step, s.rmix), device=device,
                     precision=cfg.precision, accum=cfg.accum_steps, distributed=s.env.enabled)


# ---------------------------------------------------------------------------------------------
# the run

def finetune(cfg: FinetuneConfig, progress: bool = True, resume: ResumePoint | str | Path | None = None,
             log_lines: bool = False, fit_cpus: bool = False) -> FinetuneResult:
    """Fine-tune as configured (continuing from `resume` if given: a `ResumePoint` of
    `resume_finetune`, or a periodic checkpoint's path, then loaded and checked here).

    Under `torchrun` every process calls this; rank 0 writes and prints. `progress` shows a tqdm
    bar; `log_lines` prints a plain line every `log_every` steps instead. SIGTERM/SIGINT end the
    run at the next step boundary with a checkpoint and `RunInterrupted`. `fit_cpus` (the CLI):
    torch's intra-op threads are the CPUs the data workers leave (engine.cpus), for the run.
    """
    _validate(cfg)
    env, device = init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_on_cpu(device))  # bit-identical fresh CPU runs (engine.determinism)
            if fit_cpus:
                stack.enter_context(fit_threads(resolve_workers(cfg.num_workers, device.type)))
            return _finetune(cfg, env, device, progress and env.is_main, log_lines and env.is_main, resume, stack)
    finally:
        shutdown_distributed()


def _finetune(cfg: FinetuneConfig, env: DistEnv, device: torch.device, progress: bool, log_lines: bool,
              resume: ResumePoint | str | Path | None, stack: contextlib.ExitStack) -> FinetuneResult:
    # Everything that can be wrong with the input is checked before anything is written.
    data = _prepare_data(cfg, env)
    point = _resume_point(resume, cfg)
    if point is not None:
        _check_resume_state(point, env, list(data.classes), data.steps_per_epoch, data.total_steps)
    model = _build_model(cfg, data, device)

    run_dir = shared_run_dir(cfg.out, f"finetune-{Path(cfg.checkpoint).stem}", env)
    if env.is_main:
        take_run_dir(stack, run_dir, resuming=point is not None)
    run_config = _run_config(cfg, data, env)
    if env.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    s = _build_session(cfg, env, device, data, model, run_dir, run_config, point)
    if env.is_main:
        print(f"ummae finetune: run directory {run_dir}"
              + (f" (resuming at step {s.step} of {data.total_steps})" if point is not None else ""), flush=True)
        plan = run_plan(cfg.batch_size, cfg.accum_steps, env.world_size, run_config["resolved"]["lr"],
                        resolve_workers(cfg.num_workers, device.type))
        print(f"ummae finetune: {plan}", flush=True)
        warmup = warmup_warning(cfg.warmup_epochs, data.steps_per_epoch, data.total_steps)
        if warmup:
            print(warmup, file=sys.stderr, flush=True)

    log = _Log(s, progress, log_lines)
    points = CheckPoints(env, device, s.guard, stack.enter_context(StopSignals()), s.checkpoints,
                         data.total_steps, cfg.log_every, cfg.save_every,
                         lambda report, last_saved: _raise_if_nonfinite(report, run_dir, data.steps_per_epoch,
                                                                         last_saved),
                         log.write)
    try:
        while s.step < data.total_steps:
            _train_one_epoch(s, log, points)
    finally:
        log.close()
        for each in (s.loader, s.val_loader):  # persistent workers: stop them now (engine.loop)
            shutdown_workers(each)
    return _result(s, log, point)


def _train_one_epoch(s: _Session, log: "_Log", points: CheckPoints) -> None:
    """Optimizer steps from `s.step` to the epoch's end (or the run's), then the epoch's end."""
    spe = s.data.steps_per_epoch
    epoch = s.step // spe + 1
    s.data.sampler.set_epoch(epoch - 1, start=(s.step % spe) * s.cfg.accum_steps * s.cfg.batch_size)
    s.train_model.train()
    batches = iter(s.loader)
    while True:
        images = s.train_step(batches, s.step)
        if images is None:
            break
        s.step += 1
        log.stepped(images)
        if s.step >= s.data.total_steps or s.step % spe == 0:
            break  # the epoch's end: evaluated and saved below (a partial accumulation group is dropped)
        points.visit(s.step, reset_window=False)  # inside an epoch: a log line, a checkpoint, a signal
    s.optimizer.zero_grad(set_to_none=True)
    _end_epoch(s, log, points, epoch)


def _end_epoch(s: _Session, log: "_Log", points: CheckPoints, epoch: int) -> None:
    """The epoch's end: the loss, validation, best/last weights, a checkpoint of the whole state."""
    env = s.env
    report = s.guard.collect(env, reset_window=True)
    _raise_if_nonfinite(report, s.run_dir, s.data.steps_per_epoch, s.checkpoints.last_saved)
    s.last_loss = report.mean_loss
    s.scores = evaluate_classifier(s.model, s.val_loader, env, s.device, s.cfg.precision, s.skipped_files,
                                   progress=log.validation_mode, desc=f"validation {epoch}")
    s.skipped_files = gather_strings(s.skipped_files, env)  # every rank's, kept by all
    record = {"epoch": epoch, "step": s.step, "loss": s.last_loss,
              "lr": max(group["lr"] for group in s.optimizer.param_groups), **s.scores}
    improved = s.scores["val_top1"] > s.best["val_top1"]
    if improved:
        s.best = {"val_top1": s.scores["val_top1"], "val_top5": s.scores["val_top5"], "epoch": epoch}
    if env.is_main:
        log.metrics.log(record)
        if s.skipped_files:  # kept on disk as we go, so a killed run keeps its list
            write_skipped(s.run_dir, s.skipped_files)
        state = s.weights_state(epoch)
        save_checkpoint(s.run_dir / "last.pt", state)
        if improved:
            save_checkpoint(s.run_dir / "best.pt", state)
    s.checkpoints.save(s.step)  # after the evaluation: a resumed run starts the next epoch
    if env.is_main:
        best, scores = s.best, s.scores
        log.epoch_line(f"epoch {epoch}/{math.ceil(s.data.total_steps / s.data.steps_per_epoch)}  step {s.step}  "
                       f"loss {s.last_loss:.4f}  lr {record['lr']:.3g}  val top-1 {scores['val_top1']:.2f}  "
                       f"top-5 {scores['val_top5']:.2f}  (best top-1 {best['val_top1']:.2f}, epoch {best['epoch']})  "
                       f"ETA {log.eta(s.step)}")
        chance = chance_warning(s.last_loss, len(s.data.classes), epoch)
        if chance:
            print(chance, file=sys.stderr, flush=True)
    points.stop_if_signalled(s.step)


class _Log:
    """The run's output as it goes: the tqdm bar, metrics.jsonl and TensorBoard (rank 0), plain lines."""

    def __init__(self, s: _Session, progress: bool, log_lines: bool):
        self.s, self.progress, self.log_lines = s, progress, log_lines
        self.metrics = MetricsWriter(s.run_dir) if s.env.is_main else None
        if self.metrics is not None:
            truncate_metrics(self.metrics.path, s.step)  # lines a killed session logged after its checkpoint
        self.bar = tqdm(total=s.data.total_steps, initial=s.step, desc="finetune", unit="step", disable=not progress,
                        dynamic_ncols=True, mininterval=0.5)
        self.start_step, self.start = s.step, time.perf_counter()
        self.window_images, self.window_start = 0, self.start

    def stepped(self, images: int) -> None:
        self.window_images += images
        self.bar.update(1)

    def write(self, step: int, report: GuardReport, now: float) -> None:
        """A plain log line inside an epoch (no terminal): the epoch's mean loss so far, lr, images/s."""
        if not self.log_lines:
            return
        s = self.s
        images_seen = all_reduce_sum(self.window_images, s.env, s.device)
        record = {"step": step, "epoch": round(step / s.data.steps_per_epoch, 4),
                  "loss": report.mean_loss,  # the epoch's mean so far
                  "lr": max(group["lr"] for group in s.optimizer.param_groups),
                  "images_per_sec": images_seen / max(now - self.window_start, 1e-9)}
        print(log_line(record, s.data.total_steps, self.start_step, now - self.start), flush=True)
        self.window_images, self.window_start = 0, now

    @property
    def validation_mode(self) -> str:
        """engine.progress's mode of the validation pass: the bar's rule, plain lines on stdout."""
        return "bar" if self.progress else "lines" if self.log_lines else "off"

    def eta(self, step: int) -> str:
        """The time left at `step`, from this session's pace so far (validation included)."""
        done = step - self.start_step
        left = (time.perf_counter() - self.start) / done * (self.s.data.total_steps - step) if done else float("nan")
        return eta_text(left)

    def epoch_line(self, line: str) -> None:
        if self.progress:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def _result(s: _Session, log: _Log, point: ResumePoint | None) -> FinetuneResult:
    run_dir, resolved = s.run_dir, s.run_config["resolved"]
    return FinetuneResult(
        run_dir=run_dir, config=run_dir / "config.yaml", metrics=run_dir / "metrics.jsonl",
        best=run_dir / "best.pt", last=run_dir / "last.pt", classes=list(s.data.classes),
        train_images=len(s.data.train_set), val_images=len(s.data.val_set), best_top1=s.best["val_top1"],
        best_top5=s.best["val_top5"], best_epoch=s.best["epoch"], final_top1=s.scores["val_top1"],
        final_top5=s.scores["val_top5"], final_loss=s.last_loss, steps=s.step,
        epochs=math.ceil(s.step / s.data.steps_per_epoch), seconds=time.perf_counter() - log.start,
        device=str(s.device), num_params=sum(p.numel() for p in s.model.parameters()), lr=resolved["lr"],
        effective_batch=resolved["effective_batch"], settings=s.data.settings, world_size=s.env.world_size,
        skipped_images=sorted(s.skipped_files), resumed_from=point.path if point is not None else None,
        start_step=log.start_step)


def _seed_step(seed: int, rank: int, step: int, rmix: RecursiveMix | None) -> None:
    """Every draw of the main process, seeded by (seed, rank, step) at the start of each optimizer
    step, so a resumed run draws what the uninterrupted one would have: drop path (torch's global
    generator), timm's Mixup/CutMix (NumPy's global generator), RecursiveMix's boxes."""
    torch.manual_seed(seed_for(seed, "step", rank, step))
    np.random.seed(seed_for(seed, "mix", rank, step) % 2**32)
    if rmix is not None:
        rmix.generator.manual_seed(seed_for(seed, "rmix", rank, step))


def _raise_if_nonfinite(report: GuardReport, run_dir: Path, steps_per_epoch: int, last_saved: int | None) -> None:
    """Stop (one line) on what the guard saw since the last check point: the update of that step
    was skipped on the device (or, for weights, the run stops before anything is written)."""
    if not report.bad_step:
        return
    s = report.bad_step
    what = {LOSS: f"loss became {report.bad_loss}",
            GRADIENTS: f"gradients became non-finite (loss {report.bad_loss:.4g})",
            WEIGHTS: f"the update made the weights non-finite (loss {report.bad_loss:.4g})"}[report.bad_kind]
    kept = "no checkpoint was written" if last_saved is None else f"the last checkpoint is step {last_saved}"
    raise NonFiniteLossError(f"{what} at step {s} (epoch {(s - 1) // steps_per_epoch + 1}); training stopped, "
                             f"nothing non-finite was written to '{run_dir}' ({kept}); try a lower --blr")
