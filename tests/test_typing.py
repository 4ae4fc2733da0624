"""The package's type hints hold together (it ships py.typed, so users' type checkers read them):
mypy over python/issl_fast with pyproject's [tool.mypy]. mypy comes with the [test] extra; the test
skips, saying so, where it is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_type_checks(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]')")
    assert (ROOT / "python" / "issl_fast" / "py.typed").is_file()
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "python/issl_fast"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success: no issues found" in run.stdout
