"""scripts/tables_runner.py: the cached job runner the table scripts share, and its records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tables_runner  # noqa: E402
from tables_runner import Job, Runner, save_encoders, save_records, seed_encoders, seed_records, to_rerun  # noqa: E402


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(Runner, "poll_seconds", 0.02)


def touch_job(name: str, path: Path, deps=(), outputs=()) -> Job:
    """A job that appends its name to `path` (a log of what ran) and writes its outputs."""
    code = (f"import pathlib; open({str(path)!r}, 'a').write({name!r} + '\\n'); "
            + "".join(f"pathlib.Path({str(o)!r}).parent.mkdir(parents=True, exist_ok=True); "
                      f"pathlib.Path({str(o)!r}).write_text('x'); " for o in outputs))
    return Job(name, [sys.executable, "-c", code], list(deps), [Path(o) for o in outputs])


def fake_grid(tmp: Path) -> list[Job]:
    """pre (leaves a checkpoint) -> eval (reads it) and -> ft (reads it); raw (nothing)."""
    ran, ckpt = tmp / "ran.txt", tmp / "cache" / "runs" / "pre" / "checkpoint.pt"
    return [touch_job("pre", ran, outputs=[ckpt]), touch_job("eval", ran, ["pre"]),
            touch_job("ft", ran, ["pre"]), touch_job("raw", ran)]


def ran(tmp: Path) -> list[str]:
    path = tmp / "ran.txt"
    return path.read_text().split() if path.exists() else []


def test_runs_in_order_records_cost_and_skips_finished(tmp_path):
    runner = Runner(tmp_path / "cache", 1, None, tmp_path)
    runner.run(fake_grid(tmp_path))
    assert ran(tmp_path) == ["pre", "eval", "ft", "raw"]
    rec = runner.record("pre")
    assert rec["cpu_seconds"] > 0 and rec["seconds"] > 0 and rec["max_rss_mib"] > 1
    runner.run(fake_grid(tmp_path))  # everything finished, the checkpoint there: nothing runs
    assert ran(tmp_path) == ["pre", "eval", "ft", "raw"]


def test_missing_checkpoint_reruns_its_job_only_when_needed(tmp_path):
    runner = Runner(tmp_path / "cache", 1, None, tmp_path)
    runner.run(fake_grid(tmp_path))
    ckpt = tmp_path / "cache" / "runs" / "pre" / "checkpoint.pt"
    ckpt.unlink()  # a new machine: the records came along, the checkpoint did not
    (ckpt.parent / "metrics.jsonl").write_text("old curve\n")
    runner.run(fake_grid(tmp_path))  # nobody still to run needs it: nothing runs
    assert ran(tmp_path) == ["pre", "eval", "ft", "raw"]
    runner.record_path("ft").unlink()  # ft still has to run and needs pre's checkpoint
    runner.run(fake_grid(tmp_path))
    assert ran(tmp_path)[4:] == ["pre", "ft"] and ckpt.exists()
    assert not (ckpt.parent / "metrics.jsonl").exists()  # the re-run started in a clean folder
    assert (ckpt.parent.with_name("pre.replaced") / "metrics.jsonl").read_text() == "old curve\n"
    assert (tmp_path / "cache" / "jobs" / "pre.replaced.json").exists()


def test_to_rerun_is_transitive():
    jobs = [Job("a", [], [], [Path("/nonexistent/a.ckpt")]), Job("b", [], ["a"], [Path("/nonexistent/b.ckpt")]),
            Job("c", [], ["b"]), Job("d", [], ["a"])]
    finished = {"a", "b", "d"}
    assert [j.name for j in to_rerun(jobs, lambda n: n in finished)] == ["a", "b", "c"]


def test_failed_dependency_skips_dependents(tmp_path, capsys):
    runner = Runner(tmp_path / "cache", 2, None, tmp_path)
    jobs = [Job("bad", [sys.executable, "-c", "raise SystemExit(3)"]), touch_job("after", tmp_path / "ran.txt", ["bad"])]
    runner.run(jobs)
    out = capsys.readouterr().out
    assert "FAILED bad (exit 3)" in out and "skipped after" in out and not ran(tmp_path)
    assert runner.record("bad") is None


def test_waiting_on_a_job_outside_the_invocation_returns(tmp_path, capsys):
    runner = Runner(tmp_path / "cache", 1, None, tmp_path)
    runner.run([touch_job("orphan", tmp_path / "ran.txt", ["not-in-this-run"])])
    assert "wait for runs that are not in this invocation" in capsys.readouterr().out


def test_records_round_trip_without_checkpoints(tmp_path):
    cache = tmp_path / "cache"
    Runner(cache, 1, None, tmp_path).run(fake_grid(tmp_path))
    (cache / "runs" / "pre" / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    (cache / "eval" / "pre.json").write_text("{}")
    (cache / "runs" / "still_running").mkdir()
    (cache / "runs" / "still_running" / "metrics.jsonl").write_text("{}\n")  # no record yet: not saved
    n = save_records(cache, tmp_path / "docs")
    saved = sorted(str(p.relative_to(tmp_path / "docs")) for p in (tmp_path / "docs").rglob("*") if p.is_file())
    assert n == len(saved) and "runs/pre/metrics.jsonl" in saved and "eval/pre.json" in saved
    assert not any(s.endswith(".pt") or s.endswith(".log") or "still_running" in s for s in saved)
    fresh = tmp_path / "fresh"
    assert seed_records(tmp_path / "docs", fresh) == n
    assert seed_records(tmp_path / "docs", fresh) == 0  # what the cache has wins
    assert json.loads((fresh / "jobs" / "pre.json").read_text())["argv"] == json.loads(
        (cache / "jobs" / "pre.json").read_text())["argv"]


@pytest.mark.parametrize("values,text", [([91.0], "91.0"), ([90.0, 92.5, 91.0], "91.2 (90.0-92.5)")])
def test_fmt(values, text):
    assert tables_runner.fmt(tables_runner.summarise(values)) == text
    assert tables_runner.fmt(None) == "not run"


def test_records_name_no_machine_paths(tmp_path):
    cache = tmp_path / "cache"
    Runner(cache, 1, None, tmp_path).run(fake_grid(tmp_path))
    save_records(cache, tmp_path / "docs", {str(cache): "<out>", sys.executable: "python"})
    committed = (tmp_path / "docs" / "jobs" / "pre.json").read_text()
    assert str(cache) not in committed and "<out>/runs/pre/checkpoint.pt" in committed
    assert json.loads(committed)["argv"][0] == "python"
    fresh = tmp_path / "elsewhere"
    seed_records(tmp_path / "docs", fresh, {"<out>": str(fresh)})
    assert f"{fresh}/runs/pre/checkpoint.pt" in (fresh / "jobs" / "pre.json").read_text()


def test_encoders_travel_and_spare_the_pretraining(tmp_path, checkpoints):
    """A finished pre-training's encoder goes into the records; seeded into a fresh cache, the
    fine-tuning job that needs it starts from it instead of the pre-training running again."""
    import shutil

    import torch
    from ummae.checkpoint_file import load_checkpoint
    from ummae.models.loading import encoder_source

    cache, docs, fresh = tmp_path / "cache", tmp_path / "docs", tmp_path / "fresh"

    def grid(root: Path) -> list[Job]:
        ckpt = root / "runs" / "pre" / "checkpoint.pt"
        return [Job("pre", [], [], [ckpt]), touch_job("ft", tmp_path / "ran.txt", ["pre"])]

    full = cache / "runs" / "pre" / "checkpoint.pt"
    full.parent.mkdir(parents=True)
    shutil.copy2(checkpoints["swin"], full)
    (cache / "jobs").mkdir()
    (cache / "jobs" / "pre.json").write_text(json.dumps({"argv": [], "seconds": 1, "cpu_seconds": 1}))
    assert save_encoders(cache, docs, grid(cache)) == 1
    assert save_encoders(cache, docs, grid(cache)) == 0  # up to date
    slim = load_checkpoint(docs / "encoders" / "pre.pt")
    assert slim["model"] and all(k.startswith("encoder.") for k in slim["model"])
    assert any(not k.startswith("encoder.") for k in load_checkpoint(full)["model"])  # the decoder stayed behind
    (cfg_a, w_a), (cfg_b, w_b) = encoder_source(full), encoder_source(docs / "encoders" / "pre.pt")
    assert cfg_a == cfg_b and w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)

    save_records(cache, docs)
    seed_records(docs, fresh)
    assert [j.name for j in to_rerun(grid(fresh), lambda n: (fresh / "jobs" / f"{n}.json").exists())] == ["pre", "ft"]
    assert seed_encoders(docs, fresh, grid(fresh)) == 1
    assert [j.name for j in to_rerun(grid(fresh), lambda n: (fresh / "jobs" / f"{n}.json").exists())] == ["ft"]
    Runner(fresh, 1, None, tmp_path).run(grid(fresh))
    assert ran(tmp_path) == ["ft"]


# A stand-in for an ummae run that can be interrupted: it writes checkpoints/step-1.pt, then waits
# for SIGTERM, on which it writes step-2 and exits 143 (as `ummae pretrain` does); with
# `--resume auto` it continues from its newest checkpoint and finishes. Each piece appends what
# it did to ran.txt.
RESUMABLE = """
import pathlib, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
run, log = pathlib.Path(sys.argv[1]), open(sys.argv[2], "a")
ckpts = run / "checkpoints"
if "--resume" in sys.argv:
    last = max(int(p.stem[5:]) for p in ckpts.glob("step-*.pt"))
    log.write(f"continued-from-{last}\\n")
    (run / "checkpoint.pt").write_text("done")
    sys.exit(0)
ckpts.mkdir(parents=True)
(ckpts / "step-1.pt").write_text("1")
(run / "ready").write_text("")
while not stop:
    time.sleep(0.01)
(ckpts / "step-2.pt").write_text("2")
log.write("stopped-at-2\\n")
sys.exit(143)
"""


def resumable_job(tmp: Path, name: str = "pre") -> Job:
    run = tmp / "cache" / "runs" / name
    return Job(name, [sys.executable, "-c", RESUMABLE, str(run), str(tmp / "ran.txt")],
               outputs=[run / "checkpoint.pt"], resume=["--resume", "auto"])


def test_stop_time_interrupts_and_the_next_run_continues(tmp_path, capsys):
    import time

    runner = Runner(tmp_path / "cache", 2, None, tmp_path, stop=time.time() + 1.5)
    runner.run([resumable_job(tmp_path), touch_job("after", tmp_path / "ran.txt", ["pre"])])
    assert ran(tmp_path) == ["stopped-at-2"]  # "after" waits for it, not run, not failed
    assert runner.record("pre") is None and runner.partial("pre")["pieces"] == 1
    first = runner.partial("pre")["cpu_seconds"]
    save_records(tmp_path / "cache", tmp_path / "docs")  # an unfinished run is not a record to commit
    assert not list((tmp_path / "docs").rglob("*.json"))
    out = capsys.readouterr().out
    assert "stopped pre (exit 143)" in out and "FAILED" not in out
    runner = Runner(tmp_path / "cache", 2, None, tmp_path)  # the next session
    runner.run([resumable_job(tmp_path), touch_job("after", tmp_path / "ran.txt", ["pre"])])
    assert ran(tmp_path) == ["stopped-at-2", "continued-from-2", "after"]
    rec = runner.record("pre")
    assert rec["pieces"] == 2 and rec["cpu_seconds"] > first and "--resume" not in rec["argv"]
    assert runner.partial("pre") is None
    assert "continue pre (piece 2)" in capsys.readouterr().out
    assert (tmp_path / "cache" / "runs" / "pre" / "ready").exists()  # continued in place, not moved aside


def test_sigterm_to_the_runner_interrupts_its_jobs(tmp_path, capsys):
    """SIGTERM to the runner (a session's end, `kill`): resumable jobs stop with a checkpoint,
    the others stop and start afresh next time; nothing is recorded as done or failed."""
    import os
    import signal
    import threading
    import time

    ready = tmp_path / "cache" / "runs" / "pre" / "ready"

    def kill_when_ready():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    sleeper = Job("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    threading.Thread(target=kill_when_ready, daemon=True).start()
    runner = Runner(tmp_path / "cache", 2, None, tmp_path)
    began = time.time()
    runner.run([resumable_job(tmp_path), sleeper, touch_job("later", tmp_path / "ran.txt")])
    assert time.time() - began < 30 and ran(tmp_path) == ["stopped-at-2"]
    out = capsys.readouterr().out
    assert "signal SIGTERM: interrupting 2 running job(s)" in out
    assert "interrupted sleeper" in out and "1 job(s) not started" in out
    assert runner.partial("pre") and runner.partial("sleeper") is None and runner.record("sleeper") is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the runner put the handler back


def test_interrupted_job_without_a_checkpoint_starts_afresh(tmp_path):
    """A resumable job killed before its first checkpoint (exit 143 but no step-*.pt) has nothing
    to continue: no partial record, and the next run starts it in an empty folder."""
    code = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); "
            "(p / 'metrics.jsonl').open('a').write('x\\n'); sys.exit(143)")
    run = tmp_path / "cache" / "runs" / "pre"
    job = Job("pre", [sys.executable, "-c", code, str(run)], outputs=[run / "checkpoint.pt"], resume=["--resume", "auto"])
    runner = Runner(tmp_path / "cache", 1, None, tmp_path)
    runner.run([job])
    assert runner.partial("pre") is None and runner.record("pre") is None
    runner.run([job])
    assert (run / "metrics.jsonl").read_text() == "x\n"  # not appended to the first attempt's
