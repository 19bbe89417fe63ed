"""mypy --strict and ruff over the package: type and lint errors fail the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip(module)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_mypy_strict() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    if not shutil.which("ruff", path=str(Path(sys.executable).parent)):
        pytest.importorskip("ruff")
    result = run("ruff", "check", "supervisor", "worker", "calink", "cahttp", "tests")
    assert result.returncode == 0, result.stdout + result.stderr
