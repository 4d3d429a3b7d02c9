#!/bin/bash
# bash tools/gpu_check.sh            (on one H100/H200, from anywhere; about 8 minutes; one table at the end)
#
# Every check the project wants from a lent GPU, in one run (docs/benchmarks.md):
#   1. cuda == cpu for the counter-hash Rademacher projection (the heavy test), and its time on each device;
#   2. QLoRA nf4 smoke on the tiny model: warmup, bf16 per-example gradient features, FSDP2 (tools/ops/gpu_smoke.py);
#   3. bench_features --grid (extraction / training step, LoRA r x dtype x attention);
#   4. side by side on workloads V, R (a 128,256-token vocabulary) and 1B: ours, Bergson, kronfluence, a training
#      step (tools/bench/bench_peers/run.py; the peers come as wheels in .whl/, see bench_peers/gpu.sh).
# Each step has its own time limit, so one that hangs cannot eat the others'. Logs go to $OUT (default /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
SUMMARY=$(mktemp)
step() {  # step NAME LIMIT_S COMMAND...: run, log, and add one row to the summary
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/gpu_check_$name.log" 2>&1
  local rc=$?
  printf '%-22s %-8s %6ss  %s\n' "$name" "$([ $rc = 0 ] && echo ok || echo "rc=$rc")" "$((SECONDS - start))" \
    "$(grep -v '^\s*$' "$OUT/gpu_check_$name.log" | tail -1 | cut -c1-90)" >> "$SUMMARY"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__)"
ls .whl/*.whl > /dev/null 2>&1 && python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v "Running pip as" || true

step rademacher 120 python -m pytest -q -p no:cacheprovider -m heavy tests/test_projection.py \
  -k rademacher_equal_on_cpu_and_gpu
step rademacher_time 60 python -c "
import time, torch
from prism_lightning.influence.projection import rademacher_block
for dev in ('cpu', 'cuda'):
    rademacher_block(3, 'm', 100, 4096, 1024, dev); torch.cuda.synchronize()
    t = time.perf_counter(); [rademacher_block(3, 'm', i, 4096, 1024, dev) for i in range(20)]; torch.cuda.synchronize()
    print(f'{dev}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms per 4096x1024 block', end='; ')
print()"
step qlora_smoke 240 python tools/ops/gpu_smoke.py --models tiny --steps 10
step features_grid 150 python tools/bench/bench_features.py --grid
CASES="train_step,ours:adam+sjlt-8192,ours:adam+sjlt-8192+tokens,kronfluence:identity,bergson:build+query-16"
step peers_V 150 python tools/bench/bench_peers/run.py --device cuda --workloads V --cases "$CASES" --budget 140
step peers_R 90 python tools/bench/bench_peers/run.py --device cuda --workloads R \
  --cases "$(python tools/bench/bench_peers/run.py --r-cases)" --budget 80
step peers_1B 150 python tools/bench/bench_peers/run.py --device cuda --workloads 1B \
  --cases "train_step,ours:adam+sjlt-8192,kronfluence:identity,bergson:build+query-16" --budget 140

echo
printf '%-22s %-8s %7s  %s\n' check result time "last line of its log ($OUT/gpu_check_<check>.log)"
cat "$SUMMARY"
for wl in V R 1B; do echo; echo "== workload $wl"; sed -n '/^wl /,/^{/p' "$OUT/gpu_check_peers_$wl.log" | grep -v '^{'; done
