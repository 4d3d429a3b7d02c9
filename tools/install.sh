#!/usr/bin/env bash
# Install prism_lightning (editable, with the dev extras) into the current Python.
# Keeps an already-installed torch (e.g. your CUDA build); without one, installs torch==2.13.0.
# GPU users: install the torch build for your CUDA first (see README, "Install"), then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
