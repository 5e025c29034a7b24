"""The code, tests, benchmarks and notebooks pass `ruff check` (rules in pyproject.toml)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
  ruff = shutil.which("ruff")
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
  result = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
