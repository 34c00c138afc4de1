#!/usr/bin/env bash
# XLA and NCCL settings for multi-GPU training, sourced by gpu_slurm.sbatch and gpu_multinode.sh.
# Each is a default: a value already in the environment wins. E2_GPU_DEFAULTS=0 sets none.
#
#   XLA_FLAGS += --xla_gpu_enable_latency_hiding_scheduler=true   overlap the gradient all-reduce and
#                 FSDP all-gathers with compute (the flag JAX's GPU performance guide and NVIDIA's
#                 JAX containers set); appended to your XLA_FLAGS unless they set it already
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.9   JAX's share of each GPU (its default, 0.75, leaves 25% idle)
#   NCCL_DEBUG=WARN                      NCCL's warnings in the log, not its chatter
#   TF_FORCE_GPU_ALLOW_GROWTH=true       a GPU build of TensorFlow, if one is installed, takes no
#                 GPU memory up front (the input pipeline also hides GPUs from it:
#                 e2_jax/data/tensorflow_cpu.py)
# shellcheck shell=bash

if [[ "${E2_GPU_DEFAULTS:-1}" != 0 ]]; then
  if [[ "${XLA_FLAGS:-}" != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
  fi
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export TF_FORCE_GPU_ALLOW_GROWTH="${TF_FORCE_GPU_ALLOW_GROWTH:-true}"
fi

gpu_env_summary() {  # one line for the log: what the processes get
  echo "XLA_FLAGS=${XLA_FLAGS:-} XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-} NCCL_DEBUG=${NCCL_DEBUG:-}"
}
