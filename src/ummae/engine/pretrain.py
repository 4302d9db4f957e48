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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import PretrainConfig, check_resumable, config_to_dict
from ..data import build_pretrain_dataset, collate_encoded, to_device_batch, to_model_input
from ..data.sampling import EpochSampler, SeededSamples, draw_masks, seed_for
from ..errors import ConfigError, UmmaeError
from ..models import build_pretrain_model
from ..models.specs import backbone_spec
from ..visualize import picture_rows, save_loss_curve, save_reconstruction_grid, spread_indices
from .checkpoint import link_or_copy, save_checkpoint
from .cpus import fit_threads, resolve_workers, run_plan
from .determinism import deterministic_on_cpu
from .distributed import (DistEnv, all_reduce_sum, any_rank, gather_strings, init_distributed, resolve_device,
                          shared_run_dir, shutdown_distributed)
from .guard import GRADIENTS, LOSS, WEIGHTS, GuardReport, NonFiniteLossError, StepGuard
from .loop import CheckPoints, StepCheckpoints, TrainStep, shutdown_workers, training_autocast
from .metrics import MetricsWriter, log_line, truncate_metrics
from .optim import build_optimizer, build_scheduler, schedule_lengths
from .resume import ResumePoint, find_resume, load_weights
from .rundir import take_run_dir
from .sharded_checkpoint import load_sharded, save_sharded
from .sharding import enable_grad_checkpointing, full_state_dicts, load_full_optimizer_state, wrap_for_training
from .signals import RunInterrupted, StopSignals, ignore_stop_signals_in_worker

__all__ = ["pretrain", "resume_pretrain", "RunResult", "resolve_device", "training_autocast", "NonFiniteLossError",
           "RunInterrupted"]

# Sections a resumed checkpoint must agree with: they decide the parameters and the data stream.
_ARCHITECTURE_KEYS = ("method", "model", "masking", "emae")


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
    start_step: int = 0  # the step this session started at (> 0 when resumed)
    cpu_decoded: int = 0  # decode=gpu: images of this session decoded by the workers (not RGB JPEG)


# ---------------------------------------------------------------------------------------------
# resume

def resume_pretrain(resume: str | None, out: str | None,
                    configure: Callable[[dict | None, ResumePoint | None], PretrainConfig]
                    ) -> tuple[PretrainConfig, ResumePoint | None]:
    """The configuration and the checkpoint `--resume` continues (`engine.resume`), found and
    loaded once and checked: `configure(saved_config, point)` builds the run's configuration (over
    the checkpoint's, None for a fresh start), which may differ from the checkpoint's only in
    `RESUMABLE_KEYS` and must have its architecture. The step is checked by `pretrain`."""
    point = find_resume(resume, out)
    saved = None
    if point is not None:
        saved = point.state.get("config")
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume: '{point.path}' holds no configuration to continue with")
    cfg = configure(saved, point)
    if point is not None:
        check_resumable(saved, cfg, point.source)
        _check_same_architecture(point.state, cfg, point.source)
    return cfg, point


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


def _resume_point(resume: ResumePoint | str | Path | None, cfg: PretrainConfig) -> ResumePoint | None:
    """`pretrain`'s `resume` as a checked `ResumePoint` (a path is loaded and checked here)."""
    if resume is None or isinstance(resume, ResumePoint):
        return resume
    return resume_pretrain(str(resume), cfg.train.out, lambda saved, point: cfg)[1]


# ---------------------------------------------------------------------------------------------
# set-up

@dataclass
class _Data:
    """The run's data and its length in optimizer steps."""
    dataset: object
    sampler: EpochSampler
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def _prepare_data(cfg: PretrainConfig, env: DistEnv) -> _Data:
    batch, accum = cfg.train.batch_size, cfg.train.accum_steps
    dataset = build_pretrain_dataset(cfg.data.path, cfg.data.img_size, scale=(cfg.data.min_crop_scale, 1.0),
                                     demo_length=cfg.data.demo_length, decode=cfg.data.decode)
    sampler = EpochSampler(len(dataset), cfg.train.seed, env.world_size, env.rank)
    steps_per_epoch = sampler.per_rank // batch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the data has {len(dataset)} images, fewer than one optimizer step needs "
            f"(--batch-size {batch} x --accum-steps {accum} x {env.world_size} processes); lower them")
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, cfg.train.epochs,
                                                 cfg.optim.warmup_epochs, cfg.train.max_steps)
    return _Data(dataset, sampler, steps_per_epoch, total_steps, warmup_steps)


def _read_init_weights(cfg: PretrainConfig, resume) -> dict | None:
    """The `--init-weights` file's state (None without it). A resumed run takes its weights from
    the checkpoint; init_weights is then provenance only."""
    init_state = None
    if cfg.train.init_weights and resume is None:
        if not Path(cfg.train.init_weights).is_file():
            raise ConfigError(f"--init-weights: '{cfg.train.init_weights}' does not exist")
        # an ummae checkpoint, or what else the backbone reads (the paper's released weights,
        # converted for this run; timm's / Hiera's own backbone weights)
        try:
            init_state = backbone_spec(cfg.model.arch).read_init_weights(cfg.train.init_weights, cfg)
        except UmmaeError as e:  # say which option the file came from
            text = str(e)
            raise type(e)(text if text.startswith("--init-weights") else f"--init-weights: {text}") from None
    return init_state


def _load_init_weights(model: torch.nn.Module, init_state: dict | None, cfg: PretrainConfig) -> None:
    if init_state is not None and "model" not in init_state:  # a backbone's own weights: encoder only
        backbone_spec(cfg.model.arch).load_backbone_weights(model, init_state,
                                                            f"--init-weights '{cfg.train.init_weights}'")
    elif init_state is not None:
        load_weights(model, init_state, f"--init-weights '{cfg.train.init_weights}'")


def _make_loader(cfg: PretrainConfig, dataset, sampler: EpochSampler, masking,
                 device: torch.device) -> DataLoader:
    workers = resolve_workers(cfg.data.num_workers, device.type)
    return DataLoader(
        SeededSamples(dataset, cfg.train.seed, masking),
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,  # every step sees full batches, so the lr scaling holds
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals_in_worker,  # the main process stops them at a step boundary
        # decode=gpu: the files' bytes and crop boxes, batched into one buffer (ummae.data.gpu_decode)
        collate_fn=collate_encoded if cfg.data.decode == "gpu" else None,
    )


@dataclass
class _Session:
    """What the loop works on: the model and its training state, the data, the run's output."""
    cfg: PretrainConfig
    env: DistEnv
    device: torch.device
    run_dir: Path
    data: _Data
    model: torch.nn.Module
    train_model: torch.nn.Module  # compiled and/or DDP-wrapped
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    guard: StepGuard
    step: int
    train_step: TrainStep | None = None
    checkpoints: StepCheckpoints | None = None
    skipped_files: set[str] = field(default_factory=set)
    cpu_decoded: int = 0  # decode=gpu: images the workers decoded (not RGB JPEG), this session

    @property
    def sharded(self) -> bool:
        return self.cfg.train.strategy == "fsdp"

    def checkpoint_state(self) -> dict:
        """The state to resume from (every rank calls it; FSDP gathers the full state to rank 0)."""
        if self.sharded:
            weights, optim = full_state_dicts(self.model, self.optimizer)
        else:
            weights, optim = self.model.state_dict(), self.optimizer.state_dict()
        return {"model": weights, "optimizer": optim, **self.checkpoint_rest()}

    def checkpoint_rest(self) -> dict:
        """All of a checkpoint but the weights and the optimizer (a sharded checkpoint's state.pt)."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.step / self.data.steps_per_epoch, "steps_per_epoch": self.data.steps_per_epoch,
                "world_size": self.env.world_size, "config": config_to_dict(self.cfg),
                # No generator state: every draw is seeded from (seed, epoch, index) or (seed, rank, step).
                "rng": {"scheme": "counter-v1", "seed": self.cfg.train.seed}}


def _build_session(cfg: PretrainConfig, env: DistEnv, device: torch.device, data: _Data, run_dir: Path,
                   point: ResumePoint | None, init_state: dict | None) -> _Session:
    """Model (identical initial weights on every rank), loader, AdamW, schedule, grad scaler, the
    step: fresh, from `--init-weights`, or restored from the resume point."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg).to(device)
    loader = _make_loader(cfg, data.dataset, data.sampler, model.masking, device)
    _load_init_weights(model, init_state, cfg)
    if point is not None and not point.sharded:
        load_weights(model, point.state, point.source)  # whole weights, before FSDP shards them
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.model.arch)
    fsdp = cfg.train.strategy == "fsdp"
    if fsdp:  # in place, before the optimizer: it must hold the sharded parameters
        wrap_for_training(model, "fsdp", env, device, bf16=_bf16(cfg, device),
                          reshard_after_forward=cfg.train.reshard_after_forward)
    # Fused AdamW: it can skip an update on the device (`found_inf`), see engine/guard.py.
    optimizer = build_optimizer(model, cfg.peak_lr(env.world_size), cfg.optim.weight_decay, cfg.optim.betas,
                                fused=True)
    # The lr is a pure function of (step, this configuration), so the schedule is rebuilt rather
    # than loaded: a resumed run whose --max-steps/--epochs were raised follows the new schedule.
    scheduler = build_scheduler(optimizer, data.total_steps, data.warmup_steps, cfg.optim.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    step = 0
    if point is not None:
        if point.sharded:  # either strategy, any number of processes
            load_sharded(point.path, model, optimizer)
        elif fsdp:
            load_full_optimizer_state(model, optimizer, point.state["optimizer"])
        else:
            optimizer.load_state_dict(point.state["optimizer"])
        if point.state.get("scaler"):
            scaler.load_state_dict(point.state["scaler"])
        step = point.step
        scheduler.step_update(step)
    train_model = torch.compile(model) if cfg.train.compile else model
    if not fsdp:
        train_model = wrap_for_training(train_model, "ddp", env, device, bf16=False)
    s = _Session(cfg, env, device, run_dir, data, model, train_model, loader, optimizer, scheduler, scaler,
                 StepGuard(device), step)
    sharded_writer = None
    if fsdp:  # periodic checkpoints: each rank writes its shards, no rank gathers the whole state
        sharded_writer = lambda path: save_sharded(path, model, optimizer, s.checkpoint_rest(), env, device)  # noqa: E731
    s.checkpoints = StepCheckpoints(run_dir, cfg.train.keep_last, env, s.checkpoint_state,
                                    last_saved=step if point is not None else None, write_sharded=sharded_writer)
    s.train_step = _train_step(s)
    return s


def _bf16(cfg: PretrainConfig, device: torch.device) -> bool:
    """The training autocast is bf16 (`training_autocast`): FSDP then computes in bf16 too."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def _train_step(s: _Session) -> TrainStep:
    """The optimizer step of pre-training: a DataLoader batch -> images and masks -> the model's loss."""
    cfg, device, model = s.cfg, s.device, s.model

    def prepare(batch_data: dict):
        s.skipped_files.update(p for x in batch_data["skipped"] if x for p in x.split("\n"))
        # uint8 on the device (decode=gpu: decoded there), then normalised there
        imgs, failed = to_device_batch(batch_data["image"], cfg.data.img_size, device)
        s.skipped_files.update(str(s.data.dataset.paths[int(batch_data["index"][b])]) for b in failed)
        s.cpu_decoded += getattr(batch_data["image"], "cpu_decoded", 0)
        imgs = to_model_input(imgs, device)
        masks = model.masking.sample_type.from_batch(batch_data)  # as the workers drew them
        masks = masks.to(device, non_blocking=True)
        return (imgs, masks), imgs.shape[0]

    def loss(imgs, masks):
        return s.train_model(imgs, masks)[0]

    def seed_step(step: int) -> None:
        torch.manual_seed(seed_for(cfg.train.seed, "step", s.env.rank, step))  # drop path etc.

    return TrainStep(s.train_model, [p for p in model.parameters() if p.requires_grad], s.optimizer,
                     s.scheduler, s.scaler, s.guard, prepare=prepare, loss=loss, seed_step=seed_step,
                     device=device, precision=cfg.train.precision, accum=cfg.train.accum_steps,
                     clip_grad=cfg.optim.clip_grad, distributed=s.env.enabled or s.sharded)


# ---------------------------------------------------------------------------------------------
# the run

def pretrain(cfg: PretrainConfig, progress: bool = True, resume: ResumePoint | str | Path | None = None,
             log_lines: bool = False, fit_cpus: bool = False) -> RunResult:
    """Run pre-training as configured (continuing from `resume` if given: a `ResumePoint` of
    `resume_pretrain`, or a checkpoint path, then loaded and checked here).

    Under `torchrun` every process calls this; only rank 0 writes files and shows progress.
    `progress` shows a tqdm bar; `log_lines` prints a plain line every `log_every` steps instead
    (for logs that are not a terminal). SIGTERM/SIGINT end the run at the next step boundary
    with a checkpoint and `RunInterrupted`. `fit_cpus` (the CLI): torch's intra-op threads are
    the CPUs the data workers leave (engine.cpus), for the run; else the caller's count stays.
    """
    env, device = init_distributed(cfg.train.device, group_of_one=cfg.train.strategy == "fsdp")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_on_cpu(device))  # bit-identical fresh CPU runs
            if fit_cpus:
                stack.enter_context(fit_threads(resolve_workers(cfg.data.num_workers, device.type)))
            return _pretrain(cfg, env, device, progress and env.is_main, log_lines and env.is_main, resume,
                             stack)
    finally:
        shutdown_distributed()


def _pretrain(cfg: PretrainConfig, env: DistEnv, device: torch.device, progress: bool, log_lines: bool,
              resume: ResumePoint | str | Path | None, stack: contextlib.ExitStack) -> RunResult:
    # Everything that can be wrong with the input is checked before anything is written.
    data = _prepare_data(cfg, env)
    point = _resume_point(resume, cfg)
    if point is not None:
        point.check_within(data.total_steps)
    init_state = _read_init_weights(cfg, point)
    with torch.device("meta"):  # the model's own checks (e.g. image size vs stride), at no cost
        build_pretrain_model(cfg)

    run_dir = shared_run_dir(cfg.train.out, cfg.preset, env)
    if env.is_main:
        take_run_dir(stack, run_dir, resuming=point is not None)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    s = _build_session(cfg, env, device, data, run_dir, point, init_state)
    if env.is_main:
        print(f"ummae pretrain: run directory {run_dir}"
              + (f" (resuming at step {s.step} of {data.total_steps})" if point is not None else ""), flush=True)
        plan = run_plan(cfg.train.batch_size, cfg.train.accum_steps, env.world_size, cfg.peak_lr(env.world_size),
                        resolve_workers(cfg.data.num_workers, device.type))
        print(f"ummae pretrain: {plan}", flush=True)

    log = _Log(s, progress, log_lines)
    points = CheckPoints(env, device, s.guard, stack.enter_context(StopSignals()), s.checkpoints,
                         data.total_steps, cfg.train.log_every, cfg.train.save_every,
                         lambda report, last_saved: _raise_if_nonfinite(report, cfg, run_dir, data.steps_per_epoch,
                                                                         last_saved),
                         log.write)
    s.train_model.train()
    try:
        while s.step < data.total_steps:
            _train_one_epoch(s, log, points)
    finally:
        log.close()
        shutdown_workers(s.loader)
    return _finish(s, log, point)


def _train_one_epoch(s: _Session, log: "_Log", points: CheckPoints) -> None:
    """Optimizer steps from `s.step` to the epoch's end (or the run's), with their check points."""
    spe, accum, batch = s.data.steps_per_epoch, s.cfg.train.accum_steps, s.cfg.train.batch_size
    epoch = s.step // spe
    model = s.model
    model.set_epoch(epoch)  # e.g. EMAE: the consistency term's start epoch
    s.data.sampler.set_epoch(epoch, start=(s.step % spe) * accum * batch)
    batches = iter(s.loader)
    while True:
        images = s.train_step(batches, s.step)
        if images is None:
            break
        s.step += 1
        log.stepped(images)
        points.visit(s.step)
        if s.step >= s.data.total_steps or s.step % spe == 0:
            break  # next epoch (partial accumulation groups at an epoch's end are dropped)


class _Log:
    """The run's output as it goes: the tqdm bar, metrics.jsonl and TensorBoard (rank 0), plain lines."""

    def __init__(self, s: _Session, progress: bool, log_lines: bool):
        self.s, self.log_lines = s, log_lines
        self.metrics = MetricsWriter(s.run_dir) if s.env.is_main else None
        if self.metrics is not None:
            truncate_metrics(self.metrics.path, s.step)  # lines a killed session logged after its checkpoint
        total = s.data.total_steps
        self.bar = tqdm(total=total, initial=s.step, desc=f"pretrain {s.cfg.preset}", unit="step",
                        disable=not progress, dynamic_ncols=True, mininterval=0.5)
        self.last_loss = _last_logged_loss(s.run_dir) if s.env.is_main and s.step else float("nan")
        self.start_step, self.start = s.step, time.perf_counter()
        self.window_images, self.window_start = 0, self.start

    def stepped(self, images: int) -> None:
        self.window_images += images
        self.bar.update(1)

    def write(self, step: int, report: GuardReport, now: float) -> None:
        """The log line of `step`: the window's mean loss, lr, images/s (summed over ranks)."""
        s = self.s
        self.last_loss = report.mean_loss
        images = all_reduce_sum(self.window_images, s.env, s.device)
        record = {"step": step, "epoch": round(step / s.data.steps_per_epoch, 4), "loss": self.last_loss,
                  "lr": s.optimizer.param_groups[0]["lr"],
                  "images_per_sec": images / max(now - self.window_start, 1e-9)}
        if self.metrics is not None:
            self.metrics.log(record)
            if s.skipped_files:  # kept on disk as we go, so a killed run keeps its list
                _record_skipped(s.run_dir, s.skipped_files)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{record['lr']:.2e}")
        if self.log_lines:
            print(log_line(record, s.data.total_steps, self.start_step, now - self.start), flush=True)
        self.window_images, self.window_start = 0, now

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def _finish(s: _Session, log: _Log, point: ResumePoint | None) -> RunResult:
    """The end of the session: the final checkpoint, the pictures, the summary."""
    cfg, env, run_dir, step = s.cfg, s.env, s.run_dir, s.step
    seconds = time.perf_counter() - log.start
    skipped_all = sorted(gather_strings(s.skipped_files, env))
    skipped_steps = s.guard.collect(env, reset_window=True).skipped if step > log.start_step else 0

    final = run_dir / "checkpoint.pt"
    done = step - log.start_step
    periodic = s.checkpoints.path(step)
    recon, curve = run_dir / "reconstructions.png", run_dir / "loss.png"
    # Decided by all ranks before any writes: under FSDP saving and the pictures' forward are collective.
    save_due = any_rank(bool(done) or not periodic.exists(), env, s.device)  # a finished run resumed again: nothing new
    recon_due = any_rank(bool(done) or not recon.exists(), env, s.device)
    if save_due:
        periodic = s.checkpoints.save(step)
    if s.sharded:  # the consolidated file every other command reads: gathered to rank 0, written there
        state = s.checkpoint_state()
        if env.is_main:
            save_checkpoint(final, state)
    if recon_due and (env.is_main or s.sharded):
        recon = _save_reconstructions(s.model, s.data.dataset, cfg, s.device, recon, write=env.is_main)
    if env.is_main:
        if not s.sharded:
            link_or_copy(periodic, final)
        if done or not curve.exists():
            curve = save_loss_curve(run_dir / "metrics.jsonl", curve)
        if skipped_all:
            skipped_all = _record_skipped(run_dir, set(skipped_all))
    else:
        recon = curve = None  # rank 0's files
    return RunResult(
        run_dir=run_dir, config=run_dir / "config.yaml", metrics=run_dir / "metrics.jsonl",
        tensorboard=run_dir / "tb", checkpoint=final, reconstructions=recon, loss_curve=curve, steps=step,
        epochs=step / s.data.steps_per_epoch, final_loss=log.last_loss, seconds=seconds,
        images_per_sec=done * cfg.effective_batch * env.world_size / max(seconds, 1e-9), device=str(s.device),
        num_params=sum(p.numel() for p in s.model.parameters()), world_size=env.world_size,
        resumed_from=point.path if point is not None else None, skipped_images=skipped_all,
        skipped_steps=skipped_steps, start_step=log.start_step,
        cpu_decoded=int(all_reduce_sum(s.cpu_decoded, env, s.device)))


def _raise_if_nonfinite(report: GuardReport, cfg: PretrainConfig, run_dir: Path, steps_per_epoch: int,
                        last_saved: int | None) -> None:
    """Stop (one line) on what the guard saw since the last check point, per train.on_nonfinite.

    Skippable (loss or gradients): the update was not applied, so with `skip` the run goes on.
    Weights made non-finite by an update cannot be undone: always a stop.
    """
    if not report.bad_step or (report.bad_kind != WEIGHTS and cfg.train.on_nonfinite == "skip"):
        return
    s, epoch = report.bad_step, (report.bad_step - 1) // steps_per_epoch
    what = {LOSS: f"loss became {report.bad_loss}",
            GRADIENTS: f"gradients became non-finite (loss {report.bad_loss:.4g})",
            WEIGHTS: f"the update made the weights non-finite (loss {report.bad_loss:.4g})"}[report.bad_kind]
    kept = "no checkpoint was written" if last_saved is None else f"the last checkpoint is step {last_saved}"
    hint = "try a lower lr or --set optim.clip_grad=1.0" + (
        ", or --set train.on_nonfinite=skip" if report.bad_kind != WEIGHTS else "")
    raise NonFiniteLossError(f"{what} at step {s} (epoch {epoch}); training stopped, nothing non-finite was "
                             f"written to '{run_dir}' ({kept}); {hint}")


def _last_logged_loss(run_dir: Path) -> float:
    """The loss of the last line in metrics.jsonl (the summary of a resumed, already finished run)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    for line in reversed(path.read_text().splitlines()):
        try:
            loss = json.loads(line)["loss"]
            return float("nan") if loss is None else float(loss)
        except (ValueError, KeyError, TypeError):
            continue
    return float("nan")


def _record_skipped(run_dir: Path, paths: set[str]) -> list[str]:
    """Merge `paths` into run_dir/skipped_images.txt (with what earlier sessions listed there)."""
    listing = run_dir / "skipped_images.txt"
    known = set(listing.read_text().splitlines()) if listing.exists() else set()
    merged = sorted((known | paths) - {""})
    if set(merged) != known:
        listing.write_text("".join(f"{p}\n" for p in merged))
    return merged


@torch.no_grad()
def _save_reconstructions(model, dataset, cfg: PretrainConfig, device: torch.device,
                          path: Path, write: bool = True) -> Path | None:
    """Reconstructions of `vis_images` images spread over the data set, under fixed masks and crops.
    A sharded model runs its forward on every rank; only the one with `write` saves the picture."""
    picked = spread_indices(len(dataset), cfg.train.vis_images)  # not the first files: one class if class-sorted
    if not picked:
        return None
    samples = SeededSamples(dataset, cfg.train.seed)
    batch = collate_encoded([samples[(0, i)] for i in picked])  # any decode mode
    imgs = to_model_input(to_device_batch(batch["image"], cfg.data.img_size, device)[0], device)
    model.eval()
    masks = draw_masks(model.masking, cfg.train.seed, 0, picked).to(device)
    with training_autocast(device, cfg.train.precision):
        _, pred, _ = model(imgs, masks)
    if not write:
        return None
    imgs, masks = picture_rows(imgs, masks)  # EMAE: one row per part (the K parts of an image in turn)
    return save_reconstruction_grid(path, imgs, pred, masks.mask, model.unit,
                                    secondary=masks.secondary, norm_pix_loss=model.norm_pix_loss)
