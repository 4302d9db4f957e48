"""Scripts whose optional dependency is missing stop with one line naming the install command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.parametrize("script, module, install", [
    ("make_digits_folder.py", "sklearn", "pip install scikit-learn"),
    ("bench_shards.py", "webdataset", "pip install 'ummae[shards]'"),
])
def test_missing_optional_dependency_is_one_line(tmp_path, script, module, install):
    shadow = tmp_path / "shadow" / module  # a package that fails to import, in front of the real one
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ImportError('No module named {module}')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(SCRIPTS / script), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert install in lines[0] and script in lines[0]
