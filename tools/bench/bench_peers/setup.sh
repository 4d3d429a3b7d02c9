#!/bin/bash
# bash tools/bench/bench_peers/setup.sh [VENV]   (default: .venv-peers in the repository root)
#
# A separate virtualenv for the peer attribution libraries (benchmark only; never runtime
# dependencies of prism_lightning). It sees the project's own packages (--system-site-packages:
# the same CPU torch, transformers and peft, so every case runs the same model code) and adds
# kronfluence, TRAK (traker), dattri, dattri-llm and Bergson with --no-deps plus the few
# dependencies they import. torchvision/torchaudio are left out on purpose: the PyPI wheels are
# CUDA builds that fail to import next to the CPU torch, and the code paths used here do not
# need them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
VENV=${1:-$ROOT/.venv-peers}
python -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q --no-deps kronfluence==1.0.1 traker==0.3.2 dattri==0.3.0 dattri-llm==0.1.0 bergson==2.5.1
"$PY" -m pip install -q einops einconv opt-einsum natsort petname simple-parsing jaxtyping ml_dtypes torchopt \
    pretty_midi
"$PY" -m pip uninstall -q -y torchvision torchaudio 2>/dev/null || true
"$PY" - <<'PY'
import importlib
for name in ("kronfluence", "trak", "dattri", "dattri_llm", "bergson"):
    try:
        importlib.import_module(name)
        print(f"{name}: ok")
    except Exception as exc:  # noqa: BLE001 - report every peer, then fail below
        print(f"{name}: FAILED {type(exc).__name__}: {exc}")
PY
echo "peers venv: $VENV"
