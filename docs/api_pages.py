"""Writes the API reference pages from the packages' public names.

Every name of `infinite_modules.__all__` and every public re-export of
`interop` (the `from ... import X as X` names of its `__init__`) gets an
autodoc entry, so a name added to either package is documented by the next
build without editing the docs; `tests/test_docs.py` checks that each one
appears in the built HTML. Modules that notebooks use directly (layers, data,
plotting) get a page section of their own.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import types

PACKAGES = {
    "infinite_modules": "Infinite width: ``infinite_modules``",
    "interop": "Finite width: ``interop``",
}
# Submodules of `interop` that notebooks import directly; documented whole.
EXTRA_MODULES = {
    "interop": ("interop.ntk_layers", "interop.data", "interop.plotting", "interop.demo"),
}


def public_names(package: str) -> list[str]:
  """The public names of `package`: its `__all__`, else its non-module public attributes."""
  module = importlib.import_module(package)
  names = getattr(module, "__all__", None)
  if names is None:
    names = [n for n, v in vars(module).items()
             if not n.startswith("_") and not isinstance(v, types.ModuleType)]
  return sorted(names)


def _directive(package: str, name: str) -> str:
  obj = getattr(importlib.import_module(package), name)
  target = f"{package}.{name}"
  if isinstance(obj, types.ModuleType):
    return f".. automodule:: {obj.__name__}\n   :members:\n"
  if inspect.isclass(obj) and issubclass(obj, BaseException):
    return f".. autoexception:: {target}\n"
  if inspect.isclass(obj):
    return f".. autoclass:: {target}\n   :members:\n"
  if callable(obj):
    return f".. autofunction:: {target}\n"
  return f".. autodata:: {target}\n"


def _title(text: str, char: str) -> str:
  return f"{text}\n{char * len(text)}\n"


def page(package: str) -> str:
  """The reST source of `package`'s reference page."""
  parts = [_title(PACKAGES[package], "="), f".. currentmodule:: {package}\n"]
  for name in public_names(package):
    obj = getattr(importlib.import_module(package), name)
    heading = f"{package}.{name}" if not isinstance(obj, types.ModuleType) else obj.__name__
    parts += [_title(heading, "-"), _directive(package, name)]
  for module in EXTRA_MODULES.get(package, ()):
    parts += [_title(module, "-"), f".. automodule:: {module}\n   :members:\n"]
  return "\n".join(parts)


def write(directory: pathlib.Path) -> None:
  """Writes `<package>.rst` for every package into `directory` (only when changed)."""
  directory.mkdir(parents=True, exist_ok=True)
  for package in PACKAGES:
    path = directory / f"{package}.rst"
    text = page(package)
    if not path.exists() or path.read_text() != text:
      path.write_text(text)
