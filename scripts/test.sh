#!/usr/bin/env bash
# Installs the package with its test extras and runs the fast test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pytest -q -n 2 "$@"
