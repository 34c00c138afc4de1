"""The one-shot device suite: the trainer's own step on one GPU or TPU host, in a few minutes.

    python -m benchmarks.device                              # everything that fits in --budget-s 270
    python -m benchmarks.device --models ViT-B-32 --batches 64,256 --budget-s 120
    python -m benchmarks.device --models tiny --batches 8 --steps 3 --out /tmp/r.md   # a CPU smoke run

For each (model, batch, method) in order (B/32 then B/16; batch 64, 256, then 512 for B/32;
CLIP-FT then E²), while the budget lasts: the stage program the trainer runs
(`e2_jax.training.step.build_stage`: forward, loss over the global batch, backward, Adam), bfloat16
compute as in the accelerator configs, random weights, fed synthetic global batches made as the
input pipeline makes them (images, 77-token global texts, and FashionGen-like tags of the
authors' five groups packed by `e2_jax.data.region_texts`, as the trainer's pipeline packs them).
Reported per row: compile seconds, ms/step (median of `--steps` after two warm-up steps),
examples/s, XLA's FLOP count of the step, TFLOP/s and MFU against the device's data-sheet
bfloat16 peak (`e2_jax.metrics.PEAK_FLOPS`); then E²'s time and FLOP ratios to CLIP-FT, and a
profile of one step of the last row (`jax.profiler`, its Perfetto trace summarised as text: the
15 device ops taking the most time and the share of the step the device sits idle). Everything
goes to one Markdown file (`--out`), printed as well.

It imports neither TensorFlow nor TFDS. Where `ml_collections` is missing (the project's device
machine), put its wheel in `.device_wheels/` (ignored by git, carried to the device):
`pip download ml_collections==1.1.0 --no-deps -d .device_wheels`; a pure-Python wheel imports
from the path. Compiled programs go to the persistent cache (`--cache`), so a rerun skips XLA.
On a GPU, XLA's GEMM autotuning is off unless `--autotune` (with it on, five B/32 programs had
not compiled in 170 s on an H200), and the GEMMs go to cuBLAS: Triton's GEMMs on their default
tiles ran the same step 13x slower there (`--triton-gemm` keeps them); the report says which.
FLOPs are the lowered step's, per device (`e2_jax.metrics.step_flops`): the compiled count on a
GPU leaves out cuBLAS's GEMMs.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# With autotuning off, XLA's Triton GEMM fusions run on their default tiles: on an H200 the B/32
# step ran 13x slower than with cuBLAS (docs/benchmarks.md). cuBLAS needs no autotuning.
FAST_COMPILE_GPU_FLAGS = ("--xla_gpu_autotune_level=0", "--xla_gpu_enable_triton_gemm=false")


def _prepare_environment(argv: list[str]) -> None:
    """Before JAX starts: XLA's GPU autotuning off and GEMMs to cuBLAS (unless --autotune or
    --triton-gemm, or XLA_FLAGS already says), and the wheels."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--autotune" not in argv:
        for flag in FAST_COMPILE_GPU_FLAGS:
            name = flag.split("=")[0]
            if name not in flags and not (name.endswith("triton_gemm") and "--triton-gemm" in argv):
                flags = f"{flags} {flag}".strip()
        os.environ["XLA_FLAGS"] = flags
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        wheels = os.environ.get("E2_DEVICE_WHEELS") or str(ROOT / ".device_wheels")
        sys.path.extend(sorted(glob.glob(os.path.join(wheels, "*.whl"))))


_prepare_environment(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from e2_jax import config as recipes  # noqa: E402
from e2_jax.data import region_texts  # noqa: E402
from e2_jax.metrics import peak_flops, step_flops  # noqa: E402
from e2_jax.sharding import batch_sharding  # noqa: E402
from e2_jax.spec import RunSpec, resolve  # noqa: E402
from e2_jax.training import compilation, step  # noqa: E402

SOT, EOT = 49406, 49407
# FashionGen-like tags per group: (distinct values, shortest, longest tokens incl. start and
# end, Zipf exponent of how often values repeat; 0: every item its own).
TAG_SHAPES = {"subcategory": (48, 3, 6, 1.1), "brand": (2000, 3, 8, 1.1), "season": (7, 4, 4, 0.5),
              "composition": (400, 6, 30, 1.2), "description": (0, 25, 77, 0.0)}


def synthetic_tags(group: str, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """int32 [batch, length]: tags as the tokenizer gives them (start, words, end, zeros)."""
    values, shortest, longest, zipf = TAG_SHAPES.get(group, (100, 3, 8, 1.1))
    if values:
        weights = 1.0 / np.arange(1, values + 1) ** zipf
        chosen = rng.choice(values, size=batch, p=weights / weights.sum())
    else:
        chosen = rng.integers(0, 1 << 30, size=batch)
    out = np.zeros((batch, length), np.int32)
    for row, value in enumerate(chosen):
        own = np.random.default_rng([int(value), len(group)])  # a value's tokens are always the same
        n = min(length, int(own.integers(shortest, longest + 1)))
        out[row, : n - 1] = np.concatenate([[SOT], own.integers(1, 49000, n - 2)])
        out[row, n - 1] = EOT
    return out


def synthetic_batch(setup: RunSpec, batch: int, seed: int = 0) -> dict:
    """A global batch as the trainer's pipeline gives it (one process): random images and
    global texts, FashionGen-like tags (`TAG_SHAPES`)."""
    rng = np.random.default_rng(seed)
    size, context = setup.clip.image_size, setup.clip.context_length
    text = rng.integers(1, 49000, (batch, context)).astype(np.int32)
    text[:, 0], text[:, context - 10], text[:, context - 9:] = SOT, EOT, 0
    host = {"images": rng.standard_normal((batch, size, size, 3), np.float32), "text": text,
            "index": np.arange(batch, dtype=np.int32),
            "tags": {group: synthetic_tags(group, batch, length, rng) for group, _, length in setup.pre.tags}}
    return place_batch(setup, host)


def place_batch(setup: RunSpec, host: dict) -> dict:
    """A one-process host batch with per-item `tags` -> the step's global batch: the tags packed
    as the trainer's pipeline packs them (e2_jax.data.region_texts), everything on the mesh."""
    host = dict(host)
    per_group = host.pop("tags")
    tags = [per_group[group] for group, _, _ in setup.pre.tags]
    if tags:
        packing = region_texts.Packing(setup.pre.region_texts, len(host["text"]))
        shapes = packing.shapes(packing.needs(tags), [length for _, _, length in setup.pre.tags])
        packed = packing.pack(tags, shapes, [np.arange(rows) for rows, _ in shapes])
        host.update(region_tokens=packed.tokens, region_index=packed.index)
    sharding = batch_sharding(setup.mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), host)


def stage_config(model: str, method: str, batch: int):
    """The accelerator recipe (bfloat16, the authors' groups), one stage, random weights."""
    c = recipes.fashion_recipe(model if model != "tiny" else "ViT-B-32", "clip_ft" if method == "CLIP-FT" else "e2",
                               None)
    c.model.pretrained, c.stages, c.batch_size = "", ("finetune",), batch
    c.finetune.steps, c.finetune.trainable = 1000, "all"
    if model == "tiny":
        c.model.preset, c.model.compute_dtype = "tiny", "float32"
    return c


def measure(model: str, method: str, batch: int, steps: int, profile_dir: str | None) -> dict:
    c = stage_config(model, method, batch)
    setup = resolve(c)
    program = step.build_stage(setup, setup.stages[0])
    state = program.new_state(step.initial_params(setup))
    batches = [synthetic_batch(setup, batch)]  # one batch: another's packed shapes could differ
    start = time.perf_counter()
    lowered = program.step.lower(state, batches[0])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = step_flops(lowered, jax.device_count())
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, batches[0])
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[0])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    calls = region_texts.describe([t.shape for t in batches[0].get("region_tokens", ())])
    row = {"model": model, "method": method, "batch": batch, "compile_s": compile_s,
           "step_s": statistics.median(times), "flops": flops, "region_texts": calls}
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(2):
                state, metrics = compiled(state, batches[0])
            jax.block_until_ready(metrics)
    return row


_SUMMARY_LINES = {"XLA Modules", "Steps", "Framework Ops", "Framework Name Scope", "Source code", "XLA TraceMe"}


def summarize_trace(profile_dir: str, top: int = 15) -> dict:
    """The Perfetto trace of `jax.profiler.trace`: the ops of the device tracks (GPU/TPU; on a
    CPU, XLA's own threads) by total time, and the share of the traced span no op covers."""
    path = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in processes.items() if "/device:" in name and "CPU" not in name}
    thread = lambda e: threads.get((e["pid"], e.get("tid")), "")
    if devices:
        where = ", ".join(sorted(processes[p] for p in devices))
        ops = [e for e in events if e.get("ph") == "X" and e["pid"] in devices]
        if any(thread(e) == "XLA Ops" for e in ops):  # TPU: one line of ops, others summarise them
            ops = [e for e in ops if thread(e) == "XLA Ops"]
        ops = [e for e in ops if thread(e) not in _SUMMARY_LINES]
    else:
        where = "host CPU (XLA threads)"
        ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(("$", "ThunkExecutor"))
               and not thread(e).startswith("python")]
    if not ops:
        return {"where": where, "ops": [], "idle": float("nan"), "span_ms": 0.0}
    totals: dict[str, list[float]] = {}
    for e in ops:
        totals.setdefault(e["name"], []).append(e.get("dur", 0.0))
    intervals = sorted((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in ops)
    busy, end = 0.0, -float("inf")
    for a, b in intervals:
        if b > end:
            busy += b - max(a, end)
            end = b
    span = max(end - intervals[0][0], 1e-9)  # `end`: the last op's end, from the loop above
    ranked = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:top]
    every = sum(e.get("dur", 0.0) for e in ops)
    return {"where": where, "span_ms": span / 1e3, "idle": 1 - busy / span if span else float("nan"),
            "ops": [(name, sum(d) / 1e3, len(d), sum(d) / every if every else 0.0) for name, d in ranked]}


def plan(models: list[str], batches: list[int], methods: list[str]) -> list[tuple[str, int, str]]:
    order = []
    for model in models:
        for batch in batches:
            if batch == 512 and model not in ("ViT-B-32", "tiny"):
                continue  # B/16 at 512 does not fit the suite's minutes (nor, with Adam, every GPU)
            order.extend((model, batch, method) for method in methods)
    return order


def report(rows: list[dict], skipped: list, failed: list[str], profile: dict | None, header: dict,
           partial: bool = False) -> str:
    """The Markdown report; `partial`: written while rows remain (`skipped` are then those rows)."""
    device = jax.devices()[0]
    peak = peak_flops(device)
    lines = ["# Device suite (`python -m benchmarks.device`)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| model | method | batch | region texts (rows x tokens per call) | compile s | ms/step | "
              "examples/s | GFLOPs/step | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = (r["flops"] or 0) / r["step_s"]
        mfu = f"{rate / peak:.1%}" if peak and r["flops"] else "n/a"
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['region_texts']} | {r['compile_s']:.1f} | "
                     f"{r['step_s'] * 1e3:.1f} | {r['batch'] / r['step_s']:.1f} | "
                     f"{(r['flops'] or float('nan')) / 1e9:.1f} | {rate / 1e12:.2f} | {mfu} |")
    pairs = [(a, b) for a in rows for b in rows if a["method"] == "CLIP-FT" and b["method"] == "E²"
             and (a["model"], a["batch"]) == (b["model"], b["batch"])]
    if pairs:
        lines += ["", "E² against CLIP-FT (same model and batch):", "",
                  "| model | batch | time ratio | XLA FLOP ratio | time / FLOP ratio |", "|---|---|---|---|---|"]
        for a, b in pairs:
            t, f = b["step_s"] / a["step_s"], (b["flops"] or float("nan")) / (a["flops"] or float("nan"))
            lines.append(f"| {a['model']} | {a['batch']} | {t:.2f}x | {f:.2f}x | {t / f:.2f} |")
    if profile:
        lines += ["", f"Profile of {profile['row']} (two steps; ops on {profile['where']}; traced span "
                  f"{profile['span_ms']:.1f} ms, device idle {profile['idle']:.1%} of it):", "",
                  "| op | total ms | count | share of all ops' time |", "|---|---|---|---|"]
        lines += [f"| `{name[:80]}` | {ms:.2f} | {count} | {share:.1%} |" for name, ms, count, share in profile["ops"]]
    if partial:
        lines += ["", "Not yet measured (the run was still going): "
                  + (", ".join(f"{m} {meth} batch {b}" for m, b, meth in skipped) or "none; the profile")]
    elif skipped:
        lines += ["", "Skipped (budget): " + ", ".join(skipped)]
    if failed:
        lines += ["", "Failed (out of memory, or an error to look into): " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-32,ViT-B-16")
    parser.add_argument("--batches", default="64,256,512")
    parser.add_argument("--methods", default="CLIP-FT,E²")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting rows after this")
    parser.add_argument("--out", default="device_report.md")
    parser.add_argument("--cache", default=None, help="persistent compilation cache ('' off; default per user)")
    parser.add_argument("--autotune", action="store_true",
                        help="XLA's GPU GEMM autotuning (slower compiles; Triton and cuBLAS both tried)")
    parser.add_argument("--triton-gemm", action="store_true",
                        help="without --autotune: keep XLA's Triton GEMMs on their default tiles")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cache = compilation.setup(compilation.default_cache_dir() if args.cache is None else args.cache)
    device = jax.devices()[0]
    import flax

    header = {"device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
              "peak (bfloat16, data sheet)": f"{(peak_flops(device) or float('nan')) / 1e12:.0f} TFLOP/s",
              "versions": f"Python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}",
              "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") or "(none)",
              "GPU GEMMs": ("autotuned (Triton or cuBLAS)" if args.autotune else
                            "Triton, default tiles (no autotuning)" if args.triton_gemm else
                            "cuBLAS (no autotuning, Triton GEMMs off)"),
              "compilation cache": cache or "off",
              "budget": f"{args.budget_s:.0f} s; steps timed per row: {args.steps} after 2 warm-up"}
    order = plan(args.models.split(","), [int(b) for b in args.batches.split(",")], args.methods.split(","))
    rows, skipped, failed, last = [], [], [], 0.0
    for i, (model, batch, method) in enumerate(order):
        elapsed = time.perf_counter() - started
        if elapsed + last > args.budget_s:
            skipped.extend(f"{m} {meth} batch {b}" for m, b, meth in order[i:])
            break
        begin = time.perf_counter()
        try:
            rows.append(measure(model, method, batch, args.steps, None))
        except Exception as error:  # out of memory at a large batch: say so and go on
            failed.append(f"{model} {method} batch {batch} ({type(error).__name__}: {str(error)[:200]})")
        last = time.perf_counter() - begin
        print(f"[{time.perf_counter() - started:.0f} s] {model} {method} batch {batch}: {last:.1f} s", flush=True)
        # The report so far, after every row: a run stopped at its time limit keeps what it measured.
        Path(args.out).write_text(report(rows, order[i + 1:], failed, None, header, partial=True))
    profile = None
    if rows and not args.no_profile:
        target = rows[-1]
        profile_dir = tempfile.mkdtemp(prefix="e2_device_profile_")
        try:
            measure(target["model"], target["method"], target["batch"], 1, profile_dir)
            profile = summarize_trace(profile_dir)
            profile["row"] = f"{target['model']} {target['method']} batch {target['batch']}"
        except Exception as error:  # a profiler the machine lacks (CUPTI) must not cost the table
            failed.append(f"the profile ({type(error).__name__}: {str(error)[:200]})")
    header["wall time"] = f"{time.perf_counter() - started:.0f} s"
    text = report(rows, skipped, failed, profile, header)
    Path(args.out).write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
