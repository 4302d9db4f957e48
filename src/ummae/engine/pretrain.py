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
from ..data import build_pretrain_dataset, to_model_input
from ..data.sampling import EpochSampler, SeededSamples, draw_masks, seed_for
from ..errors import ConfigError, UmmaeError
from ..models import build_pretrain_model
from ..models.specs import backbone_spec
from ..visualize import picture_rows, save_loss_curve, save_reconstruction_grid, spread_indices
from .checkpoint import (link_or_copy, load_checkpoint, prune_step_checkpoints,
                         save_checkpoint, step_checkpoint_path)
from .determinism import deterministic_on_cpu
from .distributed import (DistEnv, all_reduce_max, all_reduce_sum, gather_strings, init_distributed,
                          resolve_device, shared_run_dir, shutdown_distributed)
from .guard import GRADIENTS, LOSS, WEIGHTS, GuardReport, StepGuard, state_is_finite
from .metrics import MetricsWriter
from .optim import build_optimizer, build_scheduler, schedule_lengths
from .rundir import take_run_dir
from .signals import RunInterrupted, StopSignals, ignore_stop_signals_in_worker

__all__ = ["pretrain", "RunResult", "resolve_device", "training_autocast", "NonFiniteLossError",
           "RunInterrupted"]

# Sections a resumed checkpoint must agree with: they decide the parameters and the data stream.
_ARCHITECTURE_KEYS = ("method", "model", "masking", "emae")


class NonFiniteLossError(UmmaeError):
    """A loss, gradient or update became NaN or infinite; training stopped, nothing non-finite written."""


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
        worker_init_fn=ignore_stop_signals_in_worker,  # the main process stops them at a step boundary
    )


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

def pretrain(cfg: PretrainConfig, progress: bool = True, resume: str | Path | None = None,
             log_lines: bool = False) -> RunResult:
    """Run pre-training as configured (continuing from checkpoint `resume` if given).

    Under `torchrun` every process calls this; only rank 0 writes files and shows progress.
    `progress` shows a tqdm bar; `log_lines` prints a plain line every `log_every` steps instead
    (for logs that are not a terminal). SIGTERM/SIGINT end the run at the next step boundary
    with a checkpoint and `RunInterrupted`.
    """
    env, device = init_distributed(cfg.train.device)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_on_cpu(device))  # bit-identical fresh CPU runs
            return _pretrain(cfg, env, device, progress and env.is_main, log_lines and env.is_main, resume,
                             stack)
    finally:
        shutdown_distributed()


def _pretrain(cfg: PretrainConfig, env: DistEnv, device: torch.device, progress: bool, log_lines: bool,
              resume: str | Path | None, stack: contextlib.ExitStack) -> RunResult:
    seed, accum, batch = cfg.train.seed, cfg.train.accum_steps, cfg.train.batch_size
    # Everything that can be wrong with the input is checked before anything is written.
    dataset = build_pretrain_dataset(cfg.data.path, cfg.data.img_size, scale=(cfg.data.min_crop_scale, 1.0),
                                     demo_length=cfg.data.demo_length, decode=cfg.data.decode)
    sampler = EpochSampler(len(dataset), seed, env.world_size, env.rank)
    steps_per_epoch = sampler.per_rank // batch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the data has {len(dataset)} images, fewer than one optimizer step needs "
            f"(--batch-size {batch} x --accum-steps {accum} x {env.world_size} processes); lower them")
    total_steps, warmup_steps = schedule_lengths(steps_per_epoch, cfg.train.epochs,
                                                 cfg.optim.warmup_epochs, cfg.train.max_steps)
    resume_state = load_checkpoint(resume) if resume else None
    if resume_state is not None:
        _check_same_architecture(resume_state, cfg, f"--resume '{resume}'")
        if int(resume_state["step"]) > total_steps:
            raise ConfigError(f"--resume '{resume}' is at step {resume_state['step']}, beyond this run's "
                              f"{total_steps} steps; raise --max-steps/--epochs")
    # A resumed run takes its weights from the checkpoint; init_weights is then provenance only.
    init_state = None
    if cfg.train.init_weights and resume is None:
        if not Path(cfg.train.init_weights).is_file():
            raise ConfigError(f"--init-weights: '{cfg.train.init_weights}' does not exist")
        # an ummae checkpoint, or what else the backbone reads (the paper's released weights,
        # converted for this run; timm's / Hiera's own backbone weights)
        init_state = backbone_spec(cfg.model.arch).read_init_weights(cfg.train.init_weights, cfg)

    with torch.device("meta"):  # the model's own checks (e.g. image size vs stride), at no cost
        build_pretrain_model(cfg)

    run_dir = shared_run_dir(cfg.train.out, cfg.preset, env)
    if env.is_main:
        take_run_dir(stack, run_dir, resuming=resume_state is not None)
    config_path = run_dir / "config.yaml"
    if env.is_main:
        config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg).to(device)
    loader = _make_loader(cfg, dataset, sampler, model.masking, device)
    if init_state is not None and "model" not in init_state:  # a backbone's own weights: encoder only
        backbone_spec(cfg.model.arch).load_backbone_weights(model, init_state,
                                                            f"--init-weights '{cfg.train.init_weights}'")
    elif init_state is not None:
        _load_weights(model, init_state, f"--init-weights '{cfg.train.init_weights}'")
    if resume_state is not None:
        _load_weights(model, resume_state, f"--resume '{resume}'")
    num_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW: it can skip an update on the device (`found_inf`), see engine/guard.py.
    optimizer = build_optimizer(model, cfg.peak_lr(env.world_size), cfg.optim.weight_decay, cfg.optim.betas,
                                fused=True)
    # The lr is a pure function of (step, this configuration), so the schedule is rebuilt rather
    # than loaded: a resumed run whose --max-steps/--epochs were raised follows the new schedule.
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.optim.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    step = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        step = int(resume_state["step"])
        scheduler.step_update(step)
    if env.is_main:
        print(f"ummae pretrain: run directory {run_dir}"
              + (f" (resuming at step {step} of {total_steps})" if resume_state is not None else ""), flush=True)

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

    last_saved = step if resume_state is not None else None

    def save_step_checkpoint() -> Path | None:
        nonlocal last_saved
        if not env.is_main:
            return None
        state = checkpoint_state()
        if not state_is_finite(state["model"], state["optimizer"]):  # belt and braces; see guard.py
            raise NonFiniteLossError(f"the state at step {step} is not finite; nothing was written "
                                     f"(last checkpoint: step {last_saved})")
        path = save_checkpoint(step_checkpoint_path(run_dir, step), state)
        prune_step_checkpoints(run_dir, cfg.train.keep_last)
        last_saved = step
        return path

    metrics = MetricsWriter(run_dir) if env.is_main else None
    if metrics is not None:
        _truncate_metrics(metrics.path, step)  # lines a killed session logged after its checkpoint
    bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {cfg.preset}", unit="step",
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    guard = StepGuard(device)
    stop = stack.enter_context(StopSignals())
    skipped_files: set[str] = set()
    window_images = 0
    last_loss = _last_logged_loss(run_dir) if env.is_main and step else float("nan")
    start_step, start = step, time.perf_counter()
    window_start = start
    train_model.train()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            model.set_epoch(epoch)  # e.g. EMAE: the consistency term's start epoch
            sampler.set_epoch(epoch, start=(step % steps_per_epoch) * accum * batch)
            micro = 0
            for batch_data in loader:
                if micro == 0:
                    torch.manual_seed(seed_for(seed, "step", env.rank, step))  # drop path etc.
                skipped_files.update(p for s in batch_data["skipped"] if s for p in s.split("\n"))
                imgs = to_model_input(batch_data["image"], device)  # uint8 -> device, normalised there
                masks = model.masking.sample_type.from_batch(batch_data)  # as the workers drew them
                masks = masks.to(device, non_blocking=True)
                with training_autocast(device, cfg.train.precision):
                    loss, _, _ = train_model(imgs, masks)
                micro += 1
                window_images += imgs.shape[0]
                # A non-finite loss turns the gradients to NaN (x NaN instead of x 1.0), on every rank.
                factor = guard.loss_factor(loss)
                with contextlib.nullcontext() if micro == accum or not env.enabled else train_model.no_sync():
                    scaler.scale(loss * factor / accum).backward()
                if micro < accum:
                    continue

                # The optimizer step, skipped on the device when anything is non-finite: no sync.
                grad_norm = None
                if cfg.optim.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
                guard.step(optimizer, scaler, params, step + 1, grad_norm)
                step += 1
                micro = 0
                scheduler.step_update(step)
                bar.update(1)

                log_due = step % cfg.train.log_every == 0 or step == total_steps
                save_due = bool(cfg.train.save_every) and step % cfg.train.save_every == 0 and step < total_steps
                signal_due = stop.received is not None and not env.enabled  # DDP: at the next check point
                if log_due or save_due or signal_due:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    now = time.perf_counter()
                    report = guard.collect(env, reset_window=log_due)  # the one host sync
                    _raise_if_nonfinite(report, cfg, run_dir, steps_per_epoch, last_saved)
                    if log_due:
                        last_loss = report.mean_loss
                        images = all_reduce_sum(window_images, env, device)
                        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": last_loss,
                                  "lr": optimizer.param_groups[0]["lr"],
                                  "images_per_sec": images / max(now - window_start, 1e-9)}
                        if metrics is not None:
                            metrics.log(record)
                            if skipped_files:  # kept on disk as we go, so a killed run keeps its list
                                _record_skipped(run_dir, skipped_files)
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}")
                        if log_lines:
                            print(_log_line(record, total_steps, start_step, now - start), flush=True)
                        window_images, window_start = 0, now
                    if save_due:
                        save_step_checkpoint()
                    signum = stop.received if not env.enabled else _agreed_signal(stop.received, env, device)
                    if signum is not None and step < total_steps:
                        _stop_on_signal(signum, step, save_step_checkpoint if last_saved != step else None,
                                        run_dir, env)
                if step >= total_steps or step % steps_per_epoch == 0:
                    break  # next epoch (partial accumulation groups at an epoch's end are dropped)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        _shutdown_workers(loader)
    seconds = time.perf_counter() - start
    skipped_all = sorted(gather_strings(skipped_files, env))
    skipped_steps = guard.collect(env, reset_window=True).skipped if step > start_step else 0

    final = run_dir / "checkpoint.pt"
    recon = curve = None
    done = step - start_step
    if env.is_main:
        periodic = step_checkpoint_path(run_dir, step)
        if done or not periodic.exists():  # a finished run resumed again has nothing new to write
            periodic = save_step_checkpoint()
        link_or_copy(periodic, final)
        recon, curve = run_dir / "reconstructions.png", run_dir / "loss.png"
        if done or not recon.exists():
            recon = _save_reconstructions(model, dataset, cfg, device, recon)
        if done or not curve.exists():
            curve = save_loss_curve(run_dir / "metrics.jsonl", curve)
        if skipped_all:
            skipped_all = _record_skipped(run_dir, set(skipped_all))
    return RunResult(
        run_dir=run_dir, config=config_path, metrics=run_dir / "metrics.jsonl", tensorboard=run_dir / "tb",
        checkpoint=final, reconstructions=recon, loss_curve=curve, steps=step,
        epochs=step / steps_per_epoch, final_loss=last_loss, seconds=seconds,
        images_per_sec=done * cfg.effective_batch * env.world_size / max(seconds, 1e-9), device=str(device),
        num_params=num_params, world_size=env.world_size, resumed_from=Path(resume) if resume else None,
        skipped_images=skipped_all, skipped_steps=skipped_steps, start_step=start_step)


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


def _agreed_signal(received: int | None, env: DistEnv, device: torch.device) -> int | None:
    """The signal any rank received (all ranks agree, so they stop at the same step)."""
    return int(all_reduce_max(float(received or 0), env, device)) or None


def _stop_on_signal(signum: int, step: int, save, run_dir: Path, env: DistEnv) -> None:
    import signal as _signal

    path = (save() if save is not None else None) or step_checkpoint_path(run_dir, step)  # DDP: rank 0 wrote it
    name = _signal.Signals(signum).name
    raise RunInterrupted(f"stopped by {name} at step {step}; checkpoint '{path}' written; the same command "
                         f"with --resume auto (and --out '{run_dir}') continues the run exactly", signum)


def _log_line(record: dict, total_steps: int, start_step: int, elapsed: float) -> str:
    """One plain progress line (logs that are not a terminal): step, epoch, loss, lr, images/s, ETA."""
    done = record["step"] - start_step
    eta = elapsed / done * (total_steps - record["step"]) if done else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "-"
    if math.isfinite(eta) and eta >= 86400:
        eta_text = f"{int(eta // 86400)}d {eta_text}"
    return (f"step {record['step']}/{total_steps}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.3e}  {record['images_per_sec']:.1f} images/s  ETA {eta_text}")


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
    """Reconstructions of `vis_images` images spread over the data set, under fixed masks and crops."""
    picked = spread_indices(len(dataset), cfg.train.vis_images)  # not the first files: one class if class-sorted
    if not picked:
        return None
    samples = SeededSamples(dataset, cfg.train.seed)
    imgs = to_model_input(torch.stack([samples[(0, i)]["image"] for i in picked]), device)
    model.eval()
    masks = draw_masks(model.masking, cfg.train.seed, 0, picked).to(device)
    with training_autocast(device, cfg.train.precision):
        _, pred, _ = model(imgs, masks)
    imgs, masks = picture_rows(imgs, masks)  # EMAE: one row per part (the K parts of an image in turn)
    return save_reconstruction_grid(path, imgs, pred, masks.mask, model.unit,
                                    secondary=masks.secondary, norm_pix_loss=model.norm_pix_loss)
