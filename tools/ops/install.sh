#!/usr/bin/env bash
# bash tools/ops/install.sh
#
# Installs prism_lightning (editable, with the dev extras) into the project's virtual environment
# .venv (created on the first run, reused after), then prints what it did. Use it without activating:
#   .venv/bin/python -m prism_lightning ...      or      source .venv/bin/activate
#
# torch: a torch your Python already has (e.g. your CUDA build) is kept: the venv then sees the base
# Python's packages. Otherwise the venv gets torch==$TORCH_VERSION: with no NVIDIA GPU visible, from
# $TORCH_CPU_INDEX when set (e.g. https://download.pytorch.org/whl/cpu; on this project's build machines
# PyPI's torch==2.13.0 is already the CPU wheel), with a GPU from PyPI (its CUDA build).
# Environment: PYTHON (the base interpreter, default python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ -x "$VENV/bin/python" ]; then
  echo "install: reusing $VENV ($("$VENV/bin/python" --version))"
elif "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
  echo "install: created $VENV with access to $PYTHON's packages, which have torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
  "$PYTHON" -m venv "$VENV"
  echo "install: created $VENV ($("$VENV/bin/python" --version))"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install: keeping torch $("$PY" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda, ")")')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: NVIDIA GPU found: installing torch==$TORCH_VERSION with CUDA from PyPI"
  "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
elif [ -n "${TORCH_CPU_INDEX:-}" ]; then
  echo "install: no NVIDIA GPU: installing the CPU build of torch==$TORCH_VERSION from $TORCH_CPU_INDEX"
  "$PY" -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
else
  echo "install: no NVIDIA GPU: installing torch==$TORCH_VERSION (set TORCH_CPU_INDEX to choose the CPU index)"
  "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi

"$PY" -m pip install --quiet -e ".[dev]"
echo "install: prism-lightning $("$PY" -c 'import importlib.metadata as m; print(m.version("prism-lightning"))') (editable) with torch $("$PY" -c 'import torch; print(torch.__version__)'), lightning $("$PY" -c 'import lightning; print(lightning.__version__)'), transformers $("$PY" -c 'import transformers; print(transformers.__version__)') in $VENV"
echo "install: run with $VENV/bin/python -m prism_lightning ... (or: source $VENV/bin/activate)"
