"""Start worker scripts as N local JAX processes (CPU collectives over localhost) and collect
the JSON each writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# XLA's CPU compiler as the suite runs it (tests/conftest.py sets it for the session, and every
# process a test starts gets it through `xla_flags`): LLVM at -O0 and the classic emitters
# instead of the fusion emitters. The tiny E² step compiles in 7 s instead of 17 s and runs in
# 95 ms instead of 32 ms, which pays for the few steps a test runs (docs/benchmarks.md). The
# programs are the same; XLA's CPU backend compiles without fast-math at any level.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int | None = None, existing: str = "") -> str:
    """XLA_FLAGS for a test process: `FAST_COMPILE`, `devices` fake CPU devices, and any of
    `existing`'s other flags."""
    kept = [f for f in existing.split() if not f.startswith("--xla_force_host_platform_device_count")
            or devices is None]
    names = {f.split("=")[0] for f in kept}
    flags = [f for f in FAST_COMPILE if f.split("=")[0] not in names] + kept
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: Path, processes: int, data_dir: str, out_dir: Path, timeout: int = 600) -> list[dict]:
    """Runs `worker PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT_JSON` as `processes` processes;
    each must exit 0 (else the assertion shows its log); returns their JSON outputs."""
    port = free_port()
    env = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    outs = [out_dir / f"{worker.stem}_{processes}_{i}.json" for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(processes), str(port), data_dir, str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-6000:]
    return [json.loads(out.read_text()) for out in outs]


def interleaved(devices) -> list:
    """`devices` ordered process by process in turn (0, 1, 0, 1, ...), as a TPU pod slice's
    torus order places hosts along the batch; local CPU devices are otherwise numbered process
    by process, which never shows that case."""
    by_process = [[d for d in devices if d.process_index == p] for p in sorted({d.process_index for d in devices})]
    return [d for turn in zip(*by_process, strict=True) for d in turn]
