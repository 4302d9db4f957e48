#!/usr/bin/env python
"""Run timm's own model test suite (`tests/test_models.py` of timm's sdist) on ummae's models.

    python scripts/timm_model_tests.py            # fetch the sdist of the installed timm, run
    python scripts/timm_model_tests.py -k fx      # extra arguments go to pytest
    python scripts/timm_model_tests.py --sdist timm-1.0.31.tar.gz   # offline, from a file

The sdist of the INSTALLED timm version is fetched once with
`pip download --no-binary :all: --no-deps timm==<version>` and its `tests/` and `pyproject.toml`
(pytest markers) are unpacked into a cache folder (`$UMMAE_TIMM_TESTS_CACHE`, default
`~/.cache/ummae/timm-tests/<version>`). pytest then runs timm's `test_models.py` with the plugin
`timm_suite/ummae_timm_plugin.py`, which imports ummae before collection and restricts timm's
model lists to `ummae_swin`, `ummae_pvt` and `ummae_vit` (see its docstring for what is
deselected and why), plus `timm_suite/test_pretrained_local.py` (timm's pretrained-loading tests
on local files).

Exit status: pytest's; 3 if the sdist could not be fetched (no network, no registry).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = HERE / "timm_suite"
FETCH_FAILED = 3


def cache_dir(version: str) -> Path:
    root = os.environ.get("UMMAE_TIMM_TESTS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "ummae" / "timm-tests" / version


def unpack(sdist: Path, dest: Path) -> None:
    """`tests/` and `pyproject.toml` of the sdist into `dest` (written to a sibling, then renamed)."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpack-"))
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) >= 2 and (parts[1] == "tests" or parts[1:] == ("pyproject.toml",)) \
                    and (m.isfile() or m.isdir()):
                m.name = str(Path(*parts[1:]))
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    os.replace(tmp, dest)


def fetch(version: str, dest: Path) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        # Not --no-build-isolation: pip reads the sdist's metadata with timm's own build backend,
        # which it installs in an isolated environment (the venv need not have it).
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "-q", "-d", tmp, f"timm=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = list(Path(tmp).glob("timm-*.tar.gz"))
        if res.returncode != 0 or not found:
            last = (res.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            print(f"timm_model_tests: could not fetch the timm {version} sdist: {last}", file=sys.stderr)
            return False
        unpack(found[0], dest)
    return True


def main(argv: list[str] | None = None) -> int:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="use this timm sdist (.tar.gz) instead of downloading")
    args, pytest_args = parser.parse_known_args(argv)

    version = timm.__version__
    dest = cache_dir(version)
    if not (dest / "tests" / "test_models.py").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        if args.sdist:
            unpack(args.sdist, dest)
        elif not fetch(version, dest):
            return FETCH_FAILED

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SUITE), env.get("PYTHONPATH")) if p)
    env.pop("GITHUB_ACTIONS", None)  # timm trims its model lists on GitHub; ours are three models
    cmd = [sys.executable, "-m", "pytest", str(dest / "tests" / "test_models.py"),
           str(SUITE / "test_pretrained_local.py"), "-p", "ummae_timm_plugin", "-p", "no:cacheprovider",
           "--rootdir", str(dest), "-c", str(dest / "pyproject.toml"), "-q",
           "-W", "ignore::pytest.PytestUnknownMarkWarning", *pytest_args]  # timeout: pytest-timeout marks
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
