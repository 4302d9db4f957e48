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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import PretrainConfig, config_to_dict
from ..data.sampling import EpochSampler, SeededLabeledSamples, seed_for
from ..errors import ConfigError, UmmaeError
from ..models.specs import backbone_spec
from .checkpoint import (load_checkpoint, prune_step_checkpoints, save_checkpoint,
                         step_checkpoint_path)
from .determinism import deterministic_on_cpu
from .distributed import (DistEnv, all_reduce_sum, gather_objects, gather_strings, init_distributed, shared_run_dir,
                          shutdown_distributed)
from .guard import GRADIENTS, LOSS, WEIGHTS, GuardReport, StepGuard, state_is_finite
from .metrics import MetricsWriter
from .optim import build_scheduler, schedule_lengths
from .pretrain import (NonFiniteLossError, _agreed_signal, _load_weights, _log_line, _shutdown_workers, _stop_on_signal,
                       _truncate_metrics, training_autocast)
from .recursive_mix import RecursiveMix, smooth_one_hot, soft_cross_entropy
from .rundir import take_run_dir
from .signals import StopSignals, ignore_stop_signals_in_worker

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "recipe_defaults", "build_finetune_optimizer",
           "finetune_transforms", "evaluate_classifier", "FINETUNE_RESUMABLE_KEYS", "check_finetune_resumable",
           "absolute_finetune_paths"]

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
    num_workers: int = 4
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
    from ..config import refuse_changed_keys

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
    check(cfg.num_workers >= 0, f"--workers must be >= 0, got {cfg.num_workers}")
    check(cfg.save_every >= 0, f"--save-every must be >= 0, got {cfg.save_every}")
    check(cfg.keep_last >= 0, f"--keep-last must be >= 0, got {cfg.keep_last}")
    check(cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}")
    check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
          f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    check(cfg.precision in ("auto", "fp32", "bf16", "fp16"),
          f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    check(cfg.precision != "fp16" or cfg.device.startswith("cuda"),
          "--precision fp16 needs --device cuda (use bf16 or fp32 on a CPU)")


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

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

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

def finetune(cfg: FinetuneConfig, progress: bool = True, resume: str | Path | None = None,
             log_lines: bool = False) -> FinetuneResult:
    """Fine-tune as configured (continuing from the periodic checkpoint `resume` if given).

    Under `torchrun` every process calls this; rank 0 writes and prints. `progress` shows a tqdm
    bar; `log_lines` prints a plain line every `log_every` steps instead. SIGTERM/SIGINT end the
    run at the next step boundary with a checkpoint and `RunInterrupted`.
    """
    _validate(cfg)
    env, device = init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_on_cpu(device))  # bit-identical fresh CPU runs (engine.determinism)
            return _finetune(cfg, env, device, progress and env.is_main, log_lines and env.is_main, resume, stack)
    finally:
        shutdown_distributed()


def _check_resume_state(state: dict, source: str, env: DistEnv, classes: list[str], steps_per_epoch: int,
                        total_steps: int) -> None:
    """Refuse (one line) a checkpoint this run cannot continue exactly."""
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
    if int(state["step"]) > total_steps:
        raise ConfigError(f"{source} is at step {state['step']}, beyond this run's {total_steps} steps; raise "
                          f"--max-steps/--epochs")


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


def _finetune(cfg: FinetuneConfig, env: DistEnv, device: torch.device, progress: bool, log_lines: bool,
              resume: str | Path | None, stack: contextlib.ExitStack) -> FinetuneResult:
    from ..data.labeled import (SkipUnreadable, collate_skipping, require_two_classes, train_val_datasets,
                               write_skipped)
    from ..models.classifier import build_classifier, encoder_source

    seed, batch, accum = cfg.seed, cfg.batch_size, cfg.accum_steps
    # Everything that can be wrong with the input is checked before anything is written.
    encoder_cfg, weights = encoder_source(cfg.checkpoint)
    settings = recipe_defaults(cfg, encoder_cfg)
    img_size = settings["img_size"]
    train_tf, val_tf = finetune_transforms(img_size, cfg.augment, settings["re_prob"], cfg.auto_augment, cfg.hflip,
                                           cfg.min_crop_scale)
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
    # The data order and every augmentation are seeded by (seed, epoch, index), as in pre-training
    # (`ummae.data.sampling`): the stream is a pure function of the step, so a run resumes exactly.
    sampler = EpochSampler(len(train_set), seed, env.world_size, env.rank)
    steps_per_epoch = sampler.per_rank // batch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {len(train_set)} images, fewer than one optimizer step needs "
            f"(--batch-size {batch} x --accum-steps {accum} x {env.world_size} processes); lower them")
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.max_steps)
    resume_state = load_checkpoint(resume) if resume else None
    if resume_state is not None:
        _check_resume_state(resume_state, f"--resume '{resume}'", env, list(classes), steps_per_epoch, total_steps)

    torch.manual_seed(seed)  # identical head (and, with --init-random, encoder) on every rank
    model, _ = build_classifier(encoder_cfg, None if cfg.init_random else weights, num_classes,
                                drop_path_rate=settings["drop_path"], img_size=img_size)
    model = model.to(device)
    _check_runs(model, img_size, device)
    del weights

    run_dir = shared_run_dir(cfg.out, f"finetune-{Path(cfg.checkpoint).stem}", env)
    if env.is_main:
        take_run_dir(stack, run_dir, resuming=resume_state is not None)
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

    # Fused AdamW: it can skip an update on the device (`found_inf`), see engine/guard.py.
    optimizer = build_finetune_optimizer(model, lr, cfg.weight_decay, settings["layer_decay"], fused=True)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]

    mixup_fn = None
    if mixup_on:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=settings["mixup"], cutmix_alpha=settings["cutmix"],
                         label_smoothing=cfg.smoothing, num_classes=num_classes)
    rmix = RecursiveMix(cfg.rm_alpha, cfg.rm_omega, torch.Generator()) if cfg.recursive_mix else None

    workers = cfg.num_workers
    loader = DataLoader(SeededLabeledSamples(train_set, seed), batch_size=batch, sampler=sampler, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        collate_fn=collate_skipping, worker_init_fn=ignore_stop_signals_in_worker)
    val_shard = Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
    val_loader = DataLoader(val_shard, batch_size=batch, shuffle=False, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                            collate_fn=collate_skipping, worker_init_fn=ignore_stop_signals_in_worker)
    skipped_files: set[str] = set()
    guard = StepGuard(device)

    best = {"val_top1": -1.0, "val_top5": 0.0, "epoch": 0}
    scores = {"val_top1": float("nan"), "val_top5": float("nan")}
    step, last_loss = 0, float("nan")
    if resume_state is not None:
        _load_weights(model, resume_state, f"--resume '{resume}'")
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        step = int(resume_state["step"])
        scheduler.step_update(step)  # the lr is a function of (step, this configuration)
        best, scores, last_loss = dict(resume_state["best"]), dict(resume_state["scores"]), resume_state["last_loss"]
        mine = resume_state["ranks"][env.rank]
        guard.restore_window(mine["loss_window"])  # the epoch's losses before the checkpoint
        if rmix is not None:
            rmix.load_state_dict(mine["rmix"])
        listing = run_dir / "skipped_images.txt"
        if listing.exists():
            skipped_files = set(listing.read_text(encoding="utf-8").splitlines()) - {""}
    if env.is_main:
        print(f"ummae finetune: run directory {run_dir}"
              + (f" (resuming at step {step} of {total_steps})" if resume_state is not None else ""), flush=True)

    train_model = model
    if env.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    num_params = sum(p.numel() for p in model.parameters())

    def weights_state(epoch: int) -> dict:  # best.pt / last.pt: an encoder source and the classifier
        return {"model": model.state_dict(), "config": encoder_dict, "finetune": run_config["finetune"],
                "classes": list(classes), "epoch": epoch, "step": step, **scores}

    last_saved = step if resume_state is not None else None

    def save_step_checkpoint() -> Path | None:
        """The whole training state at `step` (collective: every rank's mixing history and loss window)."""
        nonlocal last_saved
        ranks = gather_objects({"loss_window": guard.window_state(),
                                "rmix": rmix.state_dict() if rmix is not None else {}}, env)
        if not env.is_main:
            last_saved = step
            return None
        state = {**weights_state(math.ceil(step / steps_per_epoch)), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "steps_per_epoch": steps_per_epoch, "world_size": env.world_size,
                 "resolved": run_config["resolved"], "best": best, "scores": scores, "last_loss": last_loss,
                 "ranks": ranks,
                 # No generator state: every draw is seeded from (seed, epoch, index) or (seed, rank, step).
                 "rng": {"scheme": "counter-v1", "seed": seed}}
        if not state_is_finite(state["model"], state["optimizer"]):  # belt and braces; see guard.py
            raise NonFiniteLossError(f"the state at step {step} is not finite; nothing was written "
                                     f"(last checkpoint: step {last_saved})")
        path = save_checkpoint(step_checkpoint_path(run_dir, step), state)
        prune_step_checkpoints(run_dir, cfg.keep_last)
        last_saved = step
        return path

    metrics = MetricsWriter(run_dir) if env.is_main else None
    if metrics is not None:
        _truncate_metrics(metrics.path, step)  # lines a killed session logged after its checkpoint
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    stop = stack.enter_context(StopSignals())
    start_step, start = step, time.perf_counter()
    window_images, window_start = 0, start
    epoch = math.ceil(step / steps_per_epoch)
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch + 1
            sampler.set_epoch(epoch - 1, start=(step % steps_per_epoch) * accum * batch)
            train_model.train()
            micro = 0
            for images, labels, passed_over in loader:
                if micro == 0:
                    _seed_step(seed, env.rank, step, rmix)
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
                micro += 1
                window_images += images.shape[0]
                # A non-finite loss turns the gradients to NaN (x NaN instead of x 1.0), on every rank.
                factor = guard.loss_factor(loss)
                with contextlib.nullcontext() if micro == accum or not env.enabled else train_model.no_sync():
                    scaler.scale(loss * factor / accum).backward()
                if micro < accum:
                    continue

                # The optimizer step, skipped on the device when anything is non-finite: no host sync.
                guard.step(optimizer, scaler, params, step + 1)
                micro = 0
                step += 1
                scheduler.step_update(step)
                bar.update(1)
                if step >= total_steps or step % steps_per_epoch == 0:
                    break  # the epoch's end: evaluated and saved below (a partial accumulation group is dropped)

                # Check points inside an epoch: a log line, a periodic checkpoint, a signal.
                log_due = step % cfg.log_every == 0
                save_due = bool(cfg.save_every) and step % cfg.save_every == 0
                signal_due = stop.received is not None and not env.enabled  # DDP: at the next check point
                if log_due or save_due or signal_due:
                    report = guard.collect(env, reset_window=False)  # the one host sync
                    _raise_if_nonfinite(report, run_dir, steps_per_epoch, last_saved)
                    if log_due and log_lines:
                        now = time.perf_counter()
                        images_seen = all_reduce_sum(window_images, env, device)
                        record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                                  "loss": report.mean_loss,  # the epoch's mean so far
                                  "lr": max(group["lr"] for group in optimizer.param_groups),
                                  "images_per_sec": images_seen / max(now - window_start, 1e-9)}
                        print(_log_line(record, total_steps, start_step, now - start), flush=True)
                        window_images, window_start = 0, now
                    if save_due:
                        save_step_checkpoint()
                    signum = stop.received if not env.enabled else _agreed_signal(stop.received, env, device)
                    if signum is not None:
                        _stop_on_signal(signum, step, save_step_checkpoint if last_saved != step else None,
                                        run_dir, env)
            optimizer.zero_grad(set_to_none=True)

            # The epoch's end: the loss, validation, best/last weights, a checkpoint of the whole state.
            report = guard.collect(env, reset_window=True)
            _raise_if_nonfinite(report, run_dir, steps_per_epoch, last_saved)
            last_loss = report.mean_loss
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
                state = weights_state(epoch)
                save_checkpoint(last_path, state)
                if improved:
                    save_checkpoint(best_path, state)
            save_step_checkpoint()  # after the evaluation: a resumed run starts the next epoch
            if env.is_main:
                line = (f"epoch {epoch}/{num_epochs}  step {step}  loss {last_loss:.4f}  lr {record['lr']:.3g}  "
                        f"val top-1 {scores['val_top1']:.2f}  top-5 {scores['val_top5']:.2f}  "
                        f"(best top-1 {best['val_top1']:.2f}, epoch {best['epoch']})")
                if progress:
                    bar.write(line)
                else:
                    print(line, flush=True)
            signum = stop.received if not env.enabled else _agreed_signal(stop.received, env, device)
            if signum is not None and step < total_steps:
                _stop_on_signal(signum, step, None, run_dir, env)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        for each in (loader, val_loader):  # persistent workers: stop them now (see engine.pretrain)
            _shutdown_workers(each)
    seconds = time.perf_counter() - start
    return FinetuneResult(
        run_dir=run_dir, config=config_path, metrics=run_dir / "metrics.jsonl", best=best_path, last=last_path,
        classes=list(classes), train_images=len(train_set), val_images=len(val_set),
        best_top1=best["val_top1"], best_top5=best["val_top5"], best_epoch=best["epoch"],
        final_top1=scores["val_top1"], final_top5=scores["val_top5"], final_loss=last_loss, steps=step,
        epochs=epoch, seconds=seconds, device=str(device), num_params=num_params, lr=lr,
        effective_batch=effective_batch, settings=settings, world_size=env.world_size,
        skipped_images=sorted(skipped_files), resumed_from=Path(resume) if resume else None, start_step=start_step)
