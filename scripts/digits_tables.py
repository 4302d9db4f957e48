"""Every table of docs/benchmarks.md's digits sections, in one command.

    pip install scikit-learn                     # the data only
    python scripts/digits_tables.py --out runs/digits_tables            # CPU-hours: see docs/benchmarks.md
    python scripts/digits_tables.py --out runs/digits_quick --quick     # 1 seed, 1-2 epochs: 22 CPU-minutes, checks the plumbing

What it runs, on scikit-learn's handwritten digits (1797 real scans, 1437 train / 360 validation,
upscaled to 64 px; made by scripts/make_digits_folder.py if `--data` does not exist):

- pre-training (`ummae pretrain`, training images only, labels unused), seeds `--seeds`:
  UM-MAE / UM-EMAE / SimMIM on the tiny Swin, MAE / EMAE on the tiny ViT, MAE on timm's tiny Hiera.
  "Equal epochs": every method `--epochs` epochs. "Equal time": MAE and UM-MAE get as many
  epochs as cost the CPU time their EMAE counterpart took (ratio of the seed-0 runs' measured
  CPU time), Hiera as many as cost UM-MAE Swin's.
- frozen evaluation of every checkpoint, of the same architectures randomly initialised, and of
  raw pixels: k-NN (k 10, 20; cosine, T 0.07), linear probe (`ummae linprobe` protocol, final
  epoch, 3 probe seeds), few labels (10 per class, `--draws` random draws), and the selection
  probe (trained on 80% of the training images, scored on the other 20%: what choices use).
- fine-tuning (`ummae finetune`) of the UM-MAE and SimMIM Swin and of random init, `--ft-epochs`
  epochs: the paper's recipe (layer decay, drop path, RandAugment, random erasing, label smoothing)
  without mixup and cutmix, which on 1437 images slow convergence far beyond this budget; blr 2e-3.
  Final-epoch validation accuracy (no selection on the validation set) and the curve.
- a fine-tuning recipe for 1437 images: the recipes of `FT_RECIPES` (the paper's; a light one
  without RandAugment, erasing and flips; none) fine-tune the seed-0 UM-MAE Swin and random init
  on 80% of the training images for `--ft-select-epochs`, scored on the other 20%; the best mean
  final epoch is chosen, and fine-tunes UM-MAE, SimMIM and UM-EMAE Swin and random init, every
  seed, `--ft-long-epochs` epochs on the whole training set (the reported, converged table).
- the UM-MAE recipe search (`SEARCH`): crop scale, mask unit, width, depth, decoder, loss, secondary
  masking, lr, one at a time at `--epochs` on seed 0, judged by the selection probe alone; the
  winners are combined and pre-trained for the CPU time of `--search-epochs` base epochs, every
  seed, then evaluated like every other checkpoint.
- `ummae bench` of the six pre-training configurations (step time, peak memory, FLOPs).

Runs go `--jobs` at a time, each on one thread (`OMP_NUM_THREADS=1`), so that the runs compared
share the machine alike; every run's wall-clock and CPU time are recorded. Everything is cached under `--out`
(a run that finished is not run again), so an interrupted invocation continues where it stopped.
The results: `OUT/results.json` (every figure, raw) and `OUT/tables.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tables_runner import Job, Runner, fmt, plot_curves, summarise, val_curve

REPO = Path(__file__).resolve().parent.parent
UMMAE = [sys.executable, "-m", "ummae"]

# The digits settings shared by every pre-training run: 64 px inputs, batch 64, crops of at least
# 40% of the image (smaller crops of an 8x8 scan upscaled hold almost nothing), no periodic saves.
COMMON = ["--batch-size", "64", "--set", "data.img_size=64", "--set", "data.min_crop_scale=0.4",
          "--set", "train.save_every=0", "--no-progress", "--workers", "1", "--device", "cpu"]
# Per configuration: preset and overrides. Swin and ViT use 8 px units (an 8x8 unit grid); the
# ViT's patch is the unit. Hiera masks whole mask units of 8x8 tokens: patch stride 2 makes them
# 16 px, a 4x4 unit grid on 64 px (its own 32 px units would leave a 2x2 grid).
CONFIGS = {
    "ummae_swin": ("ummae_swin_demo", ["--set", "masking.unit_size=8"]),
    "emae_swin": ("emae_swin_demo", ["--set", "masking.unit_size=8"]),
    "simmim_swin": ("simmim_swin_demo", ["--set", "masking.unit_size=8"]),
    "mae_vit": ("mae_vit_demo", ["--set", "masking.unit_size=8", "--set", "model.patch_size=8"]),
    "emae_vit": ("emae_vit_demo", ["--set", "masking.unit_size=8", "--set", "model.patch_size=8"]),
    "mae_hiera": ("mae_hiera_demo", ["--set", "masking.unit_size=16", "--set", "model.patch_size=2"]),
}
# Equal time: {run that gets more epochs: the run whose CPU time it gets}.
EQUAL_TIME = {"ummae_swin": "emae_swin", "mae_vit": "emae_vit", "mae_hiera": "ummae_swin"}

# Fine-tuning recipes tried on a split of the training images (80/20, seed 0), one chosen by the
# mean final-epoch accuracy there of the UM-MAE Swin and random init, then run on the full
# training set for the reported table. All: blr 2e-3, no mixup/cutmix, label smoothing 0.1.
FT_RECIPES = {
    "paper": [],  # RandAugment m9, random erasing 0.25, crops of 8-100%, flips
    "light": ["--auto-augment", "none", "--reprob", "0", "--hflip", "0", "--min-crop-scale", "0.4"],
    "none": ["--no-augment"],  # centre crops only
}
FT_COMMON = ["--batch-size", "64", "--blr", "2e-3", "--mixup", "0", "--cutmix", "0", "--device", "cpu",
             "--workers", "1", "--no-progress"]

# The UM-MAE recipe search (issue: beat raw pixels on the linear probe): one knob at a time away
# from `ummae_swin` at `--epochs` epochs, seed 0, judged by the selection probe only. Per knob
# (group) the best variant is kept if it beats the base there; the kept ones are combined and the
# combination pre-trained for the CPU time of `--search-epochs` epochs of the base, 3 seeds.
SEARCH = {
    "crop": {"crop0.2": ["--set", "data.min_crop_scale=0.2"], "crop0.8": ["--set", "data.min_crop_scale=0.8"]},
    "unit": {"unit4": ["--set", "masking.unit_size=4"], "unit16": ["--set", "masking.unit_size=16"]},
    "width": {"dim64": ["--set", "model.embed_dim=64"]},
    "depth": {"depth2242": ["--set", "model.depths=[2,2,4,2]"]},
    "decoder": {"dec2x128": ["--set", "model.decoder_depth=2"], "dec1x64": ["--set", "model.decoder_dim=64"]},
    "loss": {"rawpixloss": ["--set", "model.norm_pix_loss=false"]},
    "secondary": {"sm0": ["--set", "masking.secondary_ratio=0"]},
    "lr": {"lr2e-3": ["--set", "optim.lr=0.002"], "lr5e-4": ["--set", "optim.lr=0.0005"]},
}


def pretrain_argv(cfg: str, out: Path, seed: int, epochs: int, data: Path) -> list[str]:
    preset, sets = CONFIGS[cfg]
    return [*UMMAE, "pretrain", "--preset", preset, "--data", str(data / "train"), "--out", str(out),
            "--seed", str(seed), "--epochs", str(epochs), *COMMON, *sets]


def finetune_argv(checkpoint: Path, data: Path, out: Path, epochs: int, seed: int, recipe: str,
                  random_init: bool, split: bool) -> list[str]:
    """`ummae finetune` of the digits; `split`: on 80% of the training images, scored on the other 20%."""
    where = ["--val-fraction", "0.2"] if split else ["--val-data", str(data / "val")]
    return [*UMMAE, "finetune", "--checkpoint", str(checkpoint), "--data", str(data / "train"), *where,
            "--out", str(out), "--epochs", str(epochs), "--warmup-epochs", str(max(1, epochs // 10)),
            "--seed", str(seed), *FT_COMMON, *FT_RECIPES[recipe]] + (["--init-random"] if random_init else [])


FT_SELECT_ARMS = ("ummae_swin", "random")  # the encoders the fine-tuning recipe is chosen on


def chosen_ft_recipe(out: Path) -> tuple[str, dict]:
    """The fine-tuning recipe with the best mean final-epoch accuracy on the training split."""
    scores = {r: statistics.fmean(val_curve(out / "runs" / f"ftsel_{r}_{arm}")[-1] for arm in FT_SELECT_ARMS)
              for r in FT_RECIPES}
    return max(scores, key=scores.get), scores


def select_score(out: Path, name: str) -> float:
    return json.loads((out / "eval" / f"{name}.json").read_text())["select_linprobe_top1"]


def chosen_search(out: Path, E: int, s0: int) -> tuple[list[str], list[str], dict]:
    """(variant names, their --set arguments, every variant's selection score) of the combination."""
    base = select_score(out, f"pre_ummae_swin_e{E}_s{s0}")
    scores = {"base": base}
    names, sets = [], []
    for group in SEARCH.values():
        for v in group:
            scores[v] = select_score(out, f"search_{v}_e{E}_s{s0}")
        best = max(group, key=lambda v: scores[v])
        if scores[best] > base:
            names.append(best)
            sets += group[best]
    return names, sets, scores


def build_jobs(args, runner: Runner) -> list[Job]:
    data, out, E = args.data, args.out, args.epochs
    me = [sys.executable, str(Path(__file__).resolve())]
    jobs: list[Job] = []

    def run_dir(name: str) -> Path:
        return out / "runs" / name

    def equal_time_epochs(cfg: str) -> int:
        # Epochs of `cfg` that cost as much as `--epochs` of its partner, from the seed-0 runs'
        # measured CPU time (both at --epochs, one thread each, so the ratio is per epoch; CPU
        # time, unlike wall-clock, does not grow when other programs share the machine).
        partner, s0 = EQUAL_TIME[cfg], args.seeds[0]
        ratio = (runner.record(f"pre_{partner}_e{E}_s{s0}")["cpu_seconds"]
                 / runner.record(f"pre_{cfg}_e{E}_s{s0}")["cpu_seconds"])
        return max(1, round(E * ratio))

    def eval_job(name: str, source: list[str], deps: list[str]) -> Job:
        argv = [*me, "--eval-one", *source, "--eval-json", str(out / "eval" / f"{name}.json"),
                "--data", str(data), "--draws", str(args.draws)] + (["--quick"] if args.quick else [])
        return Job(f"eval_{name}", argv, deps)

    # 1. pre-training at equal epochs, seed-major (a complete seed first), EMAE runs first
    order = ["emae_swin", "ummae_swin", "emae_vit", "mae_vit", "simmim_swin", "mae_hiera"]
    for s in args.seeds:
        for cfg in order:
            if cfg == "mae_hiera" and s != args.seeds[0]:
                continue  # Hiera at equal epochs: one seed, to calibrate its equal-time budget
            name = f"pre_{cfg}_e{E}_s{s}"
            # outputs: a cache seeded from records elsewhere re-runs it when a pending job needs the checkpoint
            jobs.append(Job(name, pretrain_argv(cfg, run_dir(name), s, E, data),
                            outputs=[run_dir(name) / "checkpoint.pt"]))
            jobs.append(eval_job(name, ["--checkpoint", str(run_dir(name) / "checkpoint.pt")], [name]))
        # 2. equal time: the cheaper method gets the CPU time its partner took (seed-0 ratio)
        for cfg, partner in EQUAL_TIME.items():
            calib = [f"pre_{cfg}_e{E}_s{args.seeds[0]}", f"pre_{partner}_e{E}_s{args.seeds[0]}"]
            name = f"pre_{cfg}_eqtime_s{s}"
            jobs.append(Job(name, lambda cfg=cfg, name=name, s=s: pretrain_argv(
                cfg, run_dir(name), s, equal_time_epochs(cfg), data), calib))
            jobs.append(eval_job(name, ["--checkpoint", str(run_dir(name) / "checkpoint.pt")], [name]))
    # 3. baselines: random init of each architecture (seeds), raw pixels
    for s in args.seeds:
        for cfg in ("ummae_swin", "mae_vit", "mae_hiera"):
            ref = f"pre_{cfg}_e{E}_s{args.seeds[0]}"
            source = ["--checkpoint", str(run_dir(ref) / "checkpoint.pt"), "--init-random", "--seed", str(s)]
            jobs.append(eval_job(f"random_{cfg.split('_')[1]}_s{s}", source, [ref]))
    jobs.append(eval_job("raw_pixels", ["--raw-pixels"], []))
    # 4. the cost of one step of each configuration (interleaved in one process)
    for arch, cfgs in (("swin", ["ummae_swin", "simmim_swin", "emae_swin"]), ("vit", ["mae_vit", "emae_vit"]),
                       ("hiera", ["mae_hiera"])):
        sets = CONFIGS[cfgs[0]][1]
        jobs.append(Job(f"bench_{arch}", [*UMMAE, "bench", *[CONFIGS[c][0] for c in cfgs], "--batch-size", "64",
                                          "--steps", "2" if args.quick else "5", "--warmup", "1", "--device", "cpu",
                                          "--set", "data.img_size=64", *sets,
                                          "--json", str(out / "bench" / f"{arch}.json")]))
    # 5. fine-tuning: UM-MAE vs SimMIM Swin vs random init, to the end of a long schedule
    for s in args.seeds:
        for src in ("ummae_swin", "simmim_swin", "random"):
            ref = f"pre_{'ummae_swin' if src == 'random' else src}_e{E}_s{s}"
            name = f"ft_{src}_s{s}"
            jobs.append(Job(name, finetune_argv(run_dir(ref) / "checkpoint.pt", data, run_dir(name), args.ft_epochs,
                                                s, "paper", src == "random", False), [ref]))
    # 6. a fine-tuning recipe for 1437 images, chosen on a split of the training images
    s0 = args.seeds[0]
    select_jobs = []
    for recipe in FT_RECIPES:
        for arm in FT_SELECT_ARMS:
            ref = f"pre_ummae_swin_e{E}_s{s0}"
            name = f"ftsel_{recipe}_{arm}"
            select_jobs.append(name)
            jobs.append(Job(name, finetune_argv(run_dir(ref) / "checkpoint.pt", data, run_dir(name),
                                                args.ft_select_epochs, s0, recipe, arm == "random", True), [ref]))
    # 7. ... and run with it to convergence: UM-MAE vs SimMIM vs UM-EMAE Swin vs random init, all seeds
    for s in args.seeds:
        for src in ("ummae_swin", "simmim_swin", "emae_swin", "random"):
            ref = f"pre_{'ummae_swin' if src == 'random' else src}_e{E}_s{s}"
            name = f"ftlong_{src}_s{s}"
            jobs.append(Job(name, lambda ref=ref, name=name, s=s, src=src: finetune_argv(
                run_dir(ref) / "checkpoint.pt", data, run_dir(name), args.ft_long_epochs, s,
                chosen_ft_recipe(out)[0], src == "random", False), [ref, *select_jobs]))
    # 8. the UM-MAE recipe search: one knob at a time, seed 0, judged on the selection probe
    base = f"pre_ummae_swin_e{E}_s{s0}"
    search_evals = [f"eval_{base}"]
    for group in SEARCH.values():
        for v, sets in group.items():
            name = f"search_{v}_e{E}_s{s0}"
            argv = pretrain_argv("ummae_swin", run_dir(name), s0, E, data) + sets
            jobs.append(Job(name, argv))
            jobs.append(eval_job(name, ["--checkpoint", str(run_dir(name) / "checkpoint.pt")], [name]))
            search_evals.append(f"eval_{name}")
    # 9. the kept knobs combined: at --epochs (seed 0: its cost per epoch and a selection check),
    # then for the CPU time of --search-epochs epochs of the base recipe, every seed
    combo = f"search_combined_e{E}_s{s0}"
    jobs.append(Job(combo, lambda: pretrain_argv("ummae_swin", run_dir(combo), s0, E, data)
                    + chosen_search(out, E, s0)[1], search_evals))
    jobs.append(eval_job(combo, ["--checkpoint", str(run_dir(combo) / "checkpoint.pt")], [combo]))

    def combined_epochs() -> int:
        ratio = runner.record(base)["cpu_seconds"] / runner.record(combo)["cpu_seconds"]
        return max(1, round(args.search_epochs * ratio))

    for s in args.seeds:
        name = f"search_combined_long_s{s}"
        jobs.append(Job(name, lambda name=name, s=s: pretrain_argv("ummae_swin", run_dir(name), s, combined_epochs(),
                                                                   data) + chosen_search(out, E, s0)[1],
                        [combo, f"eval_{combo}"]))
        jobs.append(eval_job(name, ["--checkpoint", str(run_dir(name) / "checkpoint.pt")], [name]))
    return jobs


# ----------------------------------------------------------------------------------------------
# frozen evaluation of one feature source (run as a job: --eval-one)

def evaluate_one(args) -> None:
    import torch

    torch.set_num_threads(1)
    from ummae.evaluate.features import labeled_features, raw_pixel_features
    from ummae.evaluate.few_label import few_label, summarize
    from ummae.evaluate.knn import knn_evaluate
    from ummae.evaluate.linprobe import linear_probe

    train, val = args.data / "train", args.data / "val"
    if args.raw_pixels:
        f = raw_pixel_features(train, val, img_size=64)
    else:
        f = labeled_features(args.checkpoint, train, val, device="cpu", init_random=args.init_random,
                             seed=args.seed)
    n = len(f.classes)
    probe_epochs = 10 if args.quick else 90  # `ummae linprobe`'s protocol: 90 epochs, final epoch

    def knn_top1(features, labels, k=10):
        return knn_evaluate(features, labels, f.val_features, f.val_labels, [k], 0.07, num_classes=n)[k]["top1"]

    def probe_top1(features, labels, seed=0):
        return linear_probe(features, labels, f.val_features, f.val_labels, num_classes=n, epochs=probe_epochs,
                            seed=seed).final["top1"]

    knn = {str(k): knn_top1(f.train_features, f.train_labels, k) for k in (10, 20)}
    probes = [probe_top1(f.train_features, f.train_labels, s) for s in (0, 1, 2)]
    few = {}  # 10 labeled images per class, `--draws` stratified draws (`ummae knn --labels-per-class`)
    for name, evaluate in (("knn", knn_top1), ("linprobe", probe_top1)):
        values = [d.result for d in few_label(f.train_features, f.train_labels, 10, args.draws, 0, evaluate, f.classes)]
        few[name] = {**summarize(values), "values": values}
    # The recipe search's criterion: the same probe, trained on 80% of the TRAINING images and
    # scored on the other 20% (stratified, seed 0), so that choosing a recipe never looks at the
    # reported validation set. (Baselines need no choosing: random init skips it.)
    select = None
    if not args.init_random:
        if args.raw_pixels:
            g = raw_pixel_features(train, None, val_fraction=0.2, img_size=64)
        else:
            g = labeled_features(args.checkpoint, train, None, val_fraction=0.2, device="cpu")
        select = linear_probe(g.train_features, g.train_labels, g.val_features, g.val_labels, num_classes=n,
                              epochs=probe_epochs, seed=0).final["top1"]
    record = {"source": "raw_pixels" if args.raw_pixels else str(args.checkpoint), "init_random": args.init_random,
              "select_linprobe_top1": select,
              "seed": args.seed, "feature_dim": f.feature_dim, "knn": knn,
              "linprobe_final_top1": probes, "few_label_10": few}
    args.eval_json.parent.mkdir(parents=True, exist_ok=True)
    args.eval_json.write_text(json.dumps(record, indent=2))


# ----------------------------------------------------------------------------------------------
# tables

def report(args, runner: Runner) -> None:
    out, E = args.out, args.epochs

    def evals(prefix: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((out / "eval").glob(f"{prefix}_s*.json"))]

    def row(prefix: str) -> dict:
        es = evals(prefix)
        if not es:
            return {}
        recs = [runner.record(f"{prefix}_s{s}") for s in args.seeds]
        seconds = [r["seconds"] for r in recs if r]
        cpu = [r["cpu_seconds"] for r in recs if r]
        epochs = [int(r["argv"][r["argv"].index("--epochs") + 1]) for r in recs if r]
        return {"runs": len(es),
                "epochs": sorted(set(epochs)),
                "wall_clock_s": summarise(seconds) if seconds else None,
                "cpu_s": summarise(cpu) if cpu else None,
                "knn10": summarise([e["knn"]["10"] for e in es]),
                "knn20": summarise([e["knn"]["20"] for e in es]),
                # probe seeds averaged per run, then summarised over the runs
                "linprobe": summarise([statistics.fmean(e["linprobe_final_top1"]) for e in es]),
                "select_linprobe": (summarise([e["select_linprobe_top1"] for e in es])
                                    if es[0].get("select_linprobe_top1") is not None else None),
                "few10_knn": summarise([e["few_label_10"]["knn"]["mean"] for e in es]),
                "few10_linprobe": summarise([e["few_label_10"]["linprobe"]["mean"] for e in es])}

    rows = {}
    for cfg in CONFIGS:
        rows[f"{cfg} ({E} ep)"] = row(f"pre_{cfg}_e{E}")
        if cfg in EQUAL_TIME:
            rows[f"{cfg} (equal time to {EQUAL_TIME[cfg]})"] = row(f"pre_{cfg}_eqtime")
    for arch in ("swin", "vit", "hiera"):
        rows[f"{arch}, random init"] = row(f"random_{arch}")
    raw = out / "eval" / "raw_pixels.json"
    if raw.exists():
        e = json.loads(raw.read_text())
        rows["raw pixels"] = {"runs": 1, "knn10": summarise([e["knn"]["10"]]), "knn20": summarise([e["knn"]["20"]]),
                              "select_linprobe": summarise([e["select_linprobe_top1"]]),
                              "linprobe": summarise(e["linprobe_final_top1"]),
                              "few10_knn": summarise(e["few_label_10"]["knn"]["values"]),
                              "few10_linprobe": summarise(e["few_label_10"]["linprobe"]["values"])}
    def finetune_runs(prefix: str) -> dict:
        table = {}
        for src in ("ummae_swin", "simmim_swin", "emae_swin", "random"):
            curves = [val_curve(out / "runs" / f"{prefix}_{src}_s{s}") for s in args.seeds
                      if runner.record(f"{prefix}_{src}_s{s}")]
            if curves:
                table[src] = {"final_top1": summarise([c[-1] for c in curves]), "curves": curves,
                              "cpu_s": summarise([runner.record(f"{prefix}_{src}_s{s}")["cpu_seconds"]
                                                  for s in args.seeds if runner.record(f"{prefix}_{src}_s{s}")])}
        return table

    finetune, finetune_long = finetune_runs("ft"), finetune_runs("ftlong")

    ft_selection = {r: {arm: val_curve(out / "runs" / f"ftsel_{r}_{arm}") for arm in FT_SELECT_ARMS
                        if runner.record(f"ftsel_{r}_{arm}")} for r in FT_RECIPES}
    chosen = chosen_ft_recipe(out)[0] if all(len(v) == len(FT_SELECT_ARMS) for v in ft_selection.values()) else None
    # the UM-MAE recipe search
    s0 = args.seeds[0]
    search = None
    if all((out / "eval" / f"search_{v}_e{E}_s{s0}.json").exists() for g in SEARCH.values() for v in g):
        kept, _, scores = chosen_search(out, E, s0)
        search = {"scores": scores, "kept": kept,
                  "cpu_s": {v: runner.record(f"search_{v}_e{E}_s{s0}")["cpu_seconds"]
                            for g in SEARCH.values() for v in g},
                  "base_cpu_s": runner.record(f"pre_ummae_swin_e{E}_s{s0}")["cpu_seconds"]}
        combo = out / "eval" / f"search_combined_e{E}_s{s0}.json"
        if combo.exists():
            search["combined_select"] = json.loads(combo.read_text())["select_linprobe_top1"]
            search["combined_cpu_s"] = runner.record(f"search_combined_e{E}_s{s0}")["cpu_seconds"]
        rows[f"ummae_swin, search's combined recipe ({', '.join(kept) or 'base'}), "
             f"CPU time of {args.search_epochs} base epochs"] = row("search_combined_long")
    bench = {arch: json.loads((out / "bench" / f"{arch}.json").read_text())
             for arch in ("swin", "vit", "hiera") if (out / "bench" / f"{arch}.json").exists()}
    results = {"epochs": E, "seeds": args.seeds, "rows": rows, "finetune": finetune,
               "finetune_recipe_selection": {"curves": ft_selection, "chosen": chosen},
               "finetune_long": finetune_long, "search": search, "bench": bench}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    lines = ["| validation top-1 (%), mean (min-max) over seeds | runs | epochs | pre-training CPU time (s) "
             "| wall-clock (s) "
             "| k-NN k=10 | k-NN k=20 | linear probe | 10 labels/class, k-NN | 10 labels/class, linear "
             "| linear probe on a split of train (selection) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if not r:
            lines.append(f"| {name} | not run | | | | | | | | | |")
            continue
        wall = fmt(r.get("wall_clock_s")) if r.get("wall_clock_s") else "-"
        cpu = fmt(r.get("cpu_s")) if r.get("cpu_s") else "-"
        lines.append(f"| {name} | {r['runs']} | {','.join(map(str, r.get('epochs', []))) or '-'} | {cpu} | {wall} | "
                     f"{fmt(r['knn10'])} | {fmt(r['knn20'])} | {fmt(r['linprobe'])} | {fmt(r['few10_knn'])} | "
                     f"{fmt(r['few10_linprobe'])} | {fmt(r['select_linprobe']) if r.get('select_linprobe') else '-'} |")
    for title, table in ((f"paper recipe without mixing, {args.ft_epochs} epochs", finetune),
                         (f"recipe chosen on the training split ({chosen}), {args.ft_long_epochs} epochs", finetune_long)):
        lines += ["", f"| fine-tuning, {title}: final epoch | val top-1 (%), mean (min-max) | runs | CPU time (s) "
                      f"| mean curve, every 5th epoch |", "|---|---|---|---|---|"]
        for src, r in table.items():
            n = min(len(c) for c in r["curves"])
            mean = [statistics.fmean(c[e] for c in r["curves"]) for e in range(n)]
            curve = " ".join(f"{mean[e]:.1f}" for e in range(4, n, 5))
            lines.append(f"| {src} | {fmt(r['final_top1'])} | {r['final_top1']['n']} | {fmt(r['cpu_s'])} | {curve} |")
    if any(ft_selection.values()):
        lines += ["", f"| fine-tuning recipe (80/20 split of train, seed 0, {args.ft_select_epochs} epochs): "
                      "final-epoch top-1 on the 20% | " + " | ".join(FT_SELECT_ARMS) + " | mean |", "|---|---|---|---|"]
        for r, arms in ft_selection.items():
            finals = [arms[a][-1] for a in FT_SELECT_ARMS if a in arms]
            lines.append(f"| {r}{' (chosen)' if r == chosen else ''} | "
                         + " | ".join(f"{arms[a][-1]:.1f}" if a in arms else "not run" for a in FT_SELECT_ARMS)
                         + f" | {statistics.fmean(finals):.1f} |" if finals else f"| {r} | not run | | |")
    if search:
        lines += ["", f"| UM-MAE search ({E} epochs, seed 0): variant | selection probe (%) | CPU time (s) | kept |",
                  "|---|---|---|---|", f"| base (ummae_swin) | {search['scores']['base']:.1f} | "
                  f"{search['base_cpu_s']:.0f} | |"]
        for g, variants in SEARCH.items():
            for v in variants:
                lines.append(f"| {g}: {v} | {search['scores'][v]:.1f} | {search['cpu_s'][v]:.0f} | "
                             f"{'yes' if v in search['kept'] else ''} |")
        if "combined_select" in search:
            lines.append(f"| combined ({', '.join(search['kept']) or 'base'}) | {search['combined_select']:.1f} | "
                         f"{search['combined_cpu_s']:.0f} | |")
    if finetune:
        plot_curves(finetune, out / "finetune_curves_paper.png")
    if finetune_long:
        plot_curves(finetune_long, out / "finetune_curves.png")
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/digits"), help="digits folder (made if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/digits_tables"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20, help="pre-training epochs at 'equal epochs' (default 20)")
    p.add_argument("--ft-epochs", type=int, default=30, help="fine-tuning epochs (default 30)")
    p.add_argument("--ft-select-epochs", type=int, default=30,
                   help="fine-tuning epochs of the recipe selection on a split of train (default 30)")
    p.add_argument("--ft-long-epochs", type=int, default=50,
                   help="fine-tuning epochs with the chosen recipe (default 50)")
    p.add_argument("--search-epochs", type=int, default=100,
                   help="the UM-MAE search's combined recipe gets the CPU time of this many base epochs (default 100)")
    p.add_argument("--draws", type=int, default=5, help="random draws of the 10-labels-per-class subsets")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--deadline", type=float, help="start no job after this many minutes; finish the running ones")
    p.add_argument("--only", nargs="+", help="run only jobs whose name starts with one of these")
    p.add_argument("--report", action="store_true", help="only write the tables from what has run")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 1 pre-training epoch, 2 fine-tuning and long search epochs")
    # internal: one frozen evaluation (a job of the runner)
    p.add_argument("--eval-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--eval-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--init-random", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw-pixels", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    if args.eval_one:
        return evaluate_one(args)
    if args.quick:
        args.seeds, args.epochs, args.ft_epochs, args.draws = args.seeds[:1], 1, 2, 2
        args.ft_select_epochs, args.ft_long_epochs, args.search_epochs = 2, 2, 2
    if not (args.data / "train").is_dir():
        made = subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits_folder.py"), str(args.data),
                               "--size", "64"])
        if made.returncode:  # it said why in one line (e.g. scikit-learn missing)
            sys.exit(made.returncode)
    deadline = time.time() + 60 * args.deadline if args.deadline else None
    runner = Runner(args.out, args.jobs, deadline, REPO)
    if not args.report:
        jobs = build_jobs(args, runner)
        if args.only:
            jobs = [j for j in jobs if any(j.name.startswith(o) for o in args.only)]
        runner.run(jobs)
    report(args, runner)


if __name__ == "__main__":
    main()
