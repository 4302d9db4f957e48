"""The machinery the benchmark-table scripts share (`digits_tables.py`, `fashion_tables.py`).

- `Job` / `Runner`: subprocesses run `jobs` at a time in list order, each job after its deps,
  each finished job's record (argv, wall-clock, CPU time and peak memory from `wait4`) cached as
  `OUT/jobs/<name>.json`, so an interrupted grid continues where it stopped. A job may name the
  files it leaves for later jobs (`outputs`, e.g. a checkpoint): when a job that still has to run
  needs one that is gone (a cache seeded from committed records on another machine), the job that
  made it runs again.
- A job that can continue (`resume`: the arguments that make its command pick up its last
  checkpoint, `--resume auto` for ummae's) survives an interruption: SIGTERM to the runner, or its
  `stop` time, sends SIGTERM to the running jobs; ummae's commands finish the step, write a
  checkpoint and exit 143, and the runner keeps what they had spent in `OUT/jobs/<name>.partial.json`.
  The next invocation, in this session or the next, continues them from the checkpoint and their
  record adds up the pieces (CPU time summed, `pieces` counted). A grid whose runs are longer than
  a session's time so still finishes, with costs that count every piece.
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
import signal
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
    resume: list[str] = field(default_factory=list)  # appended to argv to continue an interrupted run


# Exit statuses of a run stopped by a signal after writing its checkpoint: 128 + SIGINT, 128 + SIGTERM.
STOPPED_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def can_continue(job: Job) -> bool:
    """Whether `job` can pick up where it stopped: it takes `resume` arguments and a folder of its
    outputs holds a periodic ummae checkpoint (`checkpoints/step-*.pt`) to continue from."""
    from ummae.engine.checkpoint import list_step_checkpoints

    return bool(job.resume) and any(list_step_checkpoints(Path(o).parent) for o in job.outputs)


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

    poll_seconds = 1.0  # how often it looks at its jobs (the tests' jobs take milliseconds)

    def __init__(self, out: Path, jobs: int, deadline: float | None, cwd: Path,
                 subdirs: tuple[str, ...] = ("jobs", "bench", "eval"), stop: float | None = None):
        """`deadline`: start no job after this time (`time.time()`); `stop`: at this time, also
        interrupt the running ones (resumable ones keep their checkpoint for the next invocation)."""
        self.out, self.slots, self.deadline, self.cwd, self.stop = out, jobs, deadline, cwd, stop
        for sub in subdirs:
            (out / sub).mkdir(parents=True, exist_ok=True)

    def record_path(self, name: str) -> Path:
        return self.out / "jobs" / f"{name}.json"

    def record(self, name: str) -> dict | None:
        path = self.record_path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def partial_path(self, name: str) -> Path:
        return self.out / "jobs" / f"{name}.partial.json"

    def partial(self, name: str) -> dict | None:
        """What the earlier pieces of an interrupted, resumable job spent (None: it has none)."""
        path = self.partial_path(name)
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
        stopped: set[str] = set()  # interrupted this invocation: continued by the next one
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        by_name = {j.name: j for j in jobs}
        signalled: list[int] = []

        def on_signal(signum, frame):  # SIGTERM/SIGINT to the runner: interrupt the jobs, start none
            signalled.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._run(pending, running, failed, stopped, env, by_name, signalled)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run(self, pending, running, failed, stopped, env, by_name, signalled) -> None:
        interrupting = False
        while pending or running:
            if not interrupting and (signalled or (self.stop is not None and time.time() > self.stop)):
                interrupting = True
                why = f"signal {signal.Signals(signalled[0]).name}" if signalled else "stop time"
                self._log(f"{why}: interrupting {len(running)} running job(s), starting no more")
                for proc, _, _ in running.values():
                    proc.send_signal(signal.SIGTERM)
            for name, (proc, start, argv) in list(running.items()):
                # wait4, not Popen.poll: it also returns the CPU time the run used (its data
                # workers included), which other programs on the machine do not inflate, and the
                # peak resident memory of the largest of its processes (ru_maxrss, KiB on Linux).
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == 0:
                    continue
                del running[name]
                proc.returncode = os.waitstatus_to_exitcode(status)
                piece = {"seconds": time.time() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                         "max_rss_mib": usage.ru_maxrss / 1024}
                earlier = self.partial(name)
                if earlier:  # the pieces before this one
                    piece = {"seconds": earlier["seconds"] + piece["seconds"],
                             "cpu_seconds": earlier["cpu_seconds"] + piece["cpu_seconds"],
                             "max_rss_mib": max(earlier["max_rss_mib"], piece["max_rss_mib"]),
                             "pieces": earlier["pieces"] + 1}
                if proc.returncode != 0 and can_continue(by_name[name]) and (
                        proc.returncode in STOPPED_EXITS or earlier):
                    # stopped after a checkpoint (or killed before it got going again): keep the cost
                    self.partial_path(name).write_text(json.dumps({"argv": argv, "pieces": 1, **piece}))
                    stopped.add(name)
                    self._log(f"stopped {name} (exit {proc.returncode}): continues from its checkpoint "
                              f"next time ({piece['cpu_seconds']:.0f} s CPU so far)")
                    continue
                if proc.returncode != 0 and interrupting:  # not resumable: starts afresh next time
                    stopped.add(name)
                    self._log(f"interrupted {name} (exit {proc.returncode}): runs from the start next time")
                    continue
                if proc.returncode != 0:
                    failed.add(name)
                    self._log(f"FAILED {name} (exit {proc.returncode}); see {self.out / 'jobs' / (name + '.log')}")
                    continue
                self.record_path(name).write_text(json.dumps({"argv": argv, **piece}))
                self.partial_path(name).unlink(missing_ok=True)
                self._log(f"done {name} in {piece['seconds']:.0f} s ({piece['cpu_seconds']:.0f} s CPU)")
            blocked = [j for j in pending if any(d in failed for d in j.deps)]
            for j in blocked:
                pending.remove(j)
                failed.add(j.name)
                print(f"skipped {j.name}: a run it needs failed", flush=True)
            late = interrupting or (self.deadline is not None and time.time() > self.deadline)
            while not late and len(running) < self.slots:
                ready = next((j for j in pending if all(self.record(d) for d in j.deps)), None)
                if ready is None:
                    break
                pending.remove(ready)
                argv = ready.argv() if callable(ready.argv) else ready.argv
                continuing = bool(self.partial(ready.name)) and can_continue(ready)
                if continuing:
                    argv = [*argv, *ready.resume]
                    self._log(f"continue {ready.name} (piece {self.partial(ready.name)['pieces'] + 1})")
                else:  # a fresh start, in empty folders
                    self.partial_path(ready.name).unlink(missing_ok=True)
                    for folder in {Path(o).parent for o in ready.outputs if Path(o).parent.exists()}:
                        aside = folder.with_name(folder.name + ".replaced")
                        shutil.rmtree(aside, ignore_errors=True)
                        folder.rename(aside)
                    self._log(f"start {ready.name}")
                log = open(self.out / "jobs" / f"{ready.name}.log", "a" if continuing else "w")
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
                running[ready.name] = (proc, time.time(), argv[:len(argv) - len(ready.resume) * continuing])
            if late and not running:
                if interrupting and stopped:
                    print(f"interrupted: {len(stopped)} job(s) continue from their checkpoints next time "
                          f"({', '.join(sorted(stopped))})", flush=True)
                if pending:
                    print(f"{'interrupted' if interrupting else 'deadline reached'}: {len(pending)} job(s) "
                          f"not started", flush=True)
                return
            if not running and pending:  # nothing can start: deps that are neither done nor pending
                print(f"{len(pending)} job(s) wait for runs that are not in this invocation or were interrupted "
                      f"({', '.join(j.name for j in pending[:3])}...)", flush=True)
                return
            time.sleep(self.poll_seconds)


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
    files only once its job has finished (`jobs/<name>.json`): a running or interrupted one's curve
    is partial (and an interrupted one's `.partial.json` stays with its checkpoint, in the cache).

    `replace`: machine paths -> placeholders in the copies (e.g. {str(out): "<out>"}), so that the
    committed records name no machine's folders; `seed_records` puts them back.
    """
    n = 0
    for pattern in RECORD_GLOBS:
        for src in sorted(out.glob(pattern)):
            rel = src.relative_to(out)
            if src.name.endswith((".replaced.json", ".partial.json")) or (rel.parts[0] == "runs" and not
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
