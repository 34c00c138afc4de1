"""Multi-host start-up, in one place. Call `initialize()` before anything touches a device.

Where the processes learn about each other:

1. `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (GPU clusters without
   Slurm, and the tests' local processes): used as given.
2. A Slurm job step or an Open MPI run with more than one task: JAX reads the scheduler's
   variables (`jax.distributed.initialize()` with no arguments).
3. A Cloud TPU VM: JAX asks the TPU runtime (also no arguments; one host is one process).

Otherwise the run is one process. On CPU with several processes, collectives go over gloo.
"""

from __future__ import annotations

import os

import jax
from absl import logging

_TPU_MARKERS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")


def _on_cloud_tpu() -> bool:
    return any(k in os.environ for k in _TPU_MARKERS) or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def _scheduler_tasks() -> int:
    for variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 1


def initialize(mode: str = "auto") -> None:
    """`mode`: "auto" (the rules above), "on" (always call `jax.distributed.initialize`), "off"."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
    if mode == "off" or jax.distributed.is_initialized():
        return
    env = os.environ
    if "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
        missing = [v for v in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if v not in env]
        if missing and num_processes > 1:
            raise ValueError(f"JAX_NUM_PROCESSES={num_processes} is set but {missing} is not: set all three of "
                             "JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID")
        if num_processes > 1:
            # Collectives between CPU devices of different processes (tests, CPU runs); GPU and
            # TPU devices are not affected.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes, int(env["JAX_PROCESS_ID"]))
    elif mode == "on" or _scheduler_tasks() > 1 or _on_cloud_tpu():
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())

