#!/usr/bin/env bash
# e2_jax on GPU machines without a scheduler: run this on every node with the same arguments.
#
#   # on node 0 and node 1 (node0 reachable from both on port 29500):
#   NNODES=2 NODE_RANK=0 COORDINATOR=node0:29500 launch/gpu_multinode.sh --config configs/e2_b16.py --workdir /shared/run
#   NNODES=2 NODE_RANK=1 COORDINATOR=node0:29500 launch/gpu_multinode.sh --config configs/e2_b16.py --workdir /shared/run
#   ... E2_PER_GPU=1 ...    one process per GPU (GPUS_PER_NODE of them, default: nvidia-smi -L | wc -l)
#   ... --dry-run ...       print each process's command and environment, run nothing
#
# One process per node by default (it drives all the node's GPUs). Each process gets
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (node rank x processes per node
# + local rank), which e2_jax/distributed.py reads. The coordinator is process 0, on node 0: its
# port must be free there and open to the other nodes (one node alone: a random free-looking port
# on localhost). The workdir must be on storage every node sees. SIGTERM or Ctrl-C is passed to
# every process (each saves a checkpoint and exits); if one process fails, the others on this
# node are stopped. E2_PYTHON: the Python to run (default python); XLA/NCCL defaults in
# launch/gpu_env.sh. Needs bash 5.1 or later.
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
if (( node_rank < 0 || node_rank >= nnodes )); then
  echo "error: NODE_RANK=$node_rank must be in 0..$((nnodes - 1)) (NNODES=$nnodes)" >&2
  exit 2
fi
if [[ -z "${COORDINATOR:-}" && "$nnodes" -gt 1 ]]; then
  echo "error: set COORDINATOR=HOST:PORT (node 0's address and a free port) on every node" >&2
  exit 2
fi
coordinator="${COORDINATOR:-localhost:$((20000 + RANDOM % 20000))}"
if [[ "$coordinator" != *:* ]]; then
  echo "error: COORDINATOR=$coordinator must be host:port (node 0's address and a free port)" >&2
  exit 2
fi
per_node=1
if [[ "${E2_PER_GPU:-0}" == 1 ]]; then
  per_node="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/gpu_env.sh
source launch/gpu_env.sh
gpu_env_summary
IFS=, read -r -a visible <<< "${CUDA_VISIBLE_DEVICES:-}"

pids=()
for ((local_rank = 0; local_rank < per_node; local_rank++)); do
  env_vars=(JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$((nnodes * per_node))"
            JAX_PROCESS_ID="$((node_rank * per_node + local_rank))")
  if [[ "${E2_PER_GPU:-0}" == 1 ]]; then  # the local_rank-th GPU this node lets us see
    env_vars+=(CUDA_VISIBLE_DEVICES="${visible[local_rank]:-$local_rank}")
  fi
  command=(env "${env_vars[@]}" "${E2_PYTHON:-python}" -m e2_jax.main "$@")
  printf '%q ' "${command[@]}"
  echo
  if [[ "$dry_run" == 0 ]]; then
    "${command[@]}" &
    pids+=("$!")
  fi
done
if [[ "$dry_run" == 1 ]]; then
  exit 0
fi

# shellcheck disable=SC2317  # called by the trap
forward() {  # SIGTERM / SIGINT: every process saves and exits
  echo "signal: passing SIGTERM to ${#pids[@]} processes"
  kill -TERM "${pids[@]}" 2> /dev/null || true
}
trap forward TERM INT
status=0
remaining=("${pids[@]}")
while (( ${#remaining[@]} > 0 )); do
  finished=""
  if wait -n -p finished "${remaining[@]}"; then code=0; else code=$?; fi
  if [[ -z "${finished:-}" ]]; then continue; fi  # a trapped signal interrupted the wait
  left=()
  for pid in "${remaining[@]}"; do
    if [[ "$pid" != "$finished" ]]; then left+=("$pid"); fi
  done
  remaining=("${left[@]}")
  if (( code != 0 )); then
    status=$code
    if (( ${#remaining[@]} > 0 )); then
      echo "error: process $finished exited with status $code: stopping the other ${#remaining[@]} on this node" >&2
      kill -TERM "${remaining[@]}" 2> /dev/null || true
      for _ in $(seq 60); do  # 30 s to save and leave, then SIGKILL
        if ! kill -0 "${remaining[@]}" 2> /dev/null; then break; fi
        sleep 0.5
      done
      kill -KILL "${remaining[@]}" 2> /dev/null || true
      wait "${remaining[@]}" 2> /dev/null || true
    fi
    break
  fi
done
exit "$status"
