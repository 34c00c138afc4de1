"""`python -m e2_jax.compile_check`: a run's programs compiled by the real TPU compiler (libtpu)
for real slice descriptions on this CPU machine, with their memory, FLOPs and collectives."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from e2_jax import compile_check, sharding
from e2_jax.config import config_module
from e2_jax.errors import ConfigError
from tests.processes import ROOT
from tests.test_topologies import check_rows

pytest.importorskip("libtpu")


@pytest.mark.parametrize(("name", "topology", "chips"), [
    ("v5p-128", "v5p:4x4x4", 64), ("v4-32", "v4:2x2x4", 16), ("v4-8", "v4:2x2x1", 4),
    ("v5litepod-256", "v5e:16x16", 256), ("v5e-256", "v5e:16x16", 256), ("v5e-16", "v5e:4x4", 16),
    ("v5e-32", "v5e:4x8", 32), ("v6e-64", "v6e:8x8", 64), ("v6e-8", "v6e:2x4", 8), ("v5e:4x4", "v5e:4x4", 16),
    ("v5p:2x2x2", "v5p:2x2x2", 8),
])
def test_slice_names_as_users_type_them(name, topology, chips):
    tpu = compile_check.parse_slice(name)
    assert (tpu.topology, tpu.chips) == (topology, chips)


@pytest.mark.parametrize(("name", "topology", "chips"), [("h100-8", "1x8", 8), ("h100-16", "2x8", 16),
                                                        ("h200:4x2", "4x2", 8), ("h200-2", "1x2", 2)])
def test_gpu_hosts_as_users_name_them(name, topology, chips):
    gpus = compile_check.parse_slice(name)
    assert (gpus.topology, gpus.chips, gpus.generation.platform) == (topology, chips, "cuda")
    assert gpus.budget_bytes == pytest.approx(0.9 * gpus.hbm_bytes)  # what launch/gpu_env.sh lets XLA take


@pytest.mark.parametrize("answer", [0, 1, 2, 3, 7, 8, 20, 33, 64])
@pytest.mark.parametrize("start", [1, 5, 20, 100])
def test_the_batch_search_finds_the_largest_that_fits_from_any_start(answer, start):
    """`largest_fitting` (what `--max-batch` and benchmarks/tpu_compile.py search with): the
    largest size that fits and its result, from any start; each size compiled at most once; 2
    compiles when the start is the answer, and from 1 the doubling of old (1, 2, 4, 8, ...)."""
    calls = []

    def fits(n):
        calls.append(n)
        return f"program {n}" if n <= answer else None

    assert compile_check.largest_fitting(fits, start) == (answer, f"program {answer}" if answer else None)
    assert len(calls) == len(set(calls)) and min(calls) >= 1
    assert len(calls) <= 2 * max(1, abs(answer - start)).bit_length() + 2
    if start == answer:
        assert calls == [answer, answer + 1]
    if start == 1 and answer == 20:
        assert calls[:6] == [1, 2, 4, 8, 16, 32]


MEMORY = {  # GiB of the step at n units of batch, shaped as the compiler's answers were
    "line": lambda n: 1.9 + 0.66 * n,  # data parallel: arguments, then activations per example
    "concave": lambda n: 0.2 + 2.6 * n ** 0.8,  # fsdp's grew less from 16 to 96 per chip than from 8 to 16
    "convex": lambda n: 1.0 + 0.3 * n + 0.02 * n * n,
    "remat": lambda n: 1.30 if n == 1 else 0.5 + 0.31 * n,  # 1.30 GiB at 8 per chip, 0.82 at 16, then rising
    "flat, then a wall": lambda n: 3.0 if n < 37 else 40.0,  # no line to follow
}


@pytest.mark.parametrize("shape", sorted(MEMORY))
@pytest.mark.parametrize("start", [1, 5, 20, 100])
@pytest.mark.parametrize("over_is_measured", [True, False])
def test_a_line_through_the_memory_finds_the_same_batch_in_fewer_compiles(shape, start, over_is_measured):
    """`max_batch`'s search: the next size is where a line through two compiled sizes' memory
    meets the budget (`line_guess`), but only compiling decides what fits. The answer is the
    doubling-and-bisection search's from any start, each size is compiled once, and with memory
    on a line it takes 4 compiles from a start that fits (the start, one more, the answer, one
    more), where doubling and bisection took up to 14. A TPU compile gives no memory as written
    for a size over the budget (the compiler recomputes to fit, or fails): `over_is_measured`
    False leaves those sizes out of the line."""
    memory, budget = MEMORY[shape], 15.0
    answer = max(n for n in range(1, 1000) if all(memory(m) <= budget for m in range(1, n + 1)))

    def search(guessing: bool) -> list[int]:
        calls, used = [], {}

        def fits(n):
            calls.append(n)
            if over_is_measured or memory(n) <= budget:
                used[n] = memory(n)
            return n if memory(n) <= budget else None

        guess = (lambda low, high: compile_check.line_guess(used, low, high, budget)) if guessing else None
        assert compile_check.largest_fitting(fits, start, guess) == (answer, answer)
        assert len(calls) == len(set(calls)) and min(calls) >= 1
        return calls

    calls, plain = search(True), search(False)
    if shape == "line" and start <= answer:
        assert len(calls) == 4 < len(plain), (calls, plain)
    assert len(calls) <= len(plain) + 3, (calls, plain)


@pytest.mark.parametrize(("answer", "start"), [(600, 1), (600, 500), (827, 730), (40, 100)])
def test_a_line_aimed_below_what_already_fits_takes_the_plain_steps(answer, start):
    """Once the compiler has squeezed a batch it recomputed for into less memory than the
    largest batch that fits as written (B/16 CLIP-FT with remat on v5p-128: 93.51 GiB at 7,056
    per chip, while 6,608 fit as written in 94.18), the line aims below `low` and proposes less
    than `low`. Such a proposal takes the doubling or bisection step: moved up to `low + 1` it
    crept one size a compile. The compiles are those of the plain search, no more."""
    def search(guess):
        calls = []

        def fits(n):
            calls.append(n)
            return n if n <= answer else None

        assert compile_check.largest_fitting(fits, start, guess) == (answer, answer)
        return calls

    below = search(lambda low, high: low - 3 if low else None)
    assert below == search(None), below


@pytest.mark.parametrize("shape", ["line", "concave", "convex"])
@pytest.mark.parametrize("start", [1, 5, 12, 20])
def test_a_like_rows_slope_draws_the_line_through_the_first_batch(shape, start):
    """`max_batch`'s `slope` (a like row's bytes per size: the same step on another slice or
    layout): with one size compiled, the line through it with that slope proposes the next. On a
    line with the slope it had, a start that fits takes 3 compiles (the start, the answer, one
    more) against 4 without; off a line the answer is the same."""
    memory, budget = MEMORY[shape], 15.0
    answer = max(n for n in range(1, 1000) if all(memory(m) <= budget for m in range(1, n + 1)))

    def search(slope):
        calls, used = [], {}

        def fits(n):
            calls.append(n)
            if memory(n) <= budget:
                used[n] = memory(n)
            return n if memory(n) <= budget else None

        guess = lambda low, high: compile_check.line_guess(used, low, high, budget, slope)
        assert compile_check.largest_fitting(fits, start, guess) == (answer, answer)
        assert len(calls) == len(set(calls))
        return calls

    slope = memory(2) - memory(1)
    with_slope, without = search(slope), search(None)
    if shape == "line" and start <= answer <= 16 * start:  # a proposal goes to at most 16 times the start
        assert with_slope == [start, answer, answer + 1] and len(without) == 4, (with_slope, without)
    assert len(with_slope) <= len(without) + 2, (with_slope, without)
    assert compile_check.line_guess({4: 5.0}, 4, None, 15.0, 2.0) == 9
    assert compile_check.line_guess({4: 5.0}, 4, None, 15.0, 0.0) is None  # no rise, no line
    assert compile_check.line_guess({4: 5.0}, 4, None, 15.0) is None


def test_the_table_starts_each_search_from_a_row_it_has():
    """benchmarks/tpu_compile.py's table: a row's search starts from the same model, method and
    layout on the largest slice of the same generation in the file, else on another generation
    scaled by HBM, else the same from the other method's rows, else at 8 per chip (units of 8
    per chip)."""
    from benchmarks.tpu_compile import start_from

    def row(slice_name, per_chip, layout="dp", method="e2"):
        tpu = compile_check.parse_slice(slice_name)
        return {"model": "ViT-B-32", "method": method, "layout": layout, "slice": slice_name,
                "topology": tpu.topology, "hbm_gib": tpu.generation.hbm_gib, "per_chip_batch": per_chip,
                "global_batch": per_chip * tpu.chips}

    rows = [row("v5e-16", 160), row("v5e-256", 168), row("v5e-16", 96, "fsdp"), row("v6e-64", 200, method="clip_ft")]
    assert start_from(rows, "ViT-B-32", "e2", "dp", compile_check.parse_slice("v5e-32")) == 168 // 8
    assert start_from(rows, "ViT-B-32", "e2", "fsdp", compile_check.parse_slice("v5e-256")) == 96 // 8
    v6e = compile_check.parse_slice("v6e-64")  # 32 GiB against v5e's 16
    assert start_from(rows, "ViT-B-32", "e2", "dp", v6e) == int(168 * v6e.generation.hbm_gib / 16) // 8
    assert start_from(rows, "ViT-B-32", "e2", "remat", v6e) == int(96 * 32 / 16) // 8  # fsdp's, scaled
    assert start_from(rows, "ViT-B-32", "clip_ft", "dp", v6e) == 200 // 8  # its own row first
    assert start_from(rows, "ViT-B-32", "clip_ft", "fsdp", compile_check.parse_slice("v5e-16")) == 96 // 8  # E²'s
    assert start_from(rows, "ViT-L-14", "e2", "dp", v6e) == 1
    # Without a row of its layout, a layout starts from the one it follows: fsdp from dp, remat from fsdp.
    b16 = [{**row("v5e-16", 144), "model": "ViT-B-16"}]
    assert start_from(b16, "ViT-B-16", "e2", "fsdp", compile_check.parse_slice("v5e-16")) == 144 // 8
    assert start_from(b16, "ViT-B-16", "e2", "remat", compile_check.parse_slice("v5e-16")) == 1
    assert start_from(b16, "ViT-B-16", "e2", "dp", compile_check.parse_slice("v5e-16")) == 144 // 8
    b16.append({**row("v5e-16", 160, "fsdp"), "model": "ViT-B-16"})
    assert start_from(b16, "ViT-B-16", "e2", "remat", compile_check.parse_slice("v5e-16")) == 160 // 8


def test_a_rows_slope_comes_from_the_batches_a_like_row_compiled_as_written():
    """benchmarks/tpu_compile.py: the line through a search's first batch takes its slope (bytes
    per 8 examples per chip) from the same model and method with the same remat, its own layout
    first, through the smallest and the largest batch compiled as written (not one the compiler
    recomputed for)."""
    from benchmarks.tpu_compile import slope_from

    def row(layout, tried, method="e2"):
        return {"model": "ViT-B-32", "method": method, "layout": layout, "tried": tried}

    gib = compile_check.GIB
    dp = row("dp", [[8, 3.0, 0], [80, 9.0, 0], [144, 14.0, 0], [152, 14.8, 1]])
    assert slope_from([dp], "ViT-B-32", "e2", "fsdp") == pytest.approx((14.0 - 3.0) / 136 * 8 * gib)
    assert slope_from([dp], "ViT-B-32", "e2", "remat") is None  # remat holds fewer activations per example
    assert slope_from([dp], "ViT-B-32", "clip_ft", "dp") is None
    fsdp = row("fsdp", [[144, 12.0, 0], [160, 13.0, 0]])
    assert slope_from([dp, fsdp], "ViT-B-32", "e2", "fsdp") == pytest.approx(1.0 / 16 * 8 * gib)
    assert slope_from([row("dp", [[152, 14.8, 1], [160, 14.9, 10], [8, 3.0, 0]])], "ViT-B-32", "e2", "dp") is None


def test_the_tables_compiles_are_logged_and_read_back(tmp_path, monkeypatch):
    """benchmarks/tpu_compile.py's `CompileLog`: each batch compiled is a JSON line as soon as it
    is done, and a search asked again (in another process: a new log over the same file) reads
    it back, its programs' numbers as compiled, and a compile that ran out of HBM as the same
    `OutOfMemory`; another libtpu or jax is compiled again. Real compiles of small programs
    stand in for a config's (`run_programs` is what the other tests here check)."""
    from benchmarks import tpu_compile

    tpu = compile_check.parse_slice("v5e-16")
    devices = compile_check.topology_devices(tpu)
    device = jax.sharding.SingleDeviceSharding(devices[0])
    compiled = []

    def run_programs(config, devices, evaluation):
        compiled.append(config.batch_size)
        x = jax.ShapeDtypeStruct((2**32 if config.batch_size > 64 else 1024 * config.batch_size,), jnp.float32,
                                 sharding=device)
        step = jax.jit(lambda x: jnp.tanh(x) * jnp.cos(x[::-1]) * len(compiled))  # a new program each time
        return [compile_check.measure("step", step, (x,), config.batch_size, len(devices))]

    monkeypatch.setattr(compile_check, "run_programs", run_programs)
    libtpu = tpu_compile.LIBTPU
    config = lambda per_chip: ml_collections.ConfigDict({"batch_size": per_chip * len(devices)})
    log = tpu_compile.CompileLog(tmp_path / "compiles.jsonl")
    (first,) = log.programs("ViT-B-32", "e2", "v5e-16", "dp", config(4), devices)
    with pytest.raises(compile_check.OutOfMemory, match="RESOURCE_EXHAUSTED"):
        log.programs("ViT-B-32", "e2", "v5e-16", "dp", config(8), devices)
    assert compiled == [64, 128] and len((tmp_path / "compiles.jsonl").read_text().splitlines()) == 2

    again = tpu_compile.CompileLog(tmp_path / "compiles.jsonl")
    (read,) = again.programs("ViT-B-32", "e2", "v5e-16", "dp", config(4), devices)
    assert read == dataclasses.replace(first, hlo="") and read.total == first.total > 0
    with pytest.raises(compile_check.OutOfMemory, match="RESOURCE_EXHAUSTED"):
        again.programs("ViT-B-32", "e2", "v5e-16", "dp", config(8), devices)
    assert compiled == [64, 128] and len(again.asked) == 2
    again.programs("ViT-B-32", "e2", "v5e-16", "fsdp", config(4), devices)  # another layout: compiled
    monkeypatch.setattr(tpu_compile, "LIBTPU", "0.0.0")
    again.programs("ViT-B-32", "e2", "v5e-16", "dp", config(4), devices)  # another libtpu: compiled
    assert compiled == [64, 128, 64, 64]

    # The table shows the batch that did not compile beside the row's compiled ones, with the
    # temporaries the compiler asked for (the row's `tried` holds only the compiled ones).
    row = {"model": "ViT-B-32", "method": "e2", "slice": "v5e-16", "layout": "dp", "libtpu": libtpu,
           "jax": jax.__version__, "per_chip_batch": 4, "global_batch": 64, "tried": [[4, first.total / 2**30, 0]],
           "seconds": 1.0}
    assert tpu_compile.out_of_memory(again, row) == [(8, 32.0)]
    line = tpu_compile.markdown([row], again).splitlines()[-1]
    assert f"| 4: {first.total / 2**30:.2f}, 8: 32.00† |" in line
    assert "†" not in tpu_compile.markdown([row]).splitlines()[-1]
    assert tpu_compile.out_of_memory(again, dict(row, layout="fsdp")) == []


@pytest.mark.parametrize("name", ["v5p-100", "v3-8", "v5e-12", "tpu", "v5e:4x4x4", "h100-12", "a100-8"])
def test_an_unknown_slice_names_the_known_ones(name):
    with pytest.raises(ConfigError, match=r"unknown TPU slice.*v4-32.*v5p-128.*v6e-64.*v5litepod-N is v5e-N"):
        compile_check.parse_slice(name)


def test_the_verdict_says_by_how_much_a_program_misses():
    tpu = compile_check.parse_slice("v5e-16")
    program = lambda name, temporaries: compile_check.Program(name, 1.0, 2 * compile_check.GIB, temporaries,
                                                              compile_check.GIB, compile_check.GIB, 0.0, 1e9, 16, {})
    ok, line = compile_check.verdict(tpu, [program("step", 4 * compile_check.GIB), program("eval", 0.0)])
    assert ok and line.startswith("fits") and "step, 6.000 GiB, 38%" in line
    ok, line = compile_check.verdict(tpu, [program("step", 15 * compile_check.GIB)])
    assert not ok and line == "does not fit: step needs 17.000 GiB of 16 (over by 1.000 GiB)"


def _assert_the_tiny_e2_programs(config, programs: list[dict], table: str) -> None:
    """What a compile of the tiny E² config must give, for any slice (`compile_check.Program`s
    as `--json` writes them)."""
    names = [p["name"] for p in programs]
    assert names == [f"stage {s} step" for s in config.stages] + ["evaluation: images", "evaluation: texts"], names
    for p in programs:
        assert p["arguments"] > 0 and p["total"] > p["arguments"] / 2 and p["compile_s"] > 0, p
        assert p["flops"] and p["flops"] > 0, p
        assert p["recomputed"] == 0, p  # far from the HBM: the program as written
    step = programs[0]
    # The batch is split over every chip: the loss gathers the embeddings, the gradients are summed.
    assert step["collectives"].get("all-gather", (0, 0))[0] > 0 and step["collectives"].get("all-reduce", (0, 0))[0] > 0
    assert table.count("\n| ") == len(programs) + 1 and "GiB" in table


def test_the_compilers_recomputation_is_counted_and_a_program_it_cannot_fit_is_named():
    """A TPU compile that would not fit recomputes (XLA's rematerialization names each copy
    `<name>.remat`, as in a B/32 step at 536 per chip on v5e-16: `convolution_add_fusion.remat`);
    `jax.checkpoint` (`model.remat`) is written in the program and does not count. Where even
    recomputing cannot fit it, `measure` names the program and quotes the compiler."""
    hlo = """
  %convolution_add_fusion.remat = bf16[64,50,768]{2,1,0:T(8,128)(2,1)} fusion(%p0, %p1), kind=kOutput
  %convolution_add_fusion.1.remat = bf16[64,50,768]{2,1,0} fusion(%p0, %p2), kind=kOutput
  %fusion.7.remat2 = f32[64,512]{1,0} fusion(%convolution_add_fusion.remat), kind=kLoop
  %reduce.3 = f32[64]{0} reduce(%fusion.7.remat2, %c), metadata={op_name="checkpoint/rematted_computation/ln_1"}
"""
    assert compile_check.recomputed(hlo) == 3
    assert compile_check.recomputed(hlo.replace(".remat", "")) == 0
    tpu = compile_check.parse_slice("v5e-16")
    device = jax.sharding.SingleDeviceSharding(compile_check.topology_devices(tpu)[0])
    x = jax.ShapeDtypeStruct((2**32,), jnp.float32, sharding=device)  # 16 GiB, and as much again for the result
    with pytest.raises(compile_check.OutOfMemory, match=r"^sixteen GiB: RESOURCE_EXHAUSTED: Ran out of memory on HBM"):
        compile_check.measure("sixteen GiB", jax.jit(lambda x: jnp.tanh(x) * jnp.cos(x[::-1])), (x,), 1, 1)


def test_a_tpu_steps_flops_are_the_lowered_programs_as_on_the_cpu():
    """libtpu does not count a lowered program, and its compiled per-chip count takes the body of
    each loop it makes of an FSDP matmul and its collective (`windowed_dot_general`) once: it counts
    two thirds of this step's FLOPs. `step_flops` counts the lowered module with the CPU backend
    instead: the same count as the same step lowered for the CPU."""
    from e2_jax import metrics

    def grads(w, x):
        h = jax.nn.gelu(jnp.einsum("btd,df->btf", x, w[0]))
        return jax.grad(lambda w: jnp.einsum("btf,fd->btd", h, w[1]).astype(jnp.float32).mean())(w)

    shapes = [(512, 2048), (2048, 512)], (256, 77, 512)
    mesh = jax.sharding.Mesh(compile_check.topology_devices(compile_check.parse_slice("v5e-16")), ("fsdp",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    w = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=split) for s in shapes[0]]
    x = jax.ShapeDtypeStruct(shapes[1], jnp.bfloat16, sharding=split)
    lowered = jax.jit(grads, out_shardings=[split, split]).lower(w, x)
    assert lowered.cost_analysis() is None  # a PJRT plug-in backend does not count lowered programs
    with compile_check._quiet_libtpu():
        compiled = lowered.compile()
    on_cpu = metrics.step_flops(jax.jit(grads).lower([jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes[0]],
                                                     jax.ShapeDtypeStruct(shapes[1], jnp.bfloat16)), 16)
    assert on_cpu > 2 * 2 * 256 * 77 * 512 * 2048 / 16  # at least the forward's two matmuls
    assert metrics.step_flops(lowered, 16, compiled) == pytest.approx(on_cpu, rel=1e-9)
    assert "windowed_dot_general" in compiled.as_text()
    assert metrics._flops(compiled) < 0.8 * on_cpu  # B/32 E², fsdp, v5e-16: 78.8 of 103.9 GFLOP an example


@pytest.mark.slow
def test_the_tiny_e2_run_compiles_for_a_v5p_slice():
    """Each stage's step and the evaluation encoders of the tiny E² config, compiled by libtpu
    for a v5p slice (megacore, 2 hosts) in this process, over the project's mesh; the input rows
    of each host are those its chips hold."""
    config = config_module(ROOT / "configs/e2_synth.py").get_config("runlocal")
    tpu = compile_check.parse_slice("v5p:2x2x2")
    devices = compile_check.topology_devices(tpu)
    assert len(devices) == tpu.chips and {d.platform for d in devices} == {"tpu"}
    check_rows(devices, config.mesh, "v5p:2x2x2")
    programs = compile_check.run_programs(config, devices)
    table = compile_check.report(tpu, 1, dict(sharding.make_mesh(config.mesh, devices).shape), config.batch_size,
                                 programs)
    _assert_the_tiny_e2_programs(config, [compile_check.program_row(p) for p in programs], table)


@pytest.mark.slow
def test_the_command_compiles_the_tiny_e2_run_for_v5e_16_prints_fits_and_the_table_quietly(tmp_path):
    """The same for a v5e slice (4 hosts), through the command a user types: v5e-16 is libtpu's
    v5e:4x4, whose devices give each host the rows its chips hold. It prints the table and
    "fits", writes the same numbers with --json, and none of libtpu's start-up warnings."""
    config = config_module(ROOT / "configs/e2_synth.py").get_config("runlocal")
    tpu = compile_check.parse_slice("v5e-16")
    assert tpu.topology == "v5e:4x4"
    devices = compile_check.topology_devices(tpu)
    assert len(devices) == tpu.chips and {d.platform for d in devices} == {"tpu"}
    check_rows(devices, config.mesh, "v5e:4x4")
    done = _cli("--config", "configs/e2_synth.py:runlocal", "--topology", "v5e-16", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| stage train step |" in done.stdout and "\nfits: every program within 16 GiB" in done.stdout
    for noise in ("could not determine TPU", "InitGoogle", "libtpu_init_utils"):
        assert noise not in done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["topology"], report["chips"], report["global_batch"]) == ("v5e:4x4", 16, config.batch_size)
    assert report["mesh"] == dict(sharding.make_mesh(config.mesh, devices).shape)
    assert report["verdict"].startswith("fits") and report["verdict"] in done.stdout
    table = done.stdout[:done.stdout.index("\nfits")]
    _assert_the_tiny_e2_programs(config, report["programs"], table)


def test_the_tiny_e2_run_compiles_for_gpu_hosts():
    """XLA's compile-only GPU target (JAX's CUDA plugin, no GPU here): 2 hosts of 8 H100s."""
    pytest.importorskip("jax_plugins.xla_cuda12")
    config = config_module(ROOT / "configs/e2_synth.py").get_config("runlocal")
    gpus = compile_check.parse_slice("h100:2x8")
    devices = compile_check.topology_devices(gpus)
    assert len(devices) == 16 and {d.process_index for d in devices} == {0, 1}
    assert {d.device_kind for d in devices} == {"NVIDIA H100 80GB HBM3"}
    check_rows(devices, config.mesh, "h100:2x8")
    step, *_ = compile_check.run_programs(config, devices)
    assert step.arguments > 0 and step.temporaries > 0 and step.collectives["all-reduce"][0] > 0, step
    assert step.flops and step.flops > 0  # the lowered step's, counted by the CPU: the GPU target counts none


def test_without_an_accelerator_jax_is_told_to_use_the_cpu_and_says_nothing():
    """libtpu (and the CUDA plugin, where installed) on a machine with neither: `import e2_jax`
    keeps JAX from trying their backends."""
    code = "import e2_jax, jax, os; print(jax.default_backend(), os.environ['JAX_PLATFORMS'])"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["cpu", "cpu"], done.stderr[-2000:]
    for noise in ("TPU", "libtpu", "InitGoogle", "cuInit", "CUDA"):
        assert noise not in done.stderr, done.stderr[-2000:]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}  # as a user's shell has them
    return subprocess.run([sys.executable, "-m", "e2_jax.compile_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_an_unknown_slice_is_one_error_line():
    done = _cli("--config", "configs/e2_synth.py:runlocal", "--topology", "v5e-12")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown TPU slice 'v5e-12'"), done.stderr
    assert "Traceback" not in done.stderr


def test_the_tables_rows_print_as_the_docs_show_them():
    """`python -m benchmarks.tpu_compile markdown`: a row per line, each batch compiled with its
    memory, a star where the compiler recomputed to fit and a ! where the program as written is
    larger than the HBM (neither counted as fitting: libtpu compiles some such programs)."""
    from benchmarks.tpu_compile import markdown

    row = {"model": "ViT-B-32", "method": "clip_ft", "slice": "v5e-16", "layout": "dp", "per_chip_batch": 480,
           "global_batch": 7680, "seconds": 900.0, "hbm_gib": 16,
           "tried": [[160, 6.96, 0], [480, 14.9, 0], [488, 14.8, 22], [496, 16.3, 0], [504, 16.6, 2]],
           "gib": 14.9, "arguments_gib": 1.7, "temporaries_gib": 13.2, "compile_s": 180.0, "gflop_per_example": 41.4,
           "collectives": {"all-reduce": [9, 2**30]}}
    lines = markdown([row, {**row, "method": "e2", "tried": [[8, 3.2]]}]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == 12
    assert ("| ViT-B/32 | CLIP-FT | v5e-16 | dp | 480 | 7,680 | 14.90 (1.70 + 13.20) | 41.4 | all-reduce 9 (1,024) |"
            in lines[2])
    assert "160: 6.96, 480: 14.90, 488: 14.80*, 496: 16.30!, 504: 16.60*! | 180 (search 900) |" in lines[2]
    assert "| E² |" in lines[3] and "| 8: 3.20 |" in lines[3]  # rows written before the count was kept
