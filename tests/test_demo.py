"""Runs the README's main command in its reduced form: `python -m interop.demo --quick`."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(stdout: str, name: str) -> list[list[str]]:
  """Rows (width, values...) of architecture `name`'s table in the demo output."""
  block = stdout.split(f"\n{name}  (infinite width")[1]
  rows = []
  for line in block.splitlines()[2:]:
    if re.match(r"^\s*(\d+|inf)\s", line):
      rows.append(line.split())
    elif rows:
      break
  return rows


def test_quick_demo(tmp_path):
  pytest.importorskip("sklearn")
  env = {**os.environ, "MPLBACKEND": "Agg",
         "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)}
  command = [sys.executable, "-m", "interop.demo", "--quick", "--out", str(tmp_path)]
  proc = subprocess.run(command, check=False, capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  print(out)
  for name in ("MLP", "CNN"):
    assert re.search(rf"{name}  \(infinite width, t = inf:  NNGP acc 0\.\d+,  NTK acc 0\.\d+\)",
                     out)
    rows = _table(out, name)
    assert len(rows) == 3 and rows[-1][0] == "inf", rows
    # Columns: width, acc finite, acc ensemble, acc lin, acc inf, RMSE(fin,inf), ...
    rmse = [float(r[5]) for r in rows[:-1]]
    assert rmse[1] < rmse[0], (name, rmse)
    accuracy = [float(v) for r in rows for v in r[1:5] if v != "-"]
    assert all(0.5 < a <= 1.0 for a in accuracy), (name, accuracy)
  infinite_acc = [float(a) for a in re.findall(r"NTK acc (0\.\d+)", out)]
  assert all(a > 0.8 for a in infinite_acc), infinite_acc
  assert (tmp_path / "finite_vs_infinite.png").stat().st_size > 10_000


def test_default_output_folder_is_git_ignored():
  """`python -m interop.demo` writes its figure into `outputs/`, which git ignores."""
  from interop import demo
  assert demo.DEFAULT_OUT == "outputs"
  ignored = (ROOT / ".gitignore").read_text().split()
  assert f"{demo.DEFAULT_OUT}/" in ignored
