#!/usr/bin/env bash
# Run VideoSys on several processes with torchrun, one per GPU.
#
#   launch/torchrun.sh [overrides...]                 # every GPU of this machine
#   NPROC=4 launch/torchrun.sh parallel=dsp4 model=opensora task=sample
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh parallel=zero2   # on each node
#
# All ranks write to one run directory: the helper names it once (outputs/<date>/<time>, unless a
# run_dir= override is given) and rank 0 alone writes outputs and logs. Without GPUs, NPROC CPU
# processes run over gloo (tests and dry checks).
set -euo pipefail

python=${PYTHON:-python}
nproc=${NPROC:-$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
nnodes=${NNODES:-1}

run_dir="outputs/$(date +%Y-%m-%d)/$(date +%H-%M-%S)"
for arg in "$@"; do
  case "$arg" in run_dir=*) run_dir="" ;; esac
done

if [ "$nnodes" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 for a multi-node run}"
  : "${NODE_RANK:?set NODE_RANK to the index of this node, 0..NNODES-1}"
  if [ -n "$run_dir" ]; then
    echo "launch/torchrun.sh: on several nodes give run_dir=<shared folder> so that every node agrees" >&2
    exit 2
  fi
  rendezvous=(--nnodes="$nnodes" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
else
  rendezvous=(--standalone)
fi

exec "$python" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$nproc" \
  -m videosys.run ${run_dir:+"run_dir=$run_dir"} "$@"
