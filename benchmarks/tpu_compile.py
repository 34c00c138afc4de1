"""Compiled for TPU here, not run: the paper's models on TPU slices, through libtpu's compiler on
this CPU machine (`e2_jax.compile_check`; `pip install -e .[tpu]`).

    python -m benchmarks.tpu_compile table --models ViT-B-32,ViT-B-16 --methods e2,clip_ft \\
        --slices v5e-16,v5p-128 --layouts dp,fsdp,remat --out docs/results/tpu_compile/table.jsonl
    python -m benchmarks.tpu_compile collectives --model ViT-B-16 --slice v5e:4x4 --batch 1024

`table`: for each (model, method, slice, layout), the largest per-chip batch whose training step
(the config's last stage: every parameter trained, the most memory) fits the chip's HBM as
written (a batch the compiler had to recompute for does not count: `compile_check.max_batch`). The
per-chip batch (a multiple of 8) is found by `e2_jax.compile_check.max_batch`, starting from
the same model, method and layout's row on another slice where the file has one (scaled by the
chips' HBM; 2 compiles where it holds), else from the other method's, else from the layout it
follows (fsdp from dp, remat from fsdp), else from 8 per chip, each next batch where a line
through two compiled batches' memory meets the HBM (through the first, the slope of a like row:
the same model and method with the same remat; else a doubling or bisection step); the row
gives that batch, its memory, FLOPs and collectives, and every batch tried with its memory and
the instructions the compiler recomputed for it. Layouts: `dp` (mesh data x all chips,
parameters replicated), `fsdp` (parameters and optimizer state split over every chip), `remat`
(fsdp with each transformer block's activations recomputed in the backward pass). Each row is
appended to `--out` (JSON lines) when it is done and a rerun skips the rows there; each batch
compiled is appended to `--compiles` as it is done, and a search stopped halfway reads its
compiles back: the full table takes many hours on a 2-core machine.

`markdown`: the rows as docs/benchmarks.md shows them, with each row's batches that did not
compile (out of HBM even recomputing) from the compile log beside those it compiled.

`collectives`: every collective of one compiled step, with what it serves (the jax operation it
comes from: `jvp` is the forward pass, `transpose` the backward), grouped, with bytes per chip.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import math
import re
import sys
import time
from pathlib import Path

import jax

from e2_jax import compile_check, sharding
from e2_jax import config as recipes

LIBTPU = importlib.metadata.version("libtpu")
LAYOUTS = {"dp": ((("data", -1), ("fsdp", 1)), False), "fsdp": ((("data", 1), ("fsdp", -1)), False),
           "remat": ((("data", 1), ("fsdp", -1)), True)}
FOLLOWS = {"fsdp": "dp", "remat": "fsdp"}  # a layout's search starts from this one's row, without its own


def stage_config(model: str, method: str, layout: str, global_batch: int):
    """The paper's recipe for `model` (bfloat16), its last stage alone, on `layout`."""
    c = recipes.fashion_recipe(model, method, None)
    mesh, remat = LAYOUTS[layout]
    c.model.pretrained, c.stages, c.batch_size = "", (c.stages[-1],), global_batch
    c[c.stages[0]].steps, c[c.stages[0]].epochs = 1000, 0.0
    c.eval.batch_size = global_batch
    c.mesh, c.model.remat = mesh, remat
    return c


def start_from(rows: list[dict], model: str, method: str, layout: str, tpu: compile_check.Slice) -> int:
    """Where the search starts, in multiples of 8 per chip: the largest per-chip batch of the same
    model, method and layout on the slice with the most chips of the same generation, else on
    any slice scaled by the chips' HBM; without such a row, the same from the other method's rows
    (E²'s step is CLIP-FT's plus the selection tokens and the region texts: near, not equal; the
    search gallops from there), else from the same model and method's rows of the layout it
    follows (fsdp from dp: its parameters split, its activations the same; remat from fsdp:
    less memory still); 1 (8 per chip) without any."""
    found = [r for r in rows if (r["model"], r["layout"]) == (model, layout) and r.get("per_chip_batch")]
    same = [r for r in found if r["method"] == method] or found
    if not same and layout in FOLLOWS:
        same = [r for r in rows if (r["model"], r["method"], r["layout"]) == (model, method, FOLLOWS[layout])
                and r.get("per_chip_batch")]
    if not same:
        return 1
    kind = tpu.topology.split(":")[0]
    alike = [r for r in same if r["topology"].split(":")[0] == kind]
    if alike:
        return max(alike, key=lambda r: r["global_batch"] // r["per_chip_batch"])["per_chip_batch"] // 8
    row = max(same, key=lambda r: r["per_chip_batch"])
    return max(1, int(row["per_chip_batch"] * tpu.generation.hbm_gib / row["hbm_gib"]) // 8)


def slope_from(rows: list[dict], model: str, method: str, layout: str) -> float | None:
    """Bytes a chip's step grows by for 8 more examples per chip, from the batches compiled
    as written for the same model and method with the same `model.remat` (dp and fsdp hold the
    same activations per example; remat fewer): the line through the smallest and the largest
    of them in the row with most such batches, its own layout's first; None without two."""
    remat = LAYOUTS[layout][1]
    like = sorted((r for r in rows if (r["model"], r["method"]) == (model, method)
                   and LAYOUTS[r["layout"]][1] == remat), key=lambda r: r["layout"] != layout)
    for row in like:
        points = sorted((t[0], t[1]) for t in row["tried"] if not (len(t) > 2 and t[2]))
        if len(points) >= 2 and points[-1][0] > points[0][0]:
            (a, gib_a), (b, gib_b) = points[0], points[-1]
            return (gib_b - gib_a) / (b - a) * 8 * compile_check.GIB
    return None


class CompileLog:
    """Every batch the table compiled, one JSON line each (`--compiles`): a search that was
    stopped, or a row asked again, reads its compiles back instead of compiling them again
    (the same model, method, slice, layout, per-chip batch, libtpu and jax)."""

    def __init__(self, path: Path):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        self.entries = {self.key(e): e for e in map(json.loads, filter(str.strip, lines))}
        self.asked: list[tuple] = []  # the keys asked for, in order (a row's search: its compiles)

    @staticmethod
    def key(e: dict) -> tuple:
        return (e["model"], e["method"], e["slice"], e["layout"], e["per_chip_batch"], e["libtpu"], e["jax"])

    def programs(self, model: str, method: str, slice_name: str, layout: str, config, devices: list,
                 ) -> list[compile_check.Program]:
        """The programs of `config`'s step, from the log or compiled (and logged);
        `compile_check.OutOfMemory` as the compiler said it, either way."""
        entry = {"model": model, "method": method, "slice": slice_name, "layout": layout,
                 "per_chip_batch": config.batch_size // len(devices), "libtpu": LIBTPU, "jax": jax.__version__}
        self.asked.append(self.key(entry))
        if (known := self.entries.get(self.key(entry))) is None:
            began = time.perf_counter()
            try:
                programs = compile_check.run_programs(config, devices, evaluation=False)
                entry["programs"] = [compile_check.program_row(p) for p in programs]
            except compile_check.OutOfMemory as error:
                entry["out_of_memory"] = str(error)
            entry["seconds"] = time.perf_counter() - began
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            self.entries[self.key(entry)] = known = entry
        if "out_of_memory" in known:
            raise compile_check.OutOfMemory(known["out_of_memory"])
        return [compile_check.Program(**{k: v for k, v in p.items() if k != "total"}) for p in known["programs"]]


def largest_batch(model: str, method: str, layout: str, tpu: compile_check.Slice, devices: list,
                  log=print, start: int = 1, slope: float | None = None, compiles: CompileLog | None = None,
                  ) -> tuple[int, compile_check.Program | None, list[tuple[int, float, int]]]:
    """(largest per-chip batch that fits as written, a multiple of 8; its program; [(per-chip
    batch, GiB, instructions the compiler recomputed)] of every batch compiled), by
    `compile_check.max_batch` from `start` multiples of 8 per chip (with `slope`, bytes per 8
    per chip, for the line's first batch), reading and adding to `compiles` where given."""
    tried: list[tuple[int, float, int]] = []

    def seen(batch: int, programs: list[compile_check.Program]) -> None:
        (program,) = programs
        tried.append((batch // len(devices), program.total / compile_check.GIB, program.recomputed))
        recomputing = f", {program.recomputed} instructions recomputed to fit" if program.recomputed else ""
        log(f"    {batch // len(devices)}/chip: {tried[-1][1]:.2f} GiB{recomputing} ({program.compile_s:.0f} s to "
            "compile)")

    config = stage_config(model, method, layout, 8 * len(devices))
    compile = (lambda c: compiles.programs(model, method, tpu.name, layout, c, devices)) if compiles else None
    best, programs = compile_check.max_batch(config, devices, tpu, unit=8, start=start, tried=seen, slope=slope,
                                             compile=compile)
    return best // len(devices), (programs[0] if programs else None), sorted(tried)


def table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    done = {(r["model"], r["method"], r["slice"], r["layout"]) for r in rows}
    compiles = CompileLog(Path(args.compiles))
    for name in args.slices.split(","):
        tpu = compile_check.parse_slice(name)
        devices = compile_check.topology_devices(tpu)
        for model in args.models.split(","):
            for method in args.methods.split(","):
                for layout in args.layouts.split(","):
                    key = (model, method, name, layout)
                    if key in done:
                        continue
                    first, slope = start_from(rows, model, method, layout, tpu), slope_from(rows, model, method, layout)
                    print(f"{model} {method} on {name}, {layout}: from {8 * first} per chip", flush=True)
                    compiles.asked.clear()
                    best, program, tried = largest_batch(model, method, layout, tpu, devices,
                                                         log=lambda line: print(line, flush=True), start=first,
                                                         slope=slope, compiles=compiles)
                    row = {"model": model, "method": method, "slice": name, "layout": layout,
                           "topology": tpu.topology, "hbm_gib": tpu.generation.hbm_gib, "per_chip_batch": best,
                           "global_batch": best * tpu.chips, "tried": tried,
                           "seconds": sum(compiles.entries[k]["seconds"] for k in compiles.asked),
                           "libtpu": LIBTPU, "jax": jax.__version__}
                    if program is not None:
                        gib = compile_check.GIB
                        row.update(gib=program.total / gib, arguments_gib=program.arguments / gib,
                                   temporaries_gib=program.temporaries / gib, compile_s=program.compile_s,
                                   gflop_per_example=(program.flops or math.nan) * tpu.chips / program.examples / 1e9,
                                   collectives={k: [c, b] for k, (c, b) in program.collectives.items()})
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    rows.append(row)
                    print(f"  largest: {best} per chip", flush=True)


MODEL_NAMES = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14"}


def out_of_memory(compiles: CompileLog, row: dict) -> list[tuple[int, float]]:
    """[(per-chip batch, GiB of temporaries the compiler asked for)] of the row's search's batches
    that did not compile (out of HBM even recomputing), from the compile log."""
    failed, same = [], ("model", "method", "slice", "layout", "libtpu", "jax")
    for e in compiles.entries.values():
        if "out_of_memory" in e and all(e[k] == row[k] for k in same):
            asked = re.search(r"HLO temporaries \(([\d.]+)G\)", e["out_of_memory"])
            failed.append((e["per_chip_batch"], float(asked.group(1)) if asked else math.nan))
    return failed


def markdown(rows: list[dict], compiles: CompileLog | None = None) -> str:
    """The table's rows as docs/benchmarks.md shows them, with the batches of each row's search
    that did not compile where `compiles` (the compile log) is given."""
    lines = ["| model | method | slice | layout | per-chip batch | global batch | GiB per chip (args + temps) | "
             "GFLOP/example | collectives (count, MiB) | compiled (per chip: GiB; * recomputed to fit, ! over "
             "the HBM; † did not compile, the temporaries asked for) | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = compile_check.parse_slice(r["slice"]).budget_bytes / compile_check.GIB  # as the search's
        shown = [(t[0], f"{t[1]:.2f}{'*' if len(t) > 2 and t[2] else ''}{'!' if t[1] > budget else ''}")
                 for t in r["tried"]]
        shown += [(batch, f"{gib:.2f}†") for batch, gib in (out_of_memory(compiles, r) if compiles else [])]
        tried = ", ".join(f"{batch}: {text}" for batch, text in sorted(shown))
        comm = ", ".join(f"{kind} {count} ({size / 2**20:,.0f})" for kind, (count, size) in
                         sorted(r.get("collectives", {}).items()))
        memory = f"{r['gib']:.2f} ({r['arguments_gib']:.2f} + {r['temporaries_gib']:.2f})" if "gib" in r else "-"
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {'E²' if r['method'] == 'e2' else 'CLIP-FT'} | "
                     f"{r['slice']} | {r['layout']} | {r['per_chip_batch']:,} | {r['global_batch']:,} | {memory} | "
                     f"{r.get('gflop_per_example', float('nan')):.1f} | {comm or '-'} | {tried} | "
                     f"{r.get('compile_s', 0):.0f} (search {r['seconds']:.0f}) |")
    return "\n".join(lines)


def collectives(args: argparse.Namespace) -> None:
    tpu = compile_check.parse_slice(args.slice)
    devices = compile_check.topology_devices(tpu)
    if args.config:
        config = recipes.config_module(args.config.split(":")[0]).get_config(
            args.config.split(":")[1] if ":" in args.config else None)
        config.batch_size = config.eval.batch_size = args.batch
        config.stages = (config.stages[-1],)
    else:
        config = stage_config(args.model, args.method, args.layout, args.batch)
    mesh = sharding.make_mesh(config.mesh, devices)
    (program,) = compile_check.run_programs(config, devices, evaluation=False)
    ops = compile_check.collective_ops(program.hlo)
    groups = collections.Counter((op.kind, op.shape, op.source) for op in ops)
    size = {(op.kind, op.shape, op.source): op.bytes for op in ops}
    lines = [f"{args.model if not args.config else args.config} {args.method}, global batch {args.batch} on {tpu.name} "
             f"({tpu.topology}), mesh {dict(mesh.shape)}: compiled in {program.compile_s:.0f} s, "
             f"libtpu {LIBTPU}, jax {jax.__version__}", "",
             "| count | kind | result | MiB each | from |", "|---|---|---|---|---|"]
    for (kind, shape, source), count in sorted(groups.items(), key=lambda kv: (kv[0][0], -size[kv[0]])):
        lines.append(f"| {count} | {kind} | `{shape[:90]}` | {size[(kind, shape, source)] / 2**20:,.3f} | "
                     f"`{source.removeprefix('jit(step)/')[-90:] or '(none)'}` |")
    totals = program.collectives
    lines += ["", "totals: " + ", ".join(f"{k} {c} ({b / 2**20:,.2f} MiB)" for k, (c, b) in sorted(totals.items()))]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    jax.config.update("jax_platforms", "cpu")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table")
    t.add_argument("--models", default="ViT-B-32,ViT-B-16,ViT-L-14")
    t.add_argument("--methods", default="e2,clip_ft")
    t.add_argument("--slices", default="v5e-16,v5e-256,v5p-128,v6e-64")
    t.add_argument("--layouts", default="dp,fsdp,remat")
    t.add_argument("--out", default="docs/results/tpu_compile/table.jsonl")
    t.add_argument("--compiles", default="docs/results/tpu_compile/compiles.jsonl",
                   help="every batch compiled (JSON lines), read back by a search asked again")
    m = sub.add_parser("markdown", help="print the table file's rows as docs/benchmarks.md shows them")
    m.add_argument("--out", default="docs/results/tpu_compile/table.jsonl")
    m.add_argument("--compiles", default="docs/results/tpu_compile/compiles.jsonl",
                   help="the compile log, for the batches that did not compile")
    c = sub.add_parser("collectives")
    c.add_argument("--model", default="ViT-B-16")
    c.add_argument("--method", default="e2")
    c.add_argument("--layout", default="dp", choices=sorted(LAYOUTS))
    c.add_argument("--config", default="", help="a config file[:arg] instead of --model/--method/--layout")
    c.add_argument("--slice", default="v5e:4x4")
    c.add_argument("--batch", type=int, default=1024)
    c.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.command == "markdown":
        print(markdown([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()],
                       CompileLog(Path(args.compiles))))
        return
    {"table": table, "collectives": collectives}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
