"""`python -m e2_jax.compile_check --config CONFIG --topology v5p-128`: compile a run for a TPU
slice on this machine, with no TPU, before anyone reserves one.

    python -m e2_jax.compile_check --config configs/e2_b16.py --topology v5e-256
    python -m e2_jax.compile_check --config configs/e2_synth.py:runlocal --topology v5e-16
    python -m e2_jax.compile_check --config configs/e2_b32.py --topology v5p-128 --max-batch
    ... --config.batch_size=2048 --config.mesh="(('data', -1), ('fsdp', 8))"   any field, as in main
    ... --json report.json                     the table's numbers for scripts, besides the table

libtpu (`pip install -e .[tpu]`) describes the slice as the real one is: its chips, their torus
coordinates and hosts (`jax.experimental.topologies`), and runs the real TPU compiler on this
CPU, as MaxText's train_compile.py does. What is compiled is what a run of the config compiles
on that slice: the mesh from `sharding.make_mesh` over the slice's devices, each stage's step
(`training.step.build_stage`) at the config's global batch with the largest region-text call
shapes the pipeline's packing can give at that batch (every tag distinct: an upper bound; a run
compiles the smaller variants it meets), and the evaluation encoders. For each program, per
chip: memory by kind against the chip's HBM (XLA's buffer assignment: arguments, temporaries,
outputs, less what outputs alias), FLOPs per step and per example (XLA's count of the lowered
program over the chips, `metrics.step_flops`), the collectives by kind with their bytes, the
instructions the compiler recomputes to fit (a step that fits only so is said on the `fits`
line), and the compile time. It exits 1 when a program does not fit, with the numbers or the
compiler's words. `--max-batch` finds the largest global batch whose steps fit as written.
The compiler measures memory, XLA counts FLOPs; time per step needs the hardware
(docs/multihost.md, "Before you reserve a pod").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from e2_jax import errors, sharding
from e2_jax.data import pipeline, region_texts
from e2_jax.errors import ConfigError
from e2_jax.evaluation import evaluate
from e2_jax.metrics import step_flops
from e2_jax.spec import RunSpec, resolve
from e2_jax.training import step as train_step

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation as users name its slices and as libtpu names its topologies, or a GPU
    as XLA's compile-only GPU target describes it."""

    name: str  # what slice names start with: v5p-128, h100-16
    kind: str  # jax's device_kind
    hbm_gib: float  # per chip, as the device reports it
    cores_per_chip: int = 1  # TensorCores a slice name counts (v4, v5p: 2 per chip, one megacore device)
    dims: int = 2  # torus dimensions (TPU)
    platform: str = "tpu"
    usable: float = 1.0  # of the memory, what a run may fill (GPU: XLA_PYTHON_CLIENT_MEM_FRACTION)
    spec: str = ""  # GPU: XLA's GpuTargetConfigProto, what the compiler needs to know of the device


def _gpu_spec(kind: str, memory_bytes: int, bandwidth: int) -> str:
    """A Hopper GPU (compute capability 9.0, 132 SMs) as XLA's GPU compiler takes it (the fields
    of XLA's own spec files, xla/tools/hlo_opt/gpu_specs)."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory_bytes} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{kind}"
"""


# launch/gpu_env.sh lets XLA take 90% of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION=0.9).
GPU_MEMORY_FRACTION = 0.9
GENERATIONS = {
    "v4": Generation("v4", "TPU v4", 32, cores_per_chip=2, dims=3),
    "v5p": Generation("v5p", "TPU v5", 95, cores_per_chip=2, dims=3),
    "v5e": Generation("v5e", "TPU v5 lite", 16),
    "v6e": Generation("v6e", "TPU v6 lite", 32),
    # Memory as the devices report it: H100 SXM 80 GB, 79.1 GiB (XLA's H100 spec); H200 141 GB,
    # 143,771 MiB (the H200 of docs/benchmarks.md's device suite).
    "h100": Generation("h100", "NVIDIA H100 80GB HBM3", 84_978_434_048 / GIB, platform="cuda",
                       usable=GPU_MEMORY_FRACTION,
                       spec=_gpu_spec("NVIDIA H100 80GB HBM3", 84_978_434_048, 3_352_320_000_000)),
    "h200": Generation("h200", "NVIDIA H200", 143_771 * 2**20 / GIB, platform="cuda", usable=GPU_MEMORY_FRACTION,
                       spec=_gpu_spec("NVIDIA H200", 143_771 * 2**20, 4_800_000_000_000)),
}
ALIASES = {"v5litepod": "v5e", "v6": "v6e"}
# Slice sizes users can create (chips): Cloud TPU's documented v4/v5p/v5e/v6e shapes.
CHIPS = {2: (1, 4, 8, 16, 32, 64, 128, 256), 3: (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)}
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice, or GPU hosts (8 GPUs each unless named `h100:HOSTSxGPUS`)."""

    name: str  # as the user typed it
    generation: Generation
    chips: int
    topology: str  # libtpu's name (v5e:4x4), or hosts x GPUs per host (2x8)

    @property
    def hbm_bytes(self) -> float:
        return self.generation.hbm_gib * GIB

    @property
    def budget_bytes(self) -> float:
        """What a run's programs may fill on one chip."""
        return self.hbm_bytes * self.generation.usable


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The slice's shape: 16 -> 4x4, 32 -> 4x8 (2-D); 4 -> 2x2x1, 32 -> 2x4x4, 128 -> 4x4x8 (3-D)."""
    if dims == 2:
        side = 1 << (int(math.log2(chips)) // 2)
        return (side, chips // side)
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return tuple(shape)


def known_slices() -> list[str]:
    names = []
    for gen in GENERATIONS.values():
        if gen.platform == "tpu":
            names += [f"{gen.name}-{chips * gen.cores_per_chip}" for chips in CHIPS[gen.dims]]
    return names


def _gpu_hosts(count: int) -> tuple[int, int]:
    return (1, count) if count <= GPUS_PER_HOST else (count // GPUS_PER_HOST, GPUS_PER_HOST)


def parse_slice(name: str) -> Slice:
    """`v5p-128`, `v5litepod-256` / `v5e-256`, `v6e-64`, `v4-32`, or libtpu's own `v5e:4x4`; GPUs
    as `h100-16` (8 a host) or `h200:2x8` (hosts x GPUs per host)."""
    text = name.strip().lower()
    if match := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text):
        prefix, shape = match.groups()
        gen = GENERATIONS.get(ALIASES.get(prefix, prefix))
        dims = tuple(int(d) for d in shape.split("x"))
        if gen is not None and gen.platform == "cuda" and len(dims) == 2:
            return Slice(name, gen, math.prod(dims), shape)
        if gen is not None and gen.platform == "tpu" and len(dims) == gen.dims:
            return Slice(name, gen, math.prod(dims), f"{gen.name}:{shape}")
    elif match := re.fullmatch(r"([a-z0-9]+)-(\d+)", text):
        prefix, count = match.group(1), int(match.group(2))
        gen = GENERATIONS.get(ALIASES.get(prefix, prefix))
        if gen is not None and gen.platform == "cuda" and count > 0 and (count <= GPUS_PER_HOST
                                                                         or count % GPUS_PER_HOST == 0):
            return Slice(name, gen, count, "x".join(map(str, _gpu_hosts(count))))
        if gen is not None and gen.platform == "tpu" and count % gen.cores_per_chip == 0 \
                and count // gen.cores_per_chip in CHIPS[gen.dims]:
            chips = count // gen.cores_per_chip
            return Slice(name, gen, chips, f"{gen.name}:{'x'.join(map(str, _torus(chips, gen.dims)))}")
    raise ConfigError(f"unknown TPU slice {name!r}: give a slice name as gcloud takes it ({', '.join(known_slices())}; "
                      "v5litepod-N is v5e-N), or libtpu's topology (v5e:4x4, v5p:2x4x4); GPUs as h100-16 or "
                      "h200:2x8 (hosts x GPUs per host)")


def topology_devices(tpu: Slice, slices: int = 1) -> list:
    """The slice's devices as the compiler describes them: libtpu's (ids, torus coordinates,
    hosts; `slice_index` with several slices, one device per chip: megacore on v4 and v5p), or
    the CUDA plugin's compile-only GPUs (`pip install "jax[cuda12]"`, no GPU needed)."""
    if tpu.generation.platform == "cuda":
        return _gpu_devices(tpu, slices)
    options: dict[str, Any] = {}
    if tpu.generation.cores_per_chip == 2:
        options["chip_config_name"] = "megacore"
    if slices > 1:
        options["num_slices"] = slices
    try:
        with _quiet_libtpu():
            return list(topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu", **options).devices)
    except Exception as error:  # libtpu missing, or a topology it does not know
        if "libtpu" in str(error).lower() or isinstance(error, (ImportError, RuntimeError)):
            raise ConfigError(f"cannot describe {tpu.topology} without libtpu: install it with `pip install -e .[tpu]` "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        raise


def _gpu_devices(gpus: Slice, slices: int) -> list:
    if slices > 1:
        raise ConfigError("--slices is for TPU slices; give GPU hosts as h100:HOSTSxGPUS")
    try:
        description = topologies.get_topology_desc(topology_name="", platform="cuda", topology=f"1x{gpus.topology}",
                                                   target_config=gpus.generation.spec)
    except (NotImplementedError, RuntimeError) as error:  # no CUDA plugin
        raise ConfigError(f"cannot describe {gpus.name} without JAX's CUDA plugin: install it with "
                          f"`pip install \"jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')\"` "
                          f"(no GPU needed; {type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    return list(description.devices)


# libtpu looks for a TPU VM's metadata when it starts and warns that it found none: here that is
# expected, so it is told of one host. It also takes a machine-wide lock for the chips it drives;
# a description drives none, so several checks (or a check beside a test run) may load it at once.
_LIBTPU_START = {"TPU_ACCELERATOR_TYPE": "v5litepod-1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
                 "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@contextlib.contextmanager
def _quiet_libtpu() -> Iterator[None]:
    """`_LIBTPU_START` in the environment while libtpu starts (those the user set are kept), and
    taken out again: a process started later must not take this one for a TPU VM's
    (`e2_jax.distributed` reads TPU_WORKER_HOSTNAMES)."""
    added = {key: value for key, value in _LIBTPU_START.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# --- What a compiled program holds -------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_KIND = r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|ragged-all-to-all)"
_OP = re.compile(r"^\s*(?:ROOT )?%?\S+ = (.+?) " + _KIND + r"(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_ASYNC_START = re.compile(r"^\s*%?async-collective-start(?:\.\d+)? = ")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn|fnuz)?)?)\[([\d,]*)\]")
# Computations a fusion calls: their ops run as part of the fusion that calls them. The TPU
# compiler runs one collective asynchronously across many "async_collective_fusion"s (each moving
# it on while other work runs), each holding a copy of the op; one "async-collective-start"
# fusion starts it.
_FUSED = ("fused_computation", "async_collective_fusion")


def _array_bytes(dtype: str, dims: str) -> float:
    return _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)


def _computations(hlo: str) -> dict[str, list[str]]:
    computations: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in hlo.splitlines():
        if not line.startswith(" ") and (match := _COMPUTATION.match(line)):
            lines = computations.setdefault(match.group(1), [])
        elif lines is not None:
            lines.append(line)
    return computations


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute
    bytes: float  # per device: the op's result (an all-gather's gathered array, a permute's received one)
    shape: str  # the result as XLA writes it
    source: str  # the jax operation it comes from (op_name metadata: jvp = forward, transpose = backward)


def collective_ops(hlo: str) -> list[Collective]:
    """The collectives a compiled program runs, each once: an op outside fusions, or the one an
    "async-collective-start" fusion starts (its continuations in later fusions are the same
    collective)."""
    computations = _computations(hlo)
    found: list[Collective] = []

    def add(line: str) -> None:
        match = _OP.match(line)
        if not match:
            return
        shape, kind, start = match.groups()
        kind = "all-to-all" if kind == "ragged-all-to-all" else kind
        arrays = [_array_bytes(d, dims) for d, dims in _ARRAY.findall(shape) if d in _DTYPE_BYTES]
        if start and kind == "all-gather" and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2:]  # (operands..., outputs...)
        elif start and kind == "collective-permute" and len(arrays) > 1:
            arrays = arrays[1:2]  # (input, output, contexts)
        source = re.search(r'op_name="([^"]*)"', line)
        found.append(Collective(kind, sum(arrays), re.sub(r"\{[^}]*\}", "", shape), source.group(1) if source else ""))

    for name, lines in computations.items():
        if name.startswith(_FUSED):
            continue
        for line in lines:
            if _ASYNC_START.match(line) and (called := _CALLS.search(line)):
                for inner in computations.get(called.group(1), []):
                    add(inner)
            else:
                add(line)
    return found


def collectives(hlo: str) -> dict[str, tuple[int, float]]:
    """{kind: (count, bytes per device)} of `collective_ops(hlo)`."""
    out: dict[str, tuple[int, float]] = {}
    for op in collective_ops(hlo):
        count, total = out.get(op.kind, (0, 0.0))
        out[op.kind] = (count + 1, total + op.bytes)
    return out


@dataclasses.dataclass
class Program:
    name: str
    compile_s: float
    arguments: float
    temporaries: float
    outputs: float
    aliased: float
    code: float
    flops: float | None  # per device
    examples: int  # global examples per call
    collectives: dict[str, tuple[int, float]]
    hlo: str = dataclasses.field(default="", repr=False)  # the compiled program's text
    # Instructions the compiler recomputes to fit the HBM (XLA's rematerialization, which a TPU
    # compile runs when the program as written would not fit): the step fits, at more FLOPs.
    recomputed: int = 0

    @property
    def total(self) -> float:
        """Bytes a chip holds while the program runs: XLA's buffer assignment."""
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.code


class OutOfMemory(Exception):
    """The compiler found no way to fit a program in the chip's HBM, even recomputing."""


def measure(name: str, jitted, args: Sequence[Any], examples: int, devices: int) -> Program:
    """Lowers and compiles `jitted(*args)` (abstract arguments with shardings) for the slice;
    `OutOfMemory` (naming the program and quoting the compiler) where it cannot fit."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise OutOfMemory(f"{name}: {str(error).strip().splitlines()[0]}") from None
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return Program(name, seconds, float(memory.argument_size_in_bytes), float(memory.temp_size_in_bytes),
                   float(memory.output_size_in_bytes), float(memory.alias_size_in_bytes),
                   float(getattr(memory, "generated_code_size_in_bytes", 0) or 0),
                   step_flops(lowered, devices, compiled), examples, collectives(hlo := compiled.as_text()), hlo,
                   recomputed(hlo))


def recomputed(hlo: str) -> int:
    """How many instructions of a compiled program XLA's rematerialization pass added: it names
    each copy `<name>.remat` (`jax.checkpoint`'s recomputation, the `model.remat` option, is
    written in the program and named as any other instruction)."""
    return len(set(re.findall(r"%([\w.\-]*\.remat[\w.\-]*) = ", hlo)))


# --- A run's programs ---------------------------------------------------------------------------


def region_call_shapes(spec: RunSpec, global_batch: int) -> tuple[tuple[int, int], ...]:
    """(global rows, tokens) of the largest region-text calls the pipeline's packing can give
    at this batch (`pipeline._pack_region_texts`): every tag of every item distinct, each as
    long as its group allows. A run compiles the smaller variants it meets as well."""
    lengths = [length for _, _, length in spec.pre.tags]
    if not lengths:
        return ()
    batch_sharding = sharding.batch_sharding(spec.mesh)
    rows = pipeline.process_rows(batch_sharding, global_batch, process=0)
    processes = global_batch // len(rows)
    blocks = {index[0].indices(global_batch) for device, index in
              batch_sharding.devices_indices_map((global_batch,)).items() if device.process_index == 0}
    packing = region_texts.Packing(spec.pre.region_texts, len(rows), processes, len(blocks))
    short = [n for n in lengths if n <= region_texts.SHORT_TOKENS]
    long = [n for n in lengths if n > region_texts.SHORT_TOKENS]
    needs = [len(rows) * len(short), max(short, default=0), len(rows) * len(long), max(long, default=0)]
    return tuple((processes * count, tokens) for count, tokens in packing.shapes(needs, lengths))


def abstract_batch(spec: RunSpec, global_batch: int, region_calls: Sequence[tuple[int, int]] = ()) -> dict:
    """The step's global batch as shapes with the mesh's batch sharding (as the pipeline gives it)."""
    batch_sharding = sharding.batch_sharding(spec.mesh)
    array = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    size, context = spec.clip.image_size, spec.clip.context_length
    batch = {"images": array((global_batch, size, size, 3), jnp.float32),
             "text": array((global_batch, context), jnp.int32), "index": array((global_batch,), jnp.int32)}
    if spec.pre.tags:
        batch["region_tokens"] = [array(shape, jnp.int32) for shape in region_calls]
        batch["region_index"] = array((global_batch, len(spec.pre.tags)), jnp.int32)
    return batch


def run_programs(config: ml_collections.ConfigDict, devices: Sequence[Any], evaluation: bool = True) -> list[Program]:
    """Compiles each stage's step (and the evaluation encoders) of `config` over `devices`."""
    spec = resolve(config, train_examples=config.batch_size * 1000, devices=devices)
    batch = abstract_batch(spec, config.batch_size, region_call_shapes(spec, config.batch_size))
    programs = []
    for stage in spec.stages:
        program = train_step.build_stage(spec, stage)
        programs.append(measure(f"stage {stage.name} step", program.step, (program.abstract_state, batch),
                                config.batch_size, len(devices)))
    if evaluation:
        images, texts = evaluate.make_embed(spec)
        params = spec.abstract_params()
        eval_batch = abstract_batch(spec, config.eval.batch_size)
        programs.append(measure("evaluation: images", images, (params, {"images": eval_batch["images"]}),
                                config.eval.batch_size, len(devices)))
        programs.append(measure("evaluation: texts", texts, (params, {"text": eval_batch["text"]}),
                                config.eval.batch_size, len(devices)))
    return programs


# --- The report ---------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:.3f}"


def report(tpu: Slice, slices: int, mesh_shape: dict, global_batch: int, programs: Sequence[Program]) -> str:
    chips = tpu.chips * slices
    several = f"{slices} x " if slices > 1 else ""
    lines = [f"{tpu.name}: {several}{tpu.topology}, {chips} chips of {tpu.generation.kind} "
             f"({tpu.generation.hbm_gib:.3g} GiB HBM each); mesh {mesh_shape}; global batch {global_batch} "
             f"({global_batch / chips:g} per chip)", "",
             "| program | compile s | arguments GiB | temporaries GiB | outputs GiB | aliased GiB | total GiB | "
             "of budget | recomputed | GFLOP/step | GFLOP/example | collectives (count, MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in programs:
        flops = p.flops or float("nan")
        comm = ", ".join(f"{kind} {count} ({size / 2**20:,.1f})"
                         for kind, (count, size) in sorted(p.collectives.items()))
        lines.append(f"| {p.name} | {p.compile_s:.1f} | {_gib(p.arguments)} | {_gib(p.temporaries)} | "
                     f"{_gib(p.outputs)} | {_gib(p.aliased)} | {_gib(p.total)} | {p.total / tpu.budget_bytes:.0%} | "
                     f"{p.recomputed} | {flops / 1e9:,.1f} | {flops * chips / p.examples / 1e9:,.2f} | "
                     f"{comm or 'none'} |")
    return "\n".join(lines)


def program_row(p: Program) -> dict:
    """One program as `--json` writes it: its fields and `total`, without the compiled text."""
    return {**{k: v for k, v in dataclasses.asdict(p).items() if k != "hlo"}, "total": p.total}


def write_json(path: str | None, tpu: Slice, slices: int, mesh_shape: dict, global_batch: int,
               programs: Sequence[Program], verdict_line: str) -> None:
    """`--json`: the report's numbers (bytes, FLOPs per chip; collectives as kind: [count,
    bytes]), without the compiled programs' text."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"slice": tpu.name, "topology": tpu.topology, "chips": tpu.chips * slices, "slices": slices,
                   "mesh": mesh_shape, "global_batch": global_batch, "budget_bytes": tpu.budget_bytes,
                   "verdict": verdict_line, "programs": [program_row(p) for p in programs]}, f, indent=1)
        f.write("\n")


def verdict(tpu: Slice, programs: Sequence[Program]) -> tuple[bool, str]:
    worst = max(programs, key=lambda p: p.total)
    over = [p for p in programs if p.total > tpu.budget_bytes]
    if not over:
        recomputing = "".join(
            f"; the compiler recomputes {p.recomputed} instructions of {p.name} to fit (more FLOPs a step: "
            "a smaller batch, fsdp or model.remat avoids it)" for p in programs if p.recomputed)
        return True, (f"fits: every program within {_budget(tpu)} per chip (largest: "
                      f"{worst.name}, {_gib(worst.total)} GiB, {worst.total / tpu.budget_bytes:.0%}){recomputing}")
    return False, "does not fit: " + "; ".join(
        f"{p.name} needs {_gib(p.total)} GiB of {tpu.budget_bytes / GIB:.3g} "
        f"(over by {_gib(p.total - tpu.budget_bytes)} GiB)" for p in over)


def _budget(tpu: Slice) -> str:
    memory = f"{tpu.generation.hbm_gib:.3g} GiB of HBM"
    if tpu.generation.usable == 1:
        return memory
    return f"{tpu.budget_bytes / GIB:.3g} GiB ({tpu.generation.usable:.0%} of {memory})"


def largest_fitting(fits: Callable[[int], Any], start: int = 1,
                    guess: Callable[[int, int | None], int | None] | None = None) -> tuple[int, Any]:
    """The largest n >= 1 with `fits(n)` not None, and that result; (0, None) if `fits(1)` is
    None. `fits` must be monotone (once a size misses, every larger one does). From `start` (a
    guess: the same model's result on another slice, say), it gallops up or down in doubling
    steps until it brackets the answer, then bisects: 2 calls when `start` is the answer, about
    2 log2(distance) more when it is off (from `start` 1: 1, 2, 4, 8, ... then bisection).

    `guess(low, high)` may propose the next size from what the calls measured (a line through
    the memory of the sizes compiled): `low` is the largest size known to fit (0: none yet),
    `high` the smallest known to miss (None: none yet). A proposal is moved inside that
    interval (and to at most 16 times `low`); None takes the doubling or bisection step
    instead, as does a proposal below `low` (the line has `low` over its target already: it
    would creep up one size a compile) and the call after two proposals that landed on the same
    side. `guess` only chooses which sizes to call: the answer is the same, and the interval at
    least halves every three calls."""
    start = max(1, start)
    low, high, best = 0, None, None
    sides: list[bool] = []  # whether each proposal taken fitted, since the last fallback step
    up = down = 1

    def call(n: int) -> bool:
        nonlocal low, high, best
        if (found := fits(n)) is not None:
            low, best = n, found
        else:
            high = n
        return found is not None

    call(start)
    while high is None or high - low > 1:
        proposal = guess(low, high) if guess is not None else None
        if proposal is not None and proposal >= low and (len(sides) < 2 or sides[-1] != sides[-2]):
            proposal = max(low + 1, proposal if high is None else min(high - 1, proposal))
            sides.append(call(min(proposal, 16 * low) if low else proposal))
            continue
        sides.clear()
        if high is None:  # everything so far fits: gallop up
            n, up = low + up, up * 2
        elif low == 0 and start - down >= 1 and start - down < high:  # nothing fits yet: gallop down
            n, down = start - down, down * 2
        else:
            n = (low + high) // 2
        call(n)
    return low, best


def max_batch(config, devices: Sequence[Any], tpu: Slice, unit: int = 1, start: int = 1,
              tried: Callable[[int, list[Program]], None] | None = None, slope: float | None = None,
              compile: Callable[[ml_collections.ConfigDict], list[Program]] | None = None,
              ) -> tuple[int, list[Program]]:
    """The largest global batch whose stage steps fit the chip's HBM as written, without the
    compiler recomputing any instruction to fit (beyond that batch a TPU compile still succeeds
    while it can recompute, at more FLOPs per example, until it runs out of HBM): a multiple of
    `unit` examples per batch shard (times accum_steps), found by `largest_fitting` from `start`
    such multiples; (0, []) if even the smallest does not fit. The next batch to compile is where a
    line through the memory of two compiled batches meets the budget (the two that bracket it,
    else the two nearest it), where that line rises; once the compiler has recomputed to fit a
    batch, the line aims at the memory it squeezed that batch into (its own limit, below the
    HBM). Whether a batch fits is decided only by compiling it (with remat the memory is no
    line at small batches). `tried(global batch, programs)` sees each compiled batch (default:
    a line printed). `slope` (bytes per multiple of `unit`, from a like search: the same step
    on another slice or layout) draws the line through the first batch compiled, before there
    are two. `compile(config)` gives a batch's programs (default: `run_programs` without the
    evaluation encoders; a benchmark's log of earlier compiles, say), raising `OutOfMemory`."""
    shards = sharding.num_batch_shards(sharding.make_mesh(config.mesh, devices, config.mesh_dcn)) * config.accum_steps
    used: dict[int, float] = {}  # units -> bytes of the largest program, as written
    limit = tpu.budget_bytes  # the line's target: the budget, or what the compiler squeezed into

    def show(batch: int, programs: list[Program]) -> None:
        print(f"  batch {batch}: largest {max(p.total for p in programs) / GIB:.2f} GiB", flush=True)

    def fits(units: int) -> list[Program] | None:
        nonlocal limit
        trial = config.copy_and_resolve_references()
        trial.unlock()
        trial.batch_size = units * unit * shards
        try:
            programs = (compile or (lambda c: run_programs(c, devices, evaluation=False)))(trial)
        except OutOfMemory as error:
            print(f"  batch {trial.batch_size}: {error}", flush=True)
            return None
        if not any(p.recomputed for p in programs):  # the memory as written: a point on the line
            used[units] = max(p.total for p in programs)
        else:
            limit = min(limit, min(p.total for p in programs if p.recomputed))
        (tried or show)(trial.batch_size, programs)
        return programs if all(p.total <= tpu.budget_bytes and not p.recomputed for p in programs) else None

    units, best = largest_fitting(fits, start, lambda low, high: line_guess(used, low, high, limit, slope))
    return units * unit * shards, best or []


def line_guess(used: dict[int, float], low: int, high: int | None, budget: float,
               slope: float | None = None) -> int | None:
    """Where the line through two measured sizes meets `budget` (rounded down): the interval's
    ends when both are measured, else the two largest measured sizes that fit (or, none fitting
    yet, the two smallest); with one measured size, the line of `slope` (bytes per size, from a
    like search) through it; None with fewer, or where the line does not rise. `used` holds only
    memory as written (a size the compiler had to recompute or could not fit is not in it)."""
    if low and high in used:
        a, b = low, high
    else:
        ends = sorted(n for n in used if n <= low)[-2:] if low else sorted(used)[:2]
        if len(ends) == 1 and slope is not None:
            return ends[0] + math.floor((budget - used[ends[0]]) / slope) if slope > 0 else None
        if len(ends) < 2:
            return None
        a, b = ends
    slope = (used[b] - used[a]) / (b - a)
    if slope <= 0:
        return None
    return a + math.floor((budget - used[a]) / slope)


def main(argv: list[str] | None = None) -> None:
    """The command line (its flags are defined here, not at import: `e2_jax.main` defines the
    same names, and both are imported together in one process by the tests)."""
    config_flag = config_flags.DEFINE_config_file("config", None, "The run's config (configs/*.py[:arg]).",
                                                  lock_config=True)
    topology_flag = flags.DEFINE_string("topology", None, "The TPU slice, as gcloud names it (v5p-128, "
                                        "v5litepod-256 or v5e-256, v6e-64, v4-32), or libtpu's topology (v5e:4x4).")
    slices_flag = flags.DEFINE_integer("slices", 1, "Slices of that topology joined over the data-center network.")
    max_batch_flag = flags.DEFINE_boolean("max_batch", False, "Find the largest global batch whose steps fit "
                                           "without the compiler recomputing.")
    json_flag = flags.DEFINE_string("json", None, "Also write what the table shows to this file, as JSON "
                                    "(for scripts: the slice, mesh, global batch, verdict and each program).")
    flags.mark_flags_as_required(["config", "topology"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        # Compiling for a described slice needs no accelerator; the CPU stays the default backend
        # (on a GPU or TPU machine too: nothing here runs on a device).
        jax.config.update("jax_platforms", "cpu")
        tpu = parse_slice(topology_flag.value)
        devices = topology_devices(tpu, slices_flag.value)
        config = config_flag.value
        mesh = sharding.make_mesh(config.mesh, devices, config.mesh_dcn)
        if max_batch_flag.value:
            batch, programs = max_batch(config, devices, tpu)
            if not batch:
                raise ConfigError(f"no global batch of this config fits {tpu.name}: even one example per batch "
                                  "shard needs more than the chip's HBM; try fsdp, remat or a larger slice")
            print(f"largest global batch that fits: {batch}")
            print(report(tpu, slices_flag.value, dict(mesh.shape), batch, programs))
            write_json(json_flag.value, tpu, slices_flag.value, dict(mesh.shape), batch, programs,
                       verdict(tpu, programs)[1])
            return
        try:
            programs = run_programs(config, devices)
        except OutOfMemory as error:
            print(f"does not fit: the compiler ran out of HBM compiling {error}", flush=True)
            sys.exit(1)
        print(report(tpu, slices_flag.value, dict(mesh.shape), config.batch_size, programs))
        ok, line = verdict(tpu, programs)
        print(line, flush=True)
        write_json(json_flag.value, tpu, slices_flag.value, dict(mesh.shape), config.batch_size, programs, line)
        if not ok:
            sys.exit(1)

    errors.run(run, argv)


if __name__ == "__main__":
    main()
