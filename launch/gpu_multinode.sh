#!/usr/bin/env bash
# e2_jax on GPU machines without a scheduler: run this on every node with the same arguments.
#
#   # on node 0 and node 1 (node0 reachable from both on port 12345):
#   NNODES=2 NODE_RANK=0 COORDINATOR=node0:12345 launch/gpu_multinode.sh --config configs/e2_b16.py --workdir /shared/run
#   NNODES=2 NODE_RANK=1 COORDINATOR=node0:12345 launch/gpu_multinode.sh --config configs/e2_b16.py --workdir /shared/run
#   ... E2_PER_GPU=1 ...    one process per GPU (GPUS_PER_NODE of them, default: nvidia-smi -L | wc -l)
#   ... --dry-run ...       print the commands and their environment, run nothing
#
# One process per node by default (it drives all the node's GPUs). Each process gets
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (node rank x processes per node
# + local rank), which e2_jax.distributed.initialize reads. The coordinator is process 0, on
# node 0: its port must be free there and open to the other nodes. The workdir must be on
# storage every node sees. E2_PYTHON: the Python to run (default python).
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -eq 0 ]]; then
  echo "usage: NNODES=N NODE_RANK=R COORDINATOR=HOST:PORT launch/gpu_multinode.sh [--dry-run] --config CONFIG --workdir DIR [...]" >&2
  exit 2
fi
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
coordinator="${COORDINATOR:-localhost:12345}"
if (( node_rank < 0 || node_rank >= nnodes )); then
  echo "error: NODE_RANK=$node_rank must be in 0..$((nnodes - 1)) (NNODES=$nnodes)" >&2
  exit 2
fi
if [[ "$coordinator" != *:* ]]; then
  echo "error: COORDINATOR=$coordinator must be host:port (node 0's address and a free port)" >&2
  exit 2
fi
per_node=1
if [[ "${E2_PER_GPU:-0}" == 1 ]]; then
  per_node="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pids=()
for ((local_rank = 0; local_rank < per_node; local_rank++)); do
  env_vars=(JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$((nnodes * per_node))"
            JAX_PROCESS_ID="$((node_rank * per_node + local_rank))")
  if [[ "${E2_PER_GPU:-0}" == 1 ]]; then
    env_vars+=(CUDA_VISIBLE_DEVICES="$local_rank")
  fi
  command=(env "${env_vars[@]}" "${E2_PYTHON:-python}" -m e2_jax.main "$@")
  printf '%q ' "${command[@]}"
  echo
  if [[ "$dry_run" == 0 ]]; then
    "${command[@]}" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
