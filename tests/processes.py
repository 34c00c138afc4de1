"""Start worker scripts as N local JAX processes (CPU collectives over localhost) and collect
the JSON each writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: Path, processes: int, data_dir: str, out_dir: Path, timeout: int = 600) -> list[dict]:
    """Runs `worker PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT_JSON` as `processes` processes;
    each must exit 0 (else the assertion shows its log); returns their JSON outputs."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
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
