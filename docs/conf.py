"""Sphinx configuration: API reference from the docstrings, notebooks rendered as pages.

Build (warnings are errors, as in the test suite):

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The notebooks are rendered with their stored outputs, never executed here
(`tests/test_notebooks.py` executes them).
"""

from __future__ import annotations

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not
sys.path.insert(0, str(ROOT / "docs"))

import api_pages

project = "infinite-modules"
author = "infinite-modules contributors"
copyright = "the infinite-modules contributors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build"]
root_doc = "index"

# Notebooks: rendered with their stored outputs; executing them is the tests' job.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
# myst-nb parses each notebook cell on its own, so a cell opening with "## ..." reads as a
# document starting at H2; the notebooks' heading structure is fine.
suppress_warnings = ["myst.header"]

# The docstrings use Google style with Markdown-ish backticks; napoleon reads the sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass fields: one entry each, from the Attributes section
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # signatures carry no jax/flax types Sphinx cannot resolve
autodoc_default_options = {"show-inheritance": False}

html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Exact infinite-width kernels of Flax and Haiku models"}


def _copy_notebooks() -> None:
  """Copies `notebooks/*.ipynb` to `docs/notebooks/` (git-ignored) for Sphinx to render."""
  target = ROOT / "docs" / "notebooks"
  target.mkdir(exist_ok=True)
  for old in target.glob("*.ipynb"):
    old.unlink()
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(path, target / path.name)


# Generated before Sphinx looks for sources.
_copy_notebooks()
api_pages.write(ROOT / "docs" / "api")
