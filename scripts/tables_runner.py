"""The machinery the benchmark-table scripts share (`digits_tables.py`, `fashion_tables.py`).

- `Job` / `Runner`: subprocesses run `jobs` at a time in list order, each job after its deps,
  each finished job's record (argv, wall-clock, CPU time and peak memory from `wait4`) cached as
  `OUT/jobs/<name>.json`, so an interrupted grid continues where it stopped. A job may name the
  files it leaves for later jobs (`outputs`, e.g. a checkpoint): when a job that still has to run
  needs one that is gone (a cache seeded from committed records on another machine), the job that
  made it runs again.
- `seed_records` / `save_records`: the small JSON records of a cache (job records, evaluations,
  metrics curves, tables; never checkpoints) copied between a cache and a committed folder.
- `save_encoders` / `seed_encoders`: the one exception, the encoder of a finished pre-training
  (weights and configuration, no decoder or optimizer: a few MB) that later jobs start from, so a
  cache seeded on another machine need not run the pre-training again.
- `summarise`, `fmt`, `val_curve`, `plot_curves`: the numbers and pictures of the tables.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Job:
    """One subprocess; `argv` may be computed when the job starts (from finished jobs' records).

    `outputs`: files the job leaves that jobs depending on it read (checkpoints). The folders
    holding them are the job's own: it starts with them empty (an old one is moved to
    `<folder>.replaced`), so a re-run or a restarted killed run does not append to old curves.
    """

    name: str
    argv: list[str] | Callable[[], list[str]]
    deps: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


def to_rerun(jobs: list[Job], finished: Callable[[str], bool]) -> list[Job]:
    """The jobs to run: those not finished, and finished ones whose `outputs` a job to run needs
    but are missing (transitively: a re-run job's own deps must have their outputs too).

    Returns them in `jobs`' order.
    """
    by_name = {j.name: j for j in jobs}
    todo = {j.name for j in jobs if not finished(j.name)}
    frontier = list(todo)
    while frontier:
        for dep in by_name[frontier.pop()].deps:
            d = by_name.get(dep)
            if d is not None and d.name not in todo and not all(Path(p).exists() for p in d.outputs):
                todo.add(d.name)
                frontier.append(d.name)
    return [j for j in jobs if j.name in todo]


class Runner:
    """Runs jobs `jobs` at a time in list order (a job waits for its deps), caching each record."""

    def __init__(self, out: Path, jobs: int, deadline: float | None, cwd: Path,
                 subdirs: tuple[str, ...] = ("jobs", "bench", "eval")):
        self.out, self.slots, self.deadline, self.cwd = out, jobs, deadline, cwd
        for sub in subdirs:
            (out / sub).mkdir(parents=True, exist_ok=True)

    def record_path(self, name: str) -> Path:
        return self.out / "jobs" / f"{name}.json"

    def record(self, name: str) -> dict | None:
        path = self.record_path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def _log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def run(self, jobs: list[Job]) -> None:
        pending = to_rerun(jobs, lambda name: self.record_path(name).exists())
        for j in pending:
            if self.record_path(j.name).exists():  # its outputs are gone: this run replaces the record
                self._log(f"re-run {j.name}: a job still to run needs {', '.join(map(str, j.outputs))}")
                self.record_path(j.name).rename(self.record_path(j.name).with_suffix(".replaced.json"))
        running: dict[str, tuple[subprocess.Popen, float, list[str]]] = {}
        failed: set[str] = set()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        while pending or running:
            for name, (proc, start, argv) in list(running.items()):
                # wait4, not Popen.poll: it also returns the CPU time the run used (its data
                # workers included), which other programs on the machine do not inflate, and the
                # peak resident memory of the largest of its processes (ru_maxrss, KiB on Linux).
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == 0:
                    continue
                del running[name]
                proc.returncode = os.waitstatus_to_exitcode(status)
                seconds = time.time() - start
                if proc.returncode != 0:
                    failed.add(name)
                    self._log(f"FAILED {name} (exit {proc.returncode}); see {self.out / 'jobs' / (name + '.log')}")
                    continue
                cpu = usage.ru_utime + usage.ru_stime
                self.record_path(name).write_text(json.dumps({"argv": argv, "seconds": seconds, "cpu_seconds": cpu,
                                                              "max_rss_mib": usage.ru_maxrss / 1024}))
                self._log(f"done {name} in {seconds:.0f} s ({cpu:.0f} s CPU)")
            blocked = [j for j in pending if any(d in failed for d in j.deps)]
            for j in blocked:
                pending.remove(j)
                failed.add(j.name)
                print(f"skipped {j.name}: a run it needs failed", flush=True)
            late = self.deadline is not None and time.time() > self.deadline
            while not late and len(running) < self.slots:
                ready = next((j for j in pending if all(self.record(d) for d in j.deps)), None)
                if ready is None:
                    break
                pending.remove(ready)
                for folder in {Path(o).parent for o in ready.outputs if Path(o).parent.exists()}:
                    aside = folder.with_name(folder.name + ".replaced")
                    shutil.rmtree(aside, ignore_errors=True)
                    folder.rename(aside)
                argv = ready.argv() if callable(ready.argv) else ready.argv
                log = open(self.out / "jobs" / f"{ready.name}.log", "w")
                running[ready.name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                        env=env, cwd=self.cwd), time.time(), argv)
                self._log(f"start {ready.name}")
            if late and not running:
                print(f"deadline reached: {len(pending)} job(s) not started", flush=True)
                return
            if not running and pending:  # nothing can start: deps that are neither done nor pending
                print(f"{len(pending)} job(s) wait for runs that are not in this invocation "
                      f"({', '.join(j.name for j in pending[:3])}...)", flush=True)
                return
            time.sleep(1)


# ----------------------------------------------------------------------------------------------
# records: a cache's small JSON files <-> a committed folder

# What a cache keeps that is small and is what the tables are made of (no checkpoints, no logs).
RECORD_GLOBS = ("jobs/*.json", "eval/*.json", "bench/*.json", "runs/*/metrics.jsonl", "runs/*/config.yaml",
                "results.json", "tables.md", "*.png")


TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".md")


def _copy(src: Path, target: Path, replace: dict[str, str]) -> None:
    """Copy one record; in text records every key of `replace` (longest first) becomes its value."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix not in TEXT_SUFFIXES:
        shutil.copy2(src, target)
        return
    text = src.read_text()
    for old in sorted(replace, key=len, reverse=True):
        text = text.replace(old, replace[old])
    target.write_text(text)


def save_records(out: Path, dest: Path, replace: dict[str, str] | None = None) -> int:
    """Copy the cache's records (`RECORD_GLOBS`) to `dest`; returns how many files. A run folder's
    files only once its job has finished (`jobs/<name>.json`): a running one's curve is partial.

    `replace`: machine paths -> placeholders in the copies (e.g. {str(out): "<out>"}), so that the
    committed records name no machine's folders; `seed_records` puts them back.
    """
    n = 0
    for pattern in RECORD_GLOBS:
        for src in sorted(out.glob(pattern)):
            rel = src.relative_to(out)
            if src.name.endswith(".replaced.json") or (rel.parts[0] == "runs" and not
                                                       (out / "jobs" / f"{rel.parts[1]}.json").exists()):
                continue
            _copy(src, dest / src.relative_to(out), replace or {})
            n += 1
    return n


def seed_records(records: Path, out: Path, replace: dict[str, str] | None = None) -> int:
    """Copy committed records into a cache where it has none of its own; returns how many files.

    A record already in the cache wins (it is the newer run); job records whose checkpoints are
    not in the cache make `Runner.run` re-run their jobs when a pending job needs them.
    `replace`: placeholders -> this machine's paths (the inverse of `save_records`').
    """
    n = 0
    for pattern in RECORD_GLOBS:
        for src in sorted(records.glob(pattern)):
            target = out / src.relative_to(records)
            if target.exists():
                continue
            _copy(src, target, replace or {})
            n += 1
    return n


ENCODERS = "encoders"  # DEST/encoders/<job>.pt


def save_encoders(out: Path, dest: Path, jobs: list[Job]) -> int:
    """For every finished job with one `.pt` output (a pre-training checkpoint), write its encoder
    to `dest/encoders/<job>.pt`: the configuration and the `encoder.` weights, which is all that
    fine-tuning and frozen evaluation read. Returns how many files were written."""
    from ummae.checkpoint_file import load_checkpoint, save_checkpoint

    n = 0
    for j in jobs:
        if len(j.outputs) != 1 or Path(j.outputs[0]).suffix != ".pt" or not Path(j.outputs[0]).exists() \
                or not (out / "jobs" / f"{j.name}.json").exists():
            continue
        target = dest / ENCODERS / f"{j.name}.pt"
        if target.exists() and target.stat().st_mtime >= Path(j.outputs[0]).stat().st_mtime:
            continue
        state = load_checkpoint(j.outputs[0])
        save_checkpoint(target, {"config": state["config"],
                                 "model": {k: v for k, v in state["model"].items() if k.startswith("encoder.")}})
        n += 1
    return n


def seed_encoders(records: Path, out: Path, jobs: list[Job]) -> int:
    """Put committed encoders (`save_encoders`) where their jobs' outputs belong, for the jobs whose
    record is in the cache and whose output is missing; returns how many."""
    n = 0
    for j in jobs:
        src = records / ENCODERS / f"{j.name}.pt"
        if len(j.outputs) != 1 or not src.exists() or Path(j.outputs[0]).exists() \
                or not (out / "jobs" / f"{j.name}.json").exists():
            continue
        Path(j.outputs[0]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, j.outputs[0])
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# numbers and pictures

def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def fmt(s: dict | None) -> str:
    if not s:
        return "not run"
    if s["n"] == 1:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def read_metrics(run: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl ([] when it has none)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def val_curve(run: Path) -> list[float]:
    """Validation top-1 per epoch of a fine-tuning run."""
    return [x["val_top1"] for x in read_metrics(run) if "val_top1" in x]


def plot_curves(finetune: dict, path: Path, xlabel: str = "fine-tuning epoch",
                ylabel: str = "validation top-1 (%)") -> None:
    """Validation top-1 per fine-tuning epoch: the mean over seeds, the band from min to max.

    `finetune`: {arm: {"curves": [[top-1 per epoch] per seed]}}.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for src, r in finetune.items():
        n = min(len(c) for c in r["curves"])
        epochs = range(1, n + 1)
        per_epoch = [[c[e] for c in r["curves"]] for e in range(n)]
        ax.plot(epochs, [statistics.fmean(v) for v in per_epoch], label=f"{src} ({len(r['curves'])} seeds)")
        ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
