"""Multi-host start-up, in one place. Call `initialize()` before anything touches a device.

`plan(environ)` reads the environment a launcher or scheduler set and says how this process
joins the others; it is a pure function, tested against the full environments of real jobs:

1. `JAX_NUM_PROCESSES` > 1 (with `JAX_COORDINATOR_ADDRESS`, `JAX_PROCESS_ID`): used as given
   (`launch/gpu_multinode.sh`, any launcher of your own, the tests' local processes).
2. A Slurm job step (`srun`) with more than one task: coordinator = the step's first node, on a
   port derived from the job id (two jobs sharing a node do not collide; `JAX_COORDINATOR_PORT`
   overrides it), process id and count from Slurm. Which GPUs a process drives is worked out
   from the tasks on its node and `CUDA_VISIBLE_DEVICES`, not assumed: one task per node drives
   every visible GPU; one task per GPU drives its own, whether Slurm left it all the node's GPUs
   (`--gpus-per-node`: task k takes visible GPU k) or only its own (`--gpus-per-task`, or
   `launch/gpu_slurm.sbatch`: the one it sees). JAX's own Slurm detection assumes the first
   case and gives the others the wrong GPU (or one GPU of eight), so it is switched off.
3. A Cloud TPU VM or a GKE TPU pod: JAX asks the TPU runtime (`jax.distributed.initialize()`
   with no arguments; one process per host, every local chip).
4. Open MPI (`mpirun`) with more than one rank: JAX reads Open MPI's variables.

Otherwise the run is one process. On CPU with several processes, collectives go over gloo.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from e2_jax.errors import UserError

_TPU_MARKERS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_PROCESS_ADDRESSES")
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


class StartupError(UserError, RuntimeError):
    """The environment names a multi-process run that cannot start as it is; says why and how."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process starts: `how` names the case ("single", "env", "slurm", "tpu", "mpi",
    "auto", "initialised"), `arguments` are those of `jax.distributed.initialize` (None: one
    process, no call)."""

    how: str
    arguments: dict[str, Any] | None
    note: str = ""


def _hostnames(nodelist: str) -> list[str]:
    """Slurm's compact host list ("gpu[001-003,007],login2", "rack[1-2]-node[01-04]") as names,
    in Slurm's order (several brackets: the first varies slowest)."""
    hosts = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)  # split at commas outside brackets
    return [name for host in hosts for name in _expand(host)]


def _expand(host: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", host)
    if not match:
        return [host]
    prefix, ranges, rest = match.groups()
    numbers = []
    for item in ranges.split(","):
        first, _, last = item.partition("-")
        numbers += [f"{n:0{len(first)}d}" for n in range(int(first), int(last or first) + 1)]
    return [f"{prefix}{number}{tail}" for number in numbers for tail in _expand(rest)]


def _tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this job step on this node, from Slurm's "2(x3),1" form and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return int(env.get("SLURM_NTASKS_PER_NODE", "1"))
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise StartupError(f"cannot read the tasks per node {spec!r} (SLURM_STEP_TASKS_PER_NODE)")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else counts[-1]


def _slurm_local_devices(env: Mapping[str, str]) -> tuple[list[int] | None, str]:
    tasks = _tasks_on_node(env)
    local = int(env["SLURM_LOCALID"])
    if tasks == 1:
        return None, "one task on this node: every visible GPU"
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        # Nothing says which GPUs this task sees: as JAX assumes, every one of the node's,
        # one per task.
        return [local], f"{tasks} tasks on this node, CUDA_VISIBLE_DEVICES unset: GPU {local}"
    if len(visible) == 1:
        return None, f"{tasks} tasks on this node, each sees its own GPU ({visible[0]})"
    if len(visible) % tasks:
        raise StartupError(
            f"Slurm started {tasks} tasks on this node, which sees {len(visible)} GPUs "
            f"(CUDA_VISIBLE_DEVICES={','.join(visible)}): they cannot be shared out evenly. Start one task per "
            "node (--ntasks-per-node=1) or one per GPU (--ntasks-per-node=GPUS, or --gpus-per-task=1), or set "
            "JAX_LOCAL_DEVICE_IDS for each task yourself")
    each = len(visible) // tasks
    ids = list(range(local * each, (local + 1) * each))
    return ids, f"{tasks} tasks share {len(visible)} visible GPUs: this one drives {ids}"


def _on_cloud_tpu(env: Mapping[str, str], device_files: Sequence[str]) -> bool:
    return any(k in env for k in _TPU_MARKERS) or any(os.path.exists(f) for f in device_files)


def plan(env: Mapping[str, str], mode: str = "auto", tpu_device_files: Sequence[str] = _TPU_DEVICE_FILES) -> Plan:
    """How this process starts, from the environment `env` (the rules in the module's
    docstring). `mode`: "auto", "on" (call `jax.distributed.initialize` even where nothing
    says several processes), "off" (one process)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
    if mode == "off":
        return Plan("single", None, "config.distributed='off'")
    explicit_ids = env.get("JAX_LOCAL_DEVICE_IDS")
    local_ids = [int(x) for x in explicit_ids.split(",")] if explicit_ids else None
    if "JAX_NUM_PROCESSES" in env:
        count = int(env["JAX_NUM_PROCESSES"])
        missing = [v for v in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if v not in env]
        if count > 1 and missing:
            raise StartupError(f"JAX_NUM_PROCESSES={count} is set but {' and '.join(missing)} is not: set all three "
                               "of JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID")
        if count > 1:
            return Plan("env", dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=count,
                                    process_id=int(env["JAX_PROCESS_ID"]), local_device_ids=local_ids,
                                    cluster_detection_method="deactivate"),
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    elif int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1 and "SLURM_JOB_ID" in env:
        if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
            raise StartupError(
                f"this Slurm job has {env.get('SLURM_NTASKS')} tasks, but this process was not started by srun "
                "(no SLURM_STEP_NODELIST / SLURM_PROCID): run `srun python -m e2_jax.main ...` inside the batch "
                "script (launch/gpu_slurm.sbatch does), or set --config.distributed=off for one process")
        count = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        port = env.get("JAX_COORDINATOR_PORT") or str(61440 + int(env["SLURM_JOB_ID"]) % 4096)
        coordinator = env.get("JAX_COORDINATOR_ADDRESS") or f"{_hostnames(env['SLURM_STEP_NODELIST'])[0]}:{port}"
        note = "JAX_LOCAL_DEVICE_IDS"
        if local_ids is None:
            local_ids, note = _slurm_local_devices(env)
        return Plan("slurm", dict(coordinator_address=coordinator, num_processes=count,
                                  process_id=int(env["SLURM_PROCID"]), local_device_ids=local_ids,
                                  cluster_detection_method="deactivate"),
                    f"Slurm job {env['SLURM_JOB_ID']}, {note}")
    elif _on_cloud_tpu(env, tpu_device_files):
        return Plan("tpu", {}, "Cloud TPU: the TPU runtime names the hosts")
    elif int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return Plan("mpi", {}, "Open MPI")
    if mode == "on":
        return Plan("auto", {}, "config.distributed='on': JAX's own cluster detection")
    return Plan("single", None, "nothing names other processes")


def initialize(mode: str = "auto") -> Plan:
    """Joins this process to the others as `plan(os.environ, mode)` says (once; idempotent)."""
    import jax
    from absl import logging

    if jax.distributed.is_initialized():
        return Plan("initialised", {}, "jax.distributed was initialised before")
    chosen = plan(os.environ, mode)
    if chosen.arguments is None:
        return chosen
    arguments = {k: v for k, v in chosen.arguments.items() if v is not None}
    if arguments.get("num_processes", 2) > 1:
        # Collectives between CPU devices of different processes (tests, CPU runs); GPU and
        # TPU devices are not affected.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("multi-host start-up (%s: %s): jax.distributed.initialize(%s)", chosen.how, chosen.note,
                 ", ".join(f"{k}={v!r}" for k, v in arguments.items()))
    jax.distributed.initialize(**arguments)
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return chosen


_AGREE_TIMEOUT_MS = 30 * 60 * 1000


def agree_max(name: str, values: Sequence[int]) -> list[int]:
    """The element-wise maximum of `values` over all processes (each must call it with the same
    unique `name`, in the same order). Host to host through the coordinator's key-value store,
    never the devices: the input pipeline calls it for the next batch while a step runs, and a
    device collective would queue behind that step."""
    import jax

    if jax.process_count() == 1:
        return [int(v) for v in values]
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    prefix = f"e2_jax/agree/{name}/"
    client.key_value_set(f"{prefix}{jax.process_index()}", ",".join(str(int(v)) for v in values))
    client.wait_at_barrier(f"e2_jax/agree/{name}", _AGREE_TIMEOUT_MS)
    entries = dict(client.key_value_dir_get(prefix))
    if len(entries) != jax.process_count():
        raise RuntimeError(f"agree_max({name!r}): {len(entries)} of {jax.process_count()} processes answered")
    rows = np.array([[int(v) for v in text.split(",")] for text in entries.values()], np.int64)
    return [int(v) for v in rows.max(axis=0)]


def forget(name: str) -> None:
    """Drops this process's value of a past `agree_max(name, ...)` (every process has read it
    once a later agreement's barrier has passed)."""
    import jax

    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed

        jax_distributed.global_state.client.key_value_delete(f"e2_jax/agree/{name}/{jax.process_index()}")


def single_host_only(tool: str) -> None:
    """For the tools that run as one process (search, probe, tagging, visualize, captioning):
    started as one of several processes, say so and stop instead of each doing the whole job."""
    try:
        chosen = plan(os.environ)
    except StartupError:  # e.g. the batch shell of a many-task Slurm job: itself one process
        return
    if chosen.how in ("env", "slurm", "mpi"):
        print(f"error: {tool} runs as one process on one host (it uses every local device), but this is one of "
              f"several processes ({chosen.note}). Run it once, on one host, without the multi-host launcher.",
              file=sys.stderr)
        sys.exit(2)


def check_devices(argv: Sequence[str] | None = None) -> int:
    """`python -m e2_jax.distributed --platform tpu --count 4`: this host's devices, before a
    run (launch/tpu_worker.sh calls it on every TPU worker). Exit 1 if they are not what is expected."""
    import argparse
    import socket

    parser = argparse.ArgumentParser(prog="python -m e2_jax.distributed", description=check_devices.__doc__)
    parser.add_argument("--platform", help="expected platform (tpu, gpu, cpu)")
    parser.add_argument("--count", type=int, help="expected number of local devices")
    args = parser.parse_args(argv)
    import jax

    devices = jax.local_devices()
    kinds = sorted({d.device_kind for d in devices})
    print(f"{socket.gethostname()}: {len(devices)} {jax.default_backend()} devices ({', '.join(kinds)})", flush=True)
    wrong = []
    if args.platform and jax.default_backend() != args.platform:
        wrong.append(f"platform {jax.default_backend()}, expected {args.platform}")
    if args.count is not None and len(devices) != args.count:
        wrong.append(f"{len(devices)} devices, expected {args.count}")
    if wrong:
        print(f"error: {socket.gethostname()}: {'; '.join(wrong)}. Another process may hold the accelerators "
              "(launch/tpu_vm.sh clears stale ones), or the accelerator build of JAX is missing.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(check_devices())
