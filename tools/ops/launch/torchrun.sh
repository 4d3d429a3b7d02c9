#!/bin/bash
# bash tools/ops/launch/torchrun.sh SUBCOMMAND CONFIG [ARGS...]
#
# One node, all its GPUs:
#   bash tools/ops/launch/torchrun.sh fit configs/llama3_8b_fsdp/warmup.yaml
# Several nodes: run on every node with the same MASTER_ADDR (node 0's address) and its NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash tools/ops/launch/torchrun.sh fit configs/llama3_8b_fsdp/warmup.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash tools/ops/launch/torchrun.sh fit configs/llama3_8b_fsdp/warmup.yaml
# Lightning's TorchElasticEnvironment takes the ranks from torchrun. NPROC defaults to the number
# of visible GPUs (set it, e.g. NPROC=2, for CPU processes with --trainer.accelerator cpu).
# The interpreter is $PYTHON, else the project's .venv (tools/ops/install.sh), else python3 on PATH;
# torch's launcher runs as `$PYTHON -m torch.distributed.run`, so no activated venv is needed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/../../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
SUBCOMMAND=${1:?usage: bash tools/ops/launch/torchrun.sh SUBCOMMAND CONFIG [ARGS...]}
CONFIG=${2:?usage: bash tools/ops/launch/torchrun.sh SUBCOMMAND CONFIG [ARGS...]}
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m prism_lightning "$SUBCOMMAND" --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" "$@"
