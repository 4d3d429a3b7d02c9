#!/bin/bash
# bash tools/bench/bench_peers/gpu.sh [WORKLOADS] [CASES] [BUDGET_S]     (on a GPU machine, from the repo root)
#
# The GPU table of docs/benchmarks.md. The machine has torch/transformers/peft but no network, so the
# peers and their few pure-Python dependencies come as wheels in .whl/ (fetched beforehand with
# `pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl <names from setup.sh>`).
# Every case runs on the GPU with TF32 matmuls; a case still running at the budget is stopped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v "WARNING: Running pip as" || true
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
CASES=${2:-train_step,ours:adam+sjlt-8192,ours:adam+sjlt-1024,kronfluence:identity,dattri-llm:tracin,bergson:build+query-16,dattri:logra-256,trak-1024,kronfluence:ekfac,dattri-llm:ekfac,ours:identity,ours:adam+rademacher-1024,bs1_loop}
python tools/bench/bench_peers/run.py --device cuda --workloads "${1:-L,1B}" --cases "$CASES" --budget "${3:-480}" \
    2>&1 | grep -v "Failed to load CPU gemm" | tee "${OUT:-/tmp}/bench_gpu.log"
