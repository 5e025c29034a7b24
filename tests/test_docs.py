"""Builds the documentation (`docs/`) with warnings as errors, as CI does.

The build renders the stored notebooks without executing them and generates the
API reference from the docstrings; every public name of `infinite_modules`
(its `__all__`) and of `interop` (its re-exports) must have an entry.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys
import types

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import api_pages


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("docs_html")
  doctrees = tmp_path_factory.mktemp("doctrees")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p), "MPLBACKEND": "Agg"}
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
             "-d", str(doctrees), str(ROOT / "docs"), str(out)]
  proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return out


def test_docs_build_without_warnings(html):
  assert (html / "index.html").exists()
  for name in ("cookbook", "function_space", "weight_space", "bring_your_own_model",
               "empirical_ntk"):
    page = (html / "notebooks" / f"{name}.html").read_text()
    assert "_images/" in page, f"{name}: no stored figure rendered"


@pytest.mark.parametrize("package", sorted(api_pages.PACKAGES))
def test_every_public_name_has_a_reference_entry(html, package):
  page = (html / "api" / f"{package}.html").read_text()
  module = importlib.import_module(package)
  names = api_pages.public_names(package)
  if package == "infinite_modules":
    assert names == sorted(module.__all__)
  missing = []
  for name in names:
    obj = getattr(module, name)
    anchor = obj.__name__ if isinstance(obj, types.ModuleType) else f"{package}.{name}"
    if f'id="{anchor}"' not in page and f'id="module-{anchor}"' not in page:
      missing.append(anchor)
  assert not missing, f"no reference entry for {missing}"
