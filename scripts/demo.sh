#!/usr/bin/env bash
# Installs the package with the demo extras and runs the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[demo]"
python -m interop.demo "$@"
