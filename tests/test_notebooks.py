"""Executes every notebook in `notebooks/` (kernel `python3`); any cell error fails the test.

Notebooks run in their reduced size (`IM_NOTEBOOK_QUICK=1`, read by each
notebook's first cell) so the suite stays fast; the stored outputs come from
the sizes each notebook's introduction names.
"""

from __future__ import annotations

import os
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  # The kernel imports the packages from this checkout even without `pip install -e .`,
  # and draws figures without a display.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("IM_NOTEBOOK_QUICK", "1")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  errors = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]
  assert not errors, errors


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/ holds no .ipynb files"


TEACHING = ("cookbook", "function_space", "weight_space", "bring_your_own_model",
            "empirical_ntk")


@pytest.mark.parametrize("name", TEACHING)
def test_notebook_is_stored_with_its_outputs(name):
  """Each teaching notebook is stored executed, with its figures, small, and has a quick mode."""
  path = ROOT / "notebooks" / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.get("execution_count") for c in code), f"{path.name} has unexecuted cells"
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no figure"
  assert not any(o.get("output_type") == "error" for o in outputs)
  assert "IM_NOTEBOOK_QUICK" in code[0].source, "the first code cell reads the quick switch"
  assert path.stat().st_size < 600_000, f"{path.name} is {path.stat().st_size} bytes"
