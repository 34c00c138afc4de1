"""Training metrics: TensorBoard event files and a JSON-lines file in the workdir, a console
progress bar, and model FLOP utilisation. Only process 0 writes.

MFU = (the step's FLOPs per device) / (seconds per step) / (the device's peak). The FLOPs are
XLA's count of the *lowered* step, the whole program before partitioning and optimisation,
divided by the number of devices: the model's arithmetic, the same on every backend and every
mesh. A backend reached through a PJRT plug-in (a TPU, a CUDA GPU) does not count lowered
programs; the CPU backend's cost analysis counts the same lowered module instead. The compiled
program's count is used only where neither can count: it misses work and adds some. On a GPU it
leaves out the GEMMs XLA hands to cuBLAS (custom calls: 46 of 10,396 GFLOPs on an H200,
docs/benchmarks.md); on a TPU it counts once the body of each loop the compiler makes of an
FSDP matmul and its collective (`windowed_dot_general`): it counted 78.8 of the 103.9 GFLOP an
example of a B/32 E² step with FSDP on v5e-16. Everywhere it adds the work each device repeats
(a replicated optimizer update). With `model.remat` the lowered step holds the forward pass it
recomputes, so its count, and the MFU, include the recomputation (hardware FLOPs, not model
FLOPs). Peaks are dense bfloat16 FLOP/s from the vendors' data sheets; a device not in the
table (a CPU) has no MFU unless `peak_flops` is configured.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
from tqdm import tqdm

from e2_jax import storage
from e2_jax.data import tensorflow_cpu

# Dense bfloat16 peak FLOP/s per device, matched as a prefix of `device.device_kind`.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H800": 989e12, "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12, "NVIDIA A100": 312e12, "NVIDIA A800": 312e12, "NVIDIA L4": 121e12,
}


def peak_flops(device: jax.Device, configured: float = 0.0) -> float | None:
    if configured:
        return configured
    kind = device.device_kind
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


def _flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def lowered_flops(lowered: jax.stages.Lowered) -> float | None:
    """XLA's count of the lowered (global, unpartitioned) program: the backend's own, else the CPU
    backend's count of the same module (module docstring); None where neither counts."""
    if (flops := _flops(lowered)) is not None:
        return flops
    try:
        from jax._src.lib import _jax  # the cost analysis jax's own Lowered.cost_analysis calls
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                             lowered.compiler_ir("hlo").as_hlo_module())
    except Exception:  # no CPU backend (JAX_PLATFORMS without cpu), or a jax without this call
        return None
    flops = cost.get("flops")
    return float(flops) if flops and flops > 0 else None


def step_flops(lowered: jax.stages.Lowered, devices: int, compiled: jax.stages.Compiled | None = None) -> float | None:
    """FLOPs of one call of a step per device: XLA's count of the lowered program over the
    `devices` that share it, else `compiled`'s per-device count (module docstring)."""
    if (flops := lowered_flops(lowered)) is not None:
        return flops / devices
    return _flops(compiled) if compiled is not None else None


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


class Writer:
    """Scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/` (process 0 only; in a
    bucket workdir both are written locally and uploaded after each write, see storage.Mirror)."""

    def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None) -> None:
        """`resume_step`: the run goes on from this step, so the lines written after it by the
        run that stopped (and that this one writes again) are dropped from metrics.jsonl."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        tf = tensorflow_cpu.load()  # (loaded already where the input pipeline runs)
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        # What tensorboard's own tf.summary.scalar writes, without needing the tensorboard
        # package to write it (only to view it: pip install tensorboard).
        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        self._scalar = summary_pb2.SummaryMetadata(plugin_data=plugin).SerializeToString()
        self._files = storage.Mirror(workdir, resume=("metrics.jsonl",))
        jsonl = self._files.local / "metrics.jsonl"
        if resume_step is not None and jsonl.is_file():
            lines = jsonl.read_text().splitlines(keepends=True)
            kept = [line for line in lines if (step := _step_of(line)) is not None and step <= resume_step]
            if len(kept) != len(lines):
                storage.write_text(jsonl, "".join(kept))
        self._jsonl = jsonl.open("a")
        self._tb = tf.summary.create_file_writer(str(self._files.local / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            for name, value in clean.items():
                if math.isfinite(value):
                    self._tf.summary.write(name, self._tf.constant(value, self._tf.float32), metadata=self._scalar)
        self._tb.flush()
        self._files.upload()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self._files.close()


class Progress:
    """A tqdm bar over the run's steps with ETA (process 0; plain lines when not a terminal)."""

    def __init__(self, total: int, initial: int) -> None:
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                         disable=jax.process_index() != 0, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def update(self, steps: int, **postfix: Any) -> None:
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(steps)

    def write(self, line: str) -> None:
        if jax.process_index() == 0:
            self._bar.write(line)

    def close(self) -> None:
        self._bar.close()
