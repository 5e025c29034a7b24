#!/usr/bin/env bash
# Installs the package with its test and docs extras and runs the fast test suite
# (which executes the notebooks and builds the docs with warnings as errors).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,docs]"
python -m pytest -q -n 2 "$@"
