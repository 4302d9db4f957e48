"""docs/benchmarks.md's Fashion-MNIST tables, in one command (cached, resumable).

    apt-get install dataset-fashion-mnist                         # the data (Debian), 30 MB
    python scripts/fashion_tables.py --out runs/fashion           # the whole grid: see the budget below
    python scripts/fashion_tables.py --out runs/fashion_quick --quick   # the plumbing, a few CPU-minutes
    python scripts/fashion_tables.py --out runs/fashion --report  # tables + pictures from what has run
    python scripts/fashion_tables.py --out runs/fashion --save-records docs/bench/fashion   # to commit
    python scripts/fashion_tables.py --out NEW --records docs/bench/fashion   # continue on another machine
    python scripts/fashion_tables.py --out runs/fashion --stop 170   # stop at 170 min; the next call continues

Data: Fashion-MNIST (60,000 training + the official 10,000 test images, 28x28 grey, 10 classes),
written by scripts/make_fashion_folder.py as `DATA/{train,test}/<class>/*.png`, padded to 32 px
with black borders (the original pixels unchanged). The test images are only ever scored on.

What it runs, in this order (the most informative first, so that a partial grid is a table):

1. pre-training (`ummae pretrain`, the 60,000 training images, labels unused, seed 0),
   `--epochs` epochs, batch 128, lr 1e-3 (1 warm-up epoch, cosine), crops of 40-100%:
   UM-MAE and SimMIM on a small Swin (patch 2, widths 48-96-192, depths 2-2-2, 3 stages; 4 px
   mask units: an 8x8 unit grid, UM-MAE's compact image 16 px = 8x8 tokens, window 4; SimMIM's
   full 16x16 tokens, window 8), MAE on a small ViT (patch 4 = the unit, width 96, depth 4);
2. their frozen evaluation, next to the same architectures randomly initialised and raw pixels;
3. fine-tuning (`ummae finetune`) of UM-MAE Swin, SimMIM Swin, random-init Swin, MAE ViT and
   random-init ViT, `--ft-seeds` seeds: with 1% of the labels (600 images, 60 per class, a
   stratified draw per seed; every image listed `FEW_COPIES` times so that an epoch is that many
   passes and the 10,000 test images are scored every `FEW_COPIES` passes), `--ft-few-epochs`;
   then with all labels, `--ft-full-epochs`, seeds `--ft-full-seeds`;
4. EMAE on the ViT, UM-EMAE on the Swin and MAE on timm's Hiera (patch 1, 8 px mask units: a
   4x4 unit grid) at equal epochs, then at equal CPU time: EMAE gets the CPU time its UM-MAE / MAE
   counterpart took at `--epochs` (Hiera UM-MAE Swin's), as whole epochs from the measured ratio;
5. `ummae bench` of the configurations (step time, FLOPs, peak memory; synthetic batches);
6. the convergence check: the five fine-tuning arms of 3. again, seeds `--ft-long-seeds`, on
   longer schedules, `--ft-few-long-epochs` (3x, at 1%) and `--ft-full-long-epochs` (4x, all
   labels): whether the accuracy has stopped rising, and whether the gaps of 3. survive it.

Frozen evaluation (one feature pass per encoder, `--eval-one`): k-NN (cosine, T 0.07; k 10, 20,
50), the `ummae linprobe` protocol (90 epochs, final epoch, probe seeds 0-2), and few labels (10
and 100 labeled images per class, `--draws` stratified draws: k-NN k 10 and the linear probe),
all trained on the 60,000 and scored on the test images. The only choice, k of the k-NN row, is
made on a stratified 80/20 split of the training features (seed 0), as is the "selection" probe
recorded beside it; the fine-tuning recipe is fixed in advance, not searched: blr 2e-3, batch
128, layer decay and drop path at `ummae finetune`'s defaults, label smoothing 0.1, no mixup /
cutmix / RandAugment / erasing, flips 0.5, crops 50-100%, final epoch reported.

Budget (measured on the 2-core machine, two 1-thread runs at a time; CPU-seconds per epoch of
the 60,000 images, from 30-step calibration runs): pre-training UM-MAE Swin 340, SimMIM Swin 460,
MAE ViT 210, UM-EMAE Swin 920, EMAE ViT 790, MAE Hiera 560; fine-tuning an epoch of all labels
Swin ~560, ViT ~380 (the 10,000 test images scored included); a frozen evaluation ~250 (Hiera,
patch 1 on full images, ~670). At the defaults (4 pre-training epochs; at 1% 6 epochs of 10
passes; 3 epochs with all labels, seed 0), estimated:
    1-2 UM-MAE / SimMIM / MAE pre-training + 6 evaluations   ~1.5 CPU-h
    3   fine-tuning, 1% labels (15 runs)                      ~1.8 CPU-h
        fine-tuning, all labels, seed 0 (5 runs)              ~2.0 CPU-h
    4   EMAE / UM-EMAE / Hiera, equal epochs + equal time     ~3.3 CPU-h (+ 7 evaluations ~0.8)
    5   bench                                                 ~0.1 CPU-h
    total                                                     ~9.5 CPU-h (`--ft-full-seeds 0 1 2`: +4)
    6   longer schedules, seed 0: 1% (18 epochs)              ~1.5 CPU-h
        all labels (12 epochs)                                ~7 CPU-h
(over the issue's ~8 by the equal-epoch EMAE runs, each 3x UM-MAE's cost per epoch, and by the
convergence check, which spans sessions: its runs are continued from their checkpoints.)
Runs go `--jobs` at a time, each on one thread (`OMP_NUM_THREADS=1`); every run's wall-clock,
CPU time (`wait4`, data workers included) and peak memory are recorded. Everything is cached
under `--out`, so an interrupted invocation continues where it stopped: `--stop MINUTES` or
SIGTERM to the script interrupts the running jobs, whose pre-trainings and fine-tunings write a
checkpoint that the next invocation continues from (`--resume auto`; the training is the same as
an uninterrupted one's, the record sums the CPU time of the pieces), so a run may be longer than
a session; an interrupted evaluation runs again from the start. `--records` seeds a new
cache from committed records (a finished pre-training whose checkpoint is missing runs again
when a job that still has to run needs it; `--save-records` also commits each finished
pre-training's encoder, a few MB, so that the fine-tuning jobs of a later session start from it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tables_runner import (Job, Runner, fmt, plot_curves, read_metrics, save_encoders, save_records, seed_encoders,
                           seed_records, summarise, to_rerun, val_curve)

REPO = Path(__file__).resolve().parent.parent
UMMAE = [sys.executable, "-m", "ummae"]
IMG = 32
TRAIN_IMAGES = 60000

# Shared by every pre-training run: 32 px, batch 128, lr 1e-3 (the demo recipe's), crops >= 40%.
COMMON = ["--batch-size", "128", "--set", f"data.img_size={IMG}", "--set", "data.min_crop_scale=0.4",
          "--set", "train.save_every=0", "--set", "train.log_every=10", "--no-progress", "--workers", "1",
          "--device", "cpu"]
SWIN = ["--set", "model.patch_size=2", "--set", "model.embed_dim=48", "--set", "model.depths=[2,2,2]",
        "--set", "model.num_heads=[2,4,8]", "--set", "masking.unit_size=4"]
VIT = ["--set", "model.patch_size=4", "--set", "masking.unit_size=4"]
CONFIGS = {  # name: (preset, overrides)
    "ummae_swin": ("ummae_swin_demo", SWIN),  # window 4 (the preset's) on the 8x8 compact tokens
    "simmim_swin": ("simmim_swin_demo", SWIN),  # window 8 (the preset's) on the 16x16 full tokens
    "mae_vit": ("mae_vit_demo", VIT),
    "emae_swin": ("emae_swin_demo", SWIN),
    "emae_vit": ("emae_vit_demo", VIT),
    "mae_hiera": ("mae_hiera_demo", ["--set", "model.patch_size=1", "--set", "masking.unit_size=8"]),
}
FIRST, LATER = ("ummae_swin", "simmim_swin", "mae_vit"), ("emae_swin", "emae_vit", "mae_hiera")
# Equal time: {run: the run whose CPU time at --epochs it gets}.
EQUAL_TIME = {"emae_swin": "ummae_swin", "emae_vit": "mae_vit", "mae_hiera": "ummae_swin"}
ARCH = {"ummae_swin": "swin", "simmim_swin": "swin", "emae_swin": "swin", "mae_vit": "vit", "emae_vit": "vit",
        "mae_hiera": "hiera"}

FT_COMMON = ["--batch-size", "128", "--blr", "2e-3", "--mixup", "0", "--cutmix", "0", "--auto-augment", "none",
             "--reprob", "0", "--hflip", "0.5", "--min-crop-scale", "0.5", "--device", "cpu", "--workers", "1",
             "--no-progress", "--save-every", "0"]
FT_ARMS = {"ummae_swin": "ummae_swin", "simmim_swin": "simmim_swin", "random_swin": "ummae_swin",
           "mae_vit": "mae_vit", "random_vit": "mae_vit"}  # arm: the checkpoint it starts from (or its shape)
FEW_PER_CLASS, FEW_COPIES = 60, 10  # 1% of the labels; each listed 10 times: an epoch = 10 passes
KNN_KS = (10, 20, 50)
# Appended to a pre-training's or fine-tuning's command to continue it from the checkpoint it wrote
# when the runner interrupted it (`--stop`, or SIGTERM to the script): a run may span sessions.
RESUME = ["--resume", "auto"]


@dataclass(frozen=True)
class Regime:
    """One fine-tuning table: its jobs are `ft_<key>_<arm>_s<seed>`."""

    key: str
    epochs: int
    seeds: list[int]
    few: bool  # 1% of the labels (else all)
    title: str


def ft_regimes(args) -> list[Regime]:
    """The fine-tuning tables: 1% and all labels, then the same on the longer schedules."""
    few = f"1% of the labels (600 images), {{}} epochs of {args.few_copies} passes"
    return [Regime("few", args.ft_few_epochs, args.ft_seeds, True, few.format(args.ft_few_epochs)),
            Regime("full", args.ft_full_epochs, args.ft_full_seeds, False, f"all labels, {args.ft_full_epochs} epochs"),
            Regime("few_long", args.ft_few_long_epochs, args.ft_long_seeds, True,
                   few.format(args.ft_few_long_epochs) + " (the longer schedule)"),
            Regime("full_long", args.ft_full_long_epochs, args.ft_long_seeds, False,
                   f"all labels, {args.ft_full_long_epochs} epochs (the longer schedule)")]


def pretrain_argv(cfg: str, out: Path, seed: int, epochs: int, data: Path) -> list[str]:
    preset, sets = CONFIGS[cfg]
    return [*UMMAE, "pretrain", "--preset", preset, "--data", str(data / "train"), "--out", str(out),
            "--seed", str(seed), "--epochs", str(epochs), *COMMON, *sets]


def finetune_argv(checkpoint: Path, train: Path, test: Path, out: Path, epochs: int, seed: int,
                  random_init: bool) -> list[str]:
    return [*UMMAE, "finetune", "--checkpoint", str(checkpoint), "--data", str(train), "--val-data", str(test),
            "--out", str(out), "--epochs", str(epochs), "--warmup-epochs", str(max(1, epochs // 10)),
            "--seed", str(seed), *FT_COMMON] + (["--init-random"] if random_init else [])


# ----------------------------------------------------------------------------------------------
# data

def few_label_folder(train: Path, out: Path, per_class: int, copies: int, seed: int) -> Path:
    """`out/<class>/` with `per_class` images of every class of `train` (a seeded draw), each
    linked `copies` times; made once (kept if present). Returns `out`."""
    import random

    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    rng = random.Random(seed)
    for c in sorted(p for p in train.iterdir() if p.is_dir()):
        images = sorted(c.iterdir())
        (tmp / c.name).mkdir(parents=True, exist_ok=True)
        for img in rng.sample(images, per_class):
            for k in range(copies):
                (tmp / c.name / f"{img.stem}_{k}{img.suffix}").symlink_to(img.resolve())
    tmp.rename(out)
    return out


def quick_folder(full: Path, out: Path, train_per_class: int, test_per_class: int) -> Path:
    """A small copy (links) of the data folder: the first images of every class of each split."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in sorted(p for p in (full / split).iterdir() if p.is_dir()):
            (tmp / split / c.name).mkdir(parents=True, exist_ok=True)
            for img in sorted(c.iterdir())[:n]:
                (tmp / split / c.name / img.name).symlink_to(img.resolve())
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------------------------
# the grid

def build_jobs(args, runner: Runner) -> list[Job]:
    data, out, E = args.data, args.out, args.epochs
    me = [sys.executable, str(Path(__file__).resolve())]
    jobs: list[Job] = []

    def run_dir(name: str) -> Path:
        return out / "runs" / name

    def ckpt(name: str) -> Path:
        return run_dir(name) / "checkpoint.pt"

    def pretrain(cfg: str, epochs: int | None = None, name: str | None = None, deps=()) -> str:
        name = name or f"pre_{cfg}_e{E}"
        argv = (pretrain_argv(cfg, run_dir(name), 0, epochs, data) if epochs is not None else
                lambda: pretrain_argv(cfg, run_dir(name), 0, equal_time_epochs(cfg), data))
        jobs.append(Job(name, argv, list(deps), outputs=[ckpt(name)], resume=RESUME))
        return name

    def equal_time_epochs(cfg: str) -> int:
        # Whole epochs of `cfg` that cost the CPU time `--epochs` of its partner took (ratio of the
        # measured CPU time, which other programs on the machine do not inflate).
        ratio = (runner.record(f"pre_{EQUAL_TIME[cfg]}_e{E}")["cpu_seconds"]
                 / runner.record(f"pre_{cfg}_e{E}")["cpu_seconds"])
        return max(1, round(E * ratio))

    def evaluate(name: str, source: list[str], deps: list[str]) -> None:
        argv = [*me, "--eval-one", *source, "--eval-json", str(out / "eval" / f"{name}.json"),
                "--data", str(data), "--draws", str(args.draws)] + (["--quick"] if args.quick else [])
        jobs.append(Job(f"eval_{name}", argv, deps))

    def evaluate_checkpoint(name: str) -> None:
        evaluate(name, ["--checkpoint", str(ckpt(name))], [name])

    # 1-2. UM-MAE Swin, SimMIM Swin, MAE ViT; their frozen features; the baselines
    for cfg in FIRST:
        evaluate_checkpoint(pretrain(cfg, E))
    evaluate("raw_pixels", ["--raw-pixels"], [])
    for arch, ref in (("swin", "ummae_swin"), ("vit", "mae_vit")):
        evaluate(f"random_{arch}", ["--checkpoint", str(ckpt(f"pre_{ref}_e{E}")), "--init-random"],
                 [f"pre_{ref}_e{E}"])
    def finetune(regime: Regime) -> None:
        for s in regime.seeds:
            train = (few_label_folder(data / "train", data / f"train_1pct_s{s}_x{args.few_copies}", FEW_PER_CLASS,
                                      args.few_copies, s)
                     if regime.few else data / "train")
            for arm, ref in FT_ARMS.items():
                name = f"ft_{regime.key}_{arm}_s{s}"
                jobs.append(Job(name, finetune_argv(ckpt(f"pre_{ref}_e{E}"), train, data / "test", run_dir(name),
                                                    regime.epochs, s, arm.startswith("random")), [f"pre_{ref}_e{E}"],
                                outputs=[run_dir(name) / "metrics.jsonl"], resume=RESUME))

    short, long = ft_regimes(args)[:2], ft_regimes(args)[2:]
    # 3. fine-tuning: 1% of the labels (every seed), then all labels
    for regime in short:
        finetune(regime)
    # 4. EMAE, UM-EMAE, Hiera: equal epochs, then equal CPU time
    for cfg in LATER:
        evaluate_checkpoint(pretrain(cfg, E))
    evaluate("random_hiera", ["--checkpoint", str(ckpt(f"pre_mae_hiera_e{E}")), "--init-random"],
             [f"pre_mae_hiera_e{E}"])
    for cfg, partner in EQUAL_TIME.items():
        evaluate_checkpoint(pretrain(cfg, None, f"pre_{cfg}_eqtime", [f"pre_{cfg}_e{E}", f"pre_{partner}_e{E}"]))
    # 5. the cost of one step of each configuration (synthetic batches, interleaved in one process)
    for arch, cfgs in (("swin", ["ummae_swin", "simmim_swin", "emae_swin"]), ("vit", ["mae_vit", "emae_vit"]),
                       ("hiera", ["mae_hiera"])):
        sets = CONFIGS[cfgs[0]][1]  # the windows are the presets' (UM-MAE 4, SimMIM 8)
        jobs.append(Job(f"bench_{arch}", [*UMMAE, "bench", *[CONFIGS[c][0] for c in cfgs], "--batch-size", "128",
                                          "--steps", "2" if args.quick else "5", "--warmup", "1", "--device", "cpu",
                                          "--set", f"data.img_size={IMG}", *sets,
                                          "--json", str(out / "bench" / f"{arch}.json")]))
    # 6. the convergence check: the fine-tunings of 3. again on longer schedules (seeds --ft-long-seeds)
    for regime in long:
        finetune(regime)
    return jobs


# ----------------------------------------------------------------------------------------------
# frozen evaluation of one feature source (run as a job: --eval-one)

def stratified_split(labels, fraction: float, seed: int):
    """`(train_idx, held_idx)`: `fraction` of every class held out (rounded, at least one), seeded.

    `labels`: `[N]` class indices (tensor). Returns two sorted int64 index tensors.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[:max(1, round(fraction * len(idx)))])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx


def evaluate_one(args) -> None:
    import torch

    torch.set_num_threads(1)
    from ummae.evaluate.features import labeled_features, raw_pixel_features
    from ummae.evaluate.few_label import few_label, summarize
    from ummae.evaluate.knn import knn_evaluate
    from ummae.evaluate.linprobe import linear_probe

    train, test = args.data / "train", args.data / "test"
    if args.raw_pixels:
        f = raw_pixel_features(train, test, img_size=IMG, batch_size=256)
    else:
        f = labeled_features(args.checkpoint, train, test, device="cpu", init_random=args.init_random,
                             seed=args.seed, batch_size=256)
    n = len(f.classes)
    probe_epochs = 10 if args.quick else 90  # `ummae linprobe`'s protocol: 90 epochs, final epoch

    def knn(tr_x, tr_y, q_x, q_y, ks=KNN_KS):
        return {str(k): r["top1"] for k, r in knn_evaluate(tr_x, tr_y, q_x, q_y, list(ks), 0.07, num_classes=n).items()}

    def probe(tr_x, tr_y, q_x, q_y, seed=0):
        return linear_probe(tr_x, tr_y, q_x, q_y, num_classes=n, epochs=probe_epochs, seed=seed).final["top1"]

    # choices: on a stratified 80/20 split of the training features (the test images never)
    fit, held = stratified_split(f.train_labels, 0.2, 0)
    split = (f.train_features[fit], f.train_labels[fit], f.train_features[held], f.train_labels[held])
    select_knn = knn(*split)
    k_chosen = max(KNN_KS, key=lambda k: select_knn[str(k)])
    test_knn = knn(f.train_features, f.train_labels, f.val_features, f.val_labels)
    few = {}
    for per_class in (10, 100):
        few[str(per_class)] = {}
        for name, score in (("knn", lambda x, y: knn(x, y, f.val_features, f.val_labels, (10,))["10"]),
                            ("linprobe", lambda x, y: probe(x, y, f.val_features, f.val_labels))):
            values = [d.result for d in few_label(f.train_features, f.train_labels, per_class, args.draws, 0, score,
                                                  f.classes)]
            few[str(per_class)][name] = {**summarize(values), "values": values}
    record = {"source": "raw_pixels" if args.raw_pixels else str(args.checkpoint), "init_random": args.init_random,
              "seed": args.seed, "feature_dim": f.feature_dim, "train_images": len(f.train_labels),
              "test_images": len(f.val_labels),
              "select": {"knn": select_knn, "linprobe": probe(*split)}, "knn_k_chosen": k_chosen,
              "knn": test_knn, "linprobe_final_top1": [probe(f.train_features, f.train_labels, f.val_features,
                                                             f.val_labels, s) for s in (0, 1, 2)],
              "few_label": few}
    args.eval_json.parent.mkdir(parents=True, exist_ok=True)
    args.eval_json.write_text(json.dumps(record, indent=2))


# ----------------------------------------------------------------------------------------------
# tables

def pretrain_row(runner: Runner, out: Path, name: str) -> dict | None:
    """Cost and loss of one pre-training run (None when it has not run)."""
    rec = runner.record(name)
    if rec is None:
        return None
    lines = [x for x in read_metrics(out / "runs" / name) if "loss" in x]
    epochs = int(rec["argv"][rec["argv"].index("--epochs") + 1])
    rates = [x["images_per_sec"] for x in lines if "images_per_sec" in x]
    images = epochs * count_images(rec["argv"])
    return {"epochs": epochs, "cpu_s": rec["cpu_seconds"], "wall_s": rec["seconds"],
            "max_rss_mib": rec.get("max_rss_mib"), "images_per_cpu_s": images / rec["cpu_seconds"],
            "images_per_s_loader": statistics.median(rates) if rates else None,
            "final_loss": lines[-1]["loss"] if lines else None,
            "loss_curve": [[x["epoch"], x["loss"]] for x in lines]}


def count_images(argv: list[str]) -> int:
    data = Path(argv[argv.index("--data") + 1])
    return sum(1 for p in data.rglob("*.png")) if data.is_dir() else TRAIN_IMAGES


def frozen_row(e: dict) -> dict:
    few = e["few_label"]
    return {"linprobe": summarise(e["linprobe_final_top1"]), "knn_chosen": e["knn"][str(e["knn_k_chosen"])],
            "knn_k": e["knn_k_chosen"], "knn": e["knn"], "select_linprobe": e["select"]["linprobe"],
            **{f"few{n}_{m}": summarise(few[n][m]["values"]) for n in few for m in few[n]}}


def report(args, runner: Runner) -> dict:
    out, E = args.out, args.epochs
    pretraining = {}
    for cfg in CONFIGS:
        pretraining[f"pre_{cfg}_e{E}"] = pretrain_row(runner, out, f"pre_{cfg}_e{E}")
        if cfg in EQUAL_TIME:
            pretraining[f"pre_{cfg}_eqtime"] = pretrain_row(runner, out, f"pre_{cfg}_eqtime")
    frozen = {}
    for name in [*pretraining, "random_swin", "random_vit", "random_hiera", "raw_pixels"]:
        path = out / "eval" / f"{name}.json"
        frozen[name] = frozen_row(json.loads(path.read_text())) if path.exists() else None
    finetune = {}
    for regime in ft_regimes(args):
        finetune[regime.key] = {}
        for arm in FT_ARMS:
            name = f"ft_{regime.key}_{arm}_s{{}}"
            # a record without its curve (a cache seeded from records that lacked it) counts as not run
            done = [s for s in regime.seeds if runner.record(name.format(s)) and val_curve(out / "runs" / name.format(s))]
            curves = [val_curve(out / "runs" / name.format(s)) for s in done]
            finetune[regime.key][arm] = None if not done else {
                "seeds": done, "final_top1": summarise([c[-1] for c in curves]), "curves": curves,
                "cpu_s": summarise([runner.record(name.format(s))["cpu_seconds"] for s in done])}
    bench = {arch: json.loads((out / "bench" / f"{arch}.json").read_text())
             for arch in ("swin", "vit", "hiera") if (out / "bench" / f"{arch}.json").exists()}
    results = {"epochs": E, "img_size": IMG, "pretraining": pretraining, "frozen": frozen, "finetune": finetune,
               "bench": bench, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = tables(results, args) + [""] + targets(results, E)
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    pictures(results, out)
    print("\n".join(lines))
    return results


NOT_RUN = "not run yet"


def tables(results: dict, args) -> list[str]:
    lines = ["| pre-training (the training images, labels unused, seed 0) | epochs | CPU time (s) | wall-clock (s) "
             "| peak RSS (MiB) | images / CPU-s | images/s (loader, median) | final loss |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["pretraining"].items():
        if r is None:
            lines.append(f"| {name} | {NOT_RUN} | | | | | | |")
            continue
        rate = f"{r['images_per_s_loader']:.0f}" if r["images_per_s_loader"] else "-"
        lines.append(f"| {name} | {r['epochs']} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | {r['max_rss_mib']:.0f} | "
                     f"{r['images_per_cpu_s']:.0f} | {rate} | {r['final_loss']:.4f} |")
    lines += ["", "| frozen features, test top-1 (%) | linear probe (3 probe seeds) | k-NN (k chosen on the split) "
                  "| k-NN k=10 / 20 / 50 | 10 per class, k-NN | 10 per class, linear | 100 per class, k-NN "
                  "| 100 per class, linear | selection probe (80/20 split of train) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["frozen"].items():
        if r is None:
            lines.append(f"| {name} | {NOT_RUN} | | | | | | | |")
            continue
        knn = " / ".join(f"{r['knn'][str(k)]:.1f}" for k in KNN_KS)
        lines.append(f"| {name} | {fmt(r['linprobe'])} | {r['knn_chosen']:.1f} (k={r['knn_k']}) | {knn} | "
                     f"{fmt(r['few10_knn'])} | {fmt(r['few10_linprobe'])} | {fmt(r['few100_knn'])} | "
                     f"{fmt(r['few100_linprobe'])} | {r['select_linprobe']:.1f} |")
    for regime in ft_regimes(args):
        if not regime.seeds:
            continue
        lines += ["", f"| fine-tuning, {regime.title}: final epoch | test top-1 (%), mean (min-max) | seeds "
                      "| CPU time (s) | mean curve, per epoch |", "|---|---|---|---|---|"]
        for arm, r in results["finetune"][regime.key].items():
            if r is None:
                lines.append(f"| {arm} | {NOT_RUN} | | | |")
                continue
            n = min(len(c) for c in r["curves"])
            curve = " ".join(f"{statistics.fmean(c[e] for c in r['curves']):.1f}" for e in range(n))
            lines.append(f"| {arm} | {fmt(r['final_top1'])} | {len(r['seeds'])} | {fmt(r['cpu_s'])} | {curve} |")
    return lines


def targets(results: dict, E: int) -> list[str]:
    """The issue's targets, each "met", "missed" or "not run yet", with the numbers compared."""
    frozen, ft = results["frozen"], results["finetune"]
    pre = {cfg: frozen.get(f"pre_{cfg}_e{E}") for cfg in CONFIGS}
    done = {cfg: r for cfg, r in pre.items() if r}
    lines = ["| target (issue 20) | compared | verdict |", "|---|---|---|"]

    def add(name: str, ok: bool | None, compared: str) -> None:
        lines.append(f"| {name} | {compared} | {NOT_RUN if ok is None else 'met' if ok else 'missed'} |")

    raw = frozen.get("raw_pixels")
    if done and raw:
        best = max(done, key=lambda c: done[c]["linprobe"]["mean"])
        gap = done[best]["linprobe"]["mean"] - raw["linprobe"]["mean"]
        add("best frozen linear probe >= raw pixels + 3", gap >= 3, f"{best} {done[best]['linprobe']['mean']:.1f} vs "
            f"{raw['linprobe']['mean']:.1f} ({gap:+.1f})")
    else:
        add("best frozen linear probe >= raw pixels + 3", None, "")
    for protocol in ("knn", "linprobe"):
        key, name = f"few10_{protocol}", f"10 per class ({protocol}) >= raw pixels and random init + 5"
        scored = {c: r for c, r in done.items() if frozen.get(f"random_{ARCH[c]}")}
        if scored and raw:
            margin = {c: r[key]["mean"] - max(raw[key]["mean"], frozen[f"random_{ARCH[c]}"][key]["mean"])
                      for c, r in scored.items()}
            best = max(margin, key=margin.get)
            add(name, margin[best] >= 5, f"{best} {scored[best][key]['mean']:.1f}, margin {margin[best]:+.1f}")
        else:
            add(name, None, "")
    cost = results["pretraining"]
    for full, few, schedule in ((ft["full"], ft["few"], ""),
                                (ft.get("full_long"), ft.get("few_long"), ", longer schedule")):
        finetune_targets(add, full or {}, few or {}, cost.get(f"pre_ummae_swin_e{E}"),
                         cost.get(f"pre_simmim_swin_e{E}"), schedule)
    return lines


def finetune_targets(add, full: dict, few: dict, cost_ummae: dict | None, cost_simmim: dict | None,
                     schedule: str) -> None:
    """The fine-tuning targets of one schedule. `full`, `few`: {arm: result} with all and 1% of the
    labels; `cost_*`: the UM-MAE and SimMIM pre-trainings' records; `schedule`: the rows' suffix."""
    ummae, random, simmim = full.get("ummae_swin"), full.get("random_swin"), full.get("simmim_swin")
    name = f"fine-tuned UM-MAE > random init on every seed, all labels{schedule}"
    if ummae and random:
        pairs = [(a, b) for s, a in zip(ummae["seeds"], ummae["final_top1"]["values"])
                 for t, b in zip(random["seeds"], random["final_top1"]["values"]) if s == t]
        add(name, bool(pairs) and all(a > b for a, b in pairs), " / ".join(f"{a:.1f} vs {b:.1f}" for a, b in pairs))
    else:
        add(name, None, "")
    name = f"fine-tuned UM-MAE >= random init + 3, 1% labels{schedule}"
    if few.get("ummae_swin") and few.get("random_swin"):
        gap = few["ummae_swin"]["final_top1"]["mean"] - few["random_swin"]["final_top1"]["mean"]
        add(name, gap >= 3, f"{gap:+.1f} (means)")
    else:
        add(name, None, "")
    name = f"UM-MAE fine-tuned within 0.5 of SimMIM at <= 0.6x its pre-training CPU time{schedule}"
    if ummae and simmim and cost_ummae and cost_simmim:
        gap = ummae["final_top1"]["mean"] - simmim["final_top1"]["mean"]
        ratio = cost_ummae["cpu_s"] / cost_simmim["cpu_s"]
        add(name, gap >= -0.5 and ratio <= 0.6, f"{gap:+.1f} points at {ratio:.2f}x")
    else:
        add(name, None, "")


def pictures(results: dict, out: Path) -> None:
    """loss_curves.png, finetune_{few,full}.png, few_label.png (whatever has run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: r for k, r in results["pretraining"].items() if r and r["loss_curve"]}
    if runs:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for name, r in runs.items():
            ax.plot(*zip(*r["loss_curve"]), label=name.removeprefix("pre_"))
        ax.set_xlabel("pre-training epoch")
        ax.set_ylabel("training loss (each method's own)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png")
        plt.close(fig)
    for regime in results["finetune"]:
        done = {arm: r for arm, r in results["finetune"][regime].items() if r}
        if done:
            plot_curves(done, out / f"finetune_{regime}.png", ylabel="test top-1 (%)")
    rows = {k: r for k, r in results["frozen"].items() if r}
    if rows:
        keys = ["few10_knn", "few10_linprobe", "few100_knn", "few100_linprobe"]
        fig, ax = plt.subplots(figsize=(9, 3.6), dpi=120)
        width = 0.8 / len(rows)
        colours = plt.cm.tab20.colors
        for i, (name, r) in enumerate(rows.items()):
            means = [r[k]["mean"] for k in keys]
            err = [[m - r[k]["min"] for m, k in zip(means, keys)], [r[k]["max"] - m for m, k in zip(means, keys)]]
            ax.bar([j + i * width for j in range(len(keys))], means, width, yerr=err, capsize=2,
                   color=colours[i % len(colours)], label=name.removeprefix("pre_"))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))],
                      ["10/class k-NN", "10/class linear", "100/class k-NN", "100/class linear"])
        ax.set_ylabel("test top-1 (%), draws' range")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / "few_label.png")
        plt.close(fig)


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/fashion"), help="data folder (made if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/fashion"))
    p.add_argument("--epochs", type=int, default=4, help="pre-training epochs at 'equal epochs' (default 4)")
    p.add_argument("--ft-seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds, 1%% labels")
    p.add_argument("--ft-few-epochs", type=int, default=6, help="fine-tuning epochs at 1%% (default 6)")
    p.add_argument("--few-copies", type=int, default=FEW_COPIES, help="passes per 1%% epoch (default 10)")
    p.add_argument("--ft-full-seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds, all labels")
    p.add_argument("--ft-full-epochs", type=int, default=3, help="fine-tuning epochs, all labels (default 3)")
    p.add_argument("--ft-long-seeds", type=int, nargs="*", default=[0],
                   help="seeds of the longer fine-tuning schedules, the convergence check (default 0; none: skip)")
    p.add_argument("--ft-few-long-epochs", type=int, default=18, help="the longer schedule at 1%% (default 18)")
    p.add_argument("--ft-full-long-epochs", type=int, default=12,
                   help="the longer schedule with all labels (default 12)")
    p.add_argument("--draws", type=int, default=5, help="draws of the few-label subsets (default 5)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--deadline", type=float, help="start no job after this many minutes; finish the running ones")
    p.add_argument("--stop", type=float, metavar="MINUTES",
                   help="after this many minutes interrupt the running jobs too (as SIGTERM to this script "
                        "does): pre-trainings and fine-tunings write a checkpoint and the next invocation "
                        "continues them; evaluations run again")
    p.add_argument("--only", nargs="+", help="run only jobs whose name starts with one of these")
    p.add_argument("--report", action="store_true", help="only write the tables and pictures from what has run")
    p.add_argument("--records", type=Path, help="seed the cache from committed records (missing files only)")
    p.add_argument("--save-records", type=Path, metavar="DIR",
                   help="copy the cache's small records and the pre-trained encoders (no full checkpoints) "
                        "to DIR, e.g. docs/bench/fashion")
    p.add_argument("--list", action="store_true", help="list the jobs, done or not, and exit")
    p.add_argument("--quick", action="store_true",
                   help="the plumbing: 200 train / 50 test images per class, 1 epoch everywhere, 1 seed")
    # internal: one frozen evaluation (a job of the runner)
    p.add_argument("--eval-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--eval-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--init-random", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw-pixels", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data, args.out = args.data.resolve(), args.out.resolve()
    if args.eval_one:
        evaluate_one(args)
        return 0
    if args.save_records:
        # the checkout that ran the evaluation jobs (their argv: python SCRIPT ...), this one or a copy
        roots = {str(Path(json.loads(p.read_text())["argv"][1]).parent.parent)
                 for p in (args.out / "jobs").glob("eval_*.json")}
        n = save_records(args.out, args.save_records, {str(args.out): "<out>", str(args.data): "<data>",
                                                       **{r: "<repo>" for r in roots | {str(REPO)}},
                                                       sys.executable: "python"})
        print(f"copied {n} record files from {args.out} to {args.save_records}")
        if (args.data / "train").is_dir():  # the jobs (and so their checkpoints) are named from the data
            n = save_encoders(args.out, args.save_records, build_jobs(args, Runner(args.out, 1, None, REPO)))
            print(f"wrote {n} pre-trained encoder(s) to {args.save_records / 'encoders'}")
        return 0
    if not args.report and not (args.data / "train").is_dir():
        code = subprocess.run([sys.executable, str(REPO / "scripts" / "make_fashion_folder.py"), str(args.data),
                               "--size", str(IMG)]).returncode
        if code:
            return code
    if args.quick:
        args.data = args.data.with_name(args.data.name + "_quick")
        if not args.report:
            quick_folder(args.data.with_name(args.data.name.removesuffix("_quick")), args.data, 200, 50)
        args.epochs, args.ft_few_epochs, args.ft_full_epochs, args.draws, args.few_copies = 1, 1, 1, 2, 1
        args.ft_seeds, args.ft_full_seeds, args.ft_long_seeds = args.ft_seeds[:1], args.ft_full_seeds[:1], []
    if args.records:
        n = seed_records(args.records, args.out, {"<out>": str(args.out), "<data>": str(args.data),
                                                  "<repo>": str(REPO)})
        print(f"seeded {n} record files from {args.records}")
    deadline = time.time() + 60 * args.deadline if args.deadline else None
    runner = Runner(args.out, args.jobs, deadline, REPO, stop=time.time() + 60 * args.stop if args.stop else None)
    if not args.report:
        jobs = build_jobs(args, runner)
        if args.records:
            n = seed_encoders(args.records, args.out, jobs)
            print(f"seeded {n} pre-trained encoder(s) from {args.records / 'encoders'}")
        if args.only:
            jobs = [j for j in jobs if any(j.name.startswith(o) for o in args.only)]
        if args.list:  # what `runner.run` would do: todo (never ran), rerun (its outputs are needed), done
            todo = {j.name for j in to_rerun(jobs, lambda name: runner.record_path(name).exists())}
            for j in jobs:
                print(f"{'done' if j.name not in todo else 'rerun' if runner.record(j.name) else 'todo'}  {j.name}")
            return 0
        runner.run(jobs)
    report(args, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
