"""Pre-training from tar shards written by `ummae shards` from the demo photographs: the same run
as from the folder, every image once per epoch across 2 torchrun (gloo) processes and their
DataLoader workers, bit-identical losses after SIGKILL + `--resume auto`, and damaged members
counted in skipped_images.txt like unreadable files in a folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from tiny import TINY_SETS, run_cli_captured, sigkill_after_checkpoints
from ummae.data.demo import DEMO_IMAGE_FILES, demo_image_dir

N = len(DEMO_IMAGE_FILES)  # 13 photographs


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    for name in DEMO_IMAGE_FILES:
        shutil.copy(demo_image_dir() / name, root / name)
    return root


@pytest.fixture(scope="module")
def demo_shards(demo_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_shards")
    result = run_cli_captured(["shards", "--data", str(demo_folder), "--out", str(out), "--shard-size", "4",
                               "--no-progress"], out)
    assert result.code == 0, result.err
    assert len(list(out.glob("train-*.tar"))) == 4  # 4 + 4 + 4 + 1
    return out


def pattern(shards: Path) -> str:
    return str(shards / "train-{000000..000003}.tar")


def args(out: Path, data: str, steps: int, *extra: str) -> list[str]:
    result = ["pretrain", "--no-progress", "--out", str(out), "--data", data, "--batch-size", "2",
              "--max-steps", str(steps), "--device", "cpu"]
    for item in TINY_SETS:
        result += ["--set", item]
    return result + list(extra)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_training_on_shards_is_the_same_run_as_on_the_folder(demo_folder, demo_shards, tmp_path):
    # The shards hold the folder's images in the folder's order: same samples, crops and masks.
    runs = {}
    for name, data in (("folder", str(demo_folder)), ("shards", pattern(demo_shards))):
        result = run_cli_captured(args(tmp_path / name, data, 3), tmp_path / name)
        assert result.code == 0, result.err
        runs[name] = losses(tmp_path / name)
    assert runs["folder"] == runs["shards"] and len(runs["shards"]) == 3


def test_shards_re_encoded_with_max_side_train(demo_folder, tmp_path):
    # Every demo photo (303-1411 px a side) is re-encoded to a 256 px longer side, in the folder's order.
    import io
    import math

    from PIL import Image

    shards = tmp_path / "small"
    result = run_cli_captured(["shards", "--data", str(demo_folder), "--out", str(shards), "--shard-size", "4",
                               "--max-side", "256", "--no-progress"], shards)
    assert result.code == 0, result.err
    stored = []
    for k in range(4):
        with tarfile.open(shards / f"train-{k:06d}.tar") as tar:
            stored += [(m.name, Image.open(io.BytesIO(tar.extractfile(m).read())).size) for m in tar.getmembers()]
    assert [name for name, _ in stored] == [f"{i:09d}.jpg" for i in range(N)]
    assert all(max(size) == 256 for _, size in stored)
    run = tmp_path / "run"
    result = run_cli_captured(args(run, pattern(shards), 3), run)
    assert result.code == 0, result.err
    assert len(losses(run)) == 3 and all(math.isfinite(v) for v in losses(run).values())


# Runs `ummae` under torchrun, logging every sample the data loader draws as "rank epoch index".
_LOGGING_MAIN = textwrap.dedent("""\
    import os, sys
    from ummae.data import sampling
    draw = sampling.SeededSamples.__getitem__
    def logged(self, key):
        with open(os.environ["DRAWS_LOG"], "a") as log:  # O_APPEND: whole lines from every process
            log.write(f"{os.environ.get('RANK', '0')} {key[0]} {key[1]}\\n")
        return draw(self, key)
    sampling.SeededSamples.__getitem__ = logged
    from ummae.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_two_torchrun_processes_with_workers_see_every_image_once_per_epoch(demo_shards, tmp_path):
    main = tmp_path / "logging_main.py"
    main.write_text(_LOGGING_MAIN)
    log = tmp_path / "draws.log"
    # 13 images, 2 ranks x batch 2: 3 steps per epoch; 6 steps = 2 epochs; 2 workers per rank.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(main),
           *args(tmp_path / "ddp", str(demo_shards), 6, "--set", "data.num_workers=2",
                 "--set", "train.vis_images=0")]
    done = subprocess.run(cmd, env=dict(env(), DRAWS_LOG=str(log)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    draws = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert len(draws) == 2 * 6 * 2  # ranks x steps x batch: nothing drawn twice or left over
    for epoch in (0, 1):
        seen = Counter(index for _, e, index in draws if e == epoch)
        # every image once, except one: 13 = 2 ranks x 6 + 1, the odd one is dropped (a new one each epoch)
        assert len(seen) == N - 1 and set(seen.values()) == {1}, seen
        for rank in (0, 1):
            assert sum(1 for r, e, _ in draws if r == rank and e == epoch) == 6
    dropped = [set(range(N)) - {i for _, e, i in draws if e == epoch} for epoch in (0, 1)]
    assert dropped[0] != dropped[1]  # the epochs are shuffled differently


def test_a_run_on_shards_killed_with_sigkill_resumes_to_the_same_losses(demo_shards, tmp_path):
    run = lambda out, *extra: subprocess.Popen(  # noqa: E731
        [sys.executable, "-m", "ummae", *args(out, pattern(demo_shards), 8, "--save-every", "2",
                                               "--keep-last", "0", *extra)],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference, victim = run(reference_dir), run(killed_dir)
    sigkill_after_checkpoints(victim, killed_dir, 2)  # after its second checkpoint (step 4 of 8)
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    assert not (killed_dir / "checkpoint.pt").exists(), "killed before the end"

    resumed = subprocess.run([sys.executable, "-m", "ummae", "pretrain", "--no-progress", "--out", str(killed_dir),
                              "--resume", "auto"], env=env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert losses(killed_dir) == losses(reference_dir) and len(losses(reference_dir)) == 8
    final = lambda d: torch.load(d / "checkpoint.pt", weights_only=True)["model"]  # noqa: E731
    for key, value in final(reference_dir).items():
        assert torch.equal(value, final(killed_dir)[key]), key


@pytest.mark.filterwarnings("ignore:shard .* is damaged")  # expected: the truncated shard
def test_damaged_members_are_skipped_and_counted_across_workers(demo_shards, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for k in range(4):
        shutil.copy(demo_shards / f"train-{k:06d}.tar", damaged)
    with tarfile.open(damaged / "train-000001.tar") as tar:
        corrupt = tar.getmembers()[2]
    with open(damaged / "train-000001.tar", "r+b") as f:  # overwrite the member's first bytes
        f.seek(corrupt.offset_data)
        f.write(b"\0" * 64)
    with tarfile.open(damaged / "train-000002.tar") as tar:
        cut = tar.getmembers()[-1]
    with open(damaged / "train-000002.tar", "r+b") as f:  # the shard ends in its last member
        f.truncate(cut.offset_data + cut.size // 3)
    out = tmp_path / "run"
    # 2 epochs of 6 steps x batch 2 over 13 images; with this seed both bad members are drawn (if one
    # were not, the listing below would miss it and the test fail, not pass vacuously)
    result = run_cli_captured(args(out, str(damaged), 12, "--set", "data.num_workers=2"), out)
    assert result.code == 0, result.err
    listed = (out / "skipped_images.txt").read_text().splitlines()
    assert listed == sorted([f"{damaged / 'train-000001.tar'}/{corrupt.name}",
                             f"{damaged / 'train-000002.tar'}/{cut.name}"])
    assert "skipped          2 unreadable image(s)" in result.out
