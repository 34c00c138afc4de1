"""The SynthFashion study: E² against CLIP-FT and the paper's ablations, three seeds, one CPU.

    python -m benchmarks.synth_study --out /tmp/synth_study                 # the whole study
    python -m benchmarks.synth_study --out /tmp/synth_study --seeds 0       # one seed of it
    python -m benchmarks.synth_study --out /tmp/synth_study --report-only   # tables of what ran
    python -m benchmarks.synth_study --study details --out /tmp/synth_details  # issue 22's study

`--study budget` (the default, issue 7's): every variant at the study's 160 steps; `--study
details`: CLIP-FT, E², E² without the region loss and without fusion blocks at 6,000 steps, the
budget where the details are learnt (`configs/synth_study.py`: DETAILS_*, and why 6,000).

Every run is an ordinary command of this project (printed as it starts), with the config
`configs/synth_study.py`, which fixes the data, model, budget and hyper-parameters:

1. `variant=pretrain`: a CLIP trained from random weights on SynthFashion's generic captions
   ("a red coat"), exported with `python -m e2_jax.convert from-workdir` as the initial
   weights every other run starts from;
2. for each seed and variant (`clip_ft`, `e2`, `no_fusion`, `no_region_loss`,
   `without_<group>`), in one process: training (as `--mode train`: no validation during
   training, so that no checkpoint is chosen on the split the study reports on; the final
   parameters are evaluated), evaluation (as `--mode evaluate`: full-candidate and sample-100 retrieval with the
   tag-augmented and the description-only text, selection maps) and linear probes of the frozen
   image embedding (as `python -m e2_jax.probe`: brand, season, sub-category, composition,
   fitted on 2,048 training products, scored on the 1,024 validation products; on the front
   view, and composition again on the back view, the only one with the care label); with
   fusion blocks, the evaluation also counts where the selection tokens look
   (`e2_jax.evaluation.selection`: each group's picks on its own detail, against chance).

The study resumes: a run whose `result.json` exists is not run again (a result from before the
back-view probe only gets that probe), a run that was
interrupted resumes from its checkpoints. It ends by writing `summary.md` (mean ± std over the
seeds that completed, wall times included) and `summary.json` in `--out`.
"""

from __future__ import annotations

# triton before TensorFlow (which the config below imports), as in tests/conftest.py: if
# anything loads triton after TensorFlow, the process segfaults.
try:
    import triton  # noqa: F401
except ImportError:
    pass

import argparse
import collections
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from e2_jax import config as recipes
from e2_jax import main as trainer_main
from e2_jax import pretrained
from e2_jax.data.builders.synth_fashion import SynthFashion
from e2_jax.evaluation import probe
from e2_jax.inference import Encoder

ROOT = Path(__file__).resolve().parent.parent
synth_study = recipes.config_module(ROOT / "configs" / "synth_study.py")  # the variants

PROBE_FIELDS = ("brand", "season", "subcategory", "composition")  # probed on the front view
# SynthFashion's care label (composition) is only on the back view: on the front view a
# composition probe can only score chance. It is probed on the back view too ("composition_back").
BACK_PROBE_FIELDS = ("composition",)
DATASET = "synth_fashion/medium"
PROBE_TRAIN = 2048  # training products the probes are fitted on (of 4,096)


def _run(cmd: list[str], log: Path) -> float:
    """Runs a command of the project, its output to `log`; returns its wall time."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with log.open("a") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(), check=False)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Runs of a variant differ only in their seed: the second and third reuse the first's compiled
    # programs from XLA's persistent cache (it changes no result).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "e2_jax_xla_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    return env


def _main(config_arg: str, workdir: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "e2_jax.main", f"--config=configs/synth_study.py:{config_arg}",
            f"--workdir={workdir}", f"--mode={mode}"]


def pretrain(out: Path, steps: int | None) -> Path:
    """The shared initial weights: trained once, exported to OUT/init."""
    workdir, init = out / "pretrain", out / "init"
    timing = out / "pretrain_time.json"
    if not init.is_dir():
        arg = "variant=pretrain" + (f",steps={steps}" if steps else "")
        seconds = _run(_main(arg, workdir, "train"), out / "pretrain.log")
        seconds += _run([sys.executable, "-m", "e2_jax.convert", "from-workdir", str(workdir), str(init)],
                        out / "pretrain.log")
        timing.write_text(json.dumps({"seconds": seconds, "params_sha256": params_digest(init)}) + "\n")
    return init


def params_digest(model: Path) -> str:
    """sha256 of a model's parameters (every array's path, dtype, shape and bytes, in path
    order): a study continued on another machine re-runs the pre-training, which is
    deterministic, and checks it got the same initial weights."""
    _, params = pretrained.load(model)
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda x: jax.tree_util.keystr(x[0])):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def run_variant(out: Path, init: Path, variant: str, seed: int, steps: int | None) -> dict:
    """Trains, evaluates and probes one (variant, seed) in a process of its own; the result is
    kept in its workdir."""
    workdir = out / "runs" / f"{variant}_seed{seed}"
    result_file = workdir / "result.json"
    arg = f"variant={variant},seed={seed},init={init}" + (f",steps={steps}" if steps else "")
    if not result_file.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "benchmarks.synth_study", "--one", arg, "--out", str(workdir)],
             workdir / "log.txt")
    elif any(f"{f}_back" not in json.loads(result_file.read_text())["probe"] for f in BACK_PROBE_FIELDS):
        # A run from before the back-view probes: probe its final parameters, train nothing.
        _run([sys.executable, "-m", "benchmarks.synth_study", "--one", arg, "--out", str(workdir),
              "--probes-only"], workdir / "log.txt")
    return json.loads(result_file.read_text())


def _back_probes(workdir: Path) -> dict:
    probes = probe.probe_models({"model": Encoder.from_workdir(workdir)}, DATASET, BACK_PROBE_FIELDS,
                                max_train=PROBE_TRAIN, view=1)["model"]
    (workdir / "probe_back.json").write_text(json.dumps(probes, indent=2) + "\n")
    return {f"{f}_back": probes[f]["accuracy"] for f in BACK_PROBE_FIELDS}


def one(arg: str, workdir: Path, probes_only: bool = False) -> None:
    """What `run_variant` runs, in one process (one start-up, one set of compilations): the same
    as `python -m e2_jax.main --config configs/synth_study.py:ARG --workdir W --mode train`,
    then `--mode evaluate`, and `python -m e2_jax.probe --model W --dataset synth_fashion/medium
    --max-train 2048` (and again with `--view 1 --fields composition`). `probes_only`: add the
    back-view probes to an existing result."""
    if probes_only:
        result = json.loads((workdir / "result.json").read_text())
        start = time.perf_counter()
        result["probe"] |= _back_probes(workdir)
        result["seconds"]["probe"] += time.perf_counter() - start
        (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    config = synth_study.get_config(arg)
    times = {}
    start = time.perf_counter()
    trainer_main.run(config, workdir, "train")
    times["train"] = time.perf_counter() - start
    start = time.perf_counter()
    report = trainer_main.run(config, workdir, "evaluate")["report"]
    times["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    probes = probe.probe_models({"model": Encoder.from_workdir(workdir)}, DATASET, PROBE_FIELDS,
                                max_train=PROBE_TRAIN)["model"]
    (workdir / "probe.json").write_text(json.dumps(probes, indent=2) + "\n")
    back = _back_probes(workdir)
    times["probe"] = time.perf_counter() - start
    options = dict(item.split("=", 1) for item in arg.split(","))
    result = {"variant": options["variant"], "seed": int(options["seed"]), "config": arg, "seconds": times,
              "data": f"{DATASET} {SynthFashion.VERSION}", "checkpoint": report["checkpoint"],
              "retrieval": report["metrics"], "probe": {f: probes[f]["accuracy"] for f in PROBE_FIELDS} | back,
              "picks": report.get("picks_on_details"), "curves": loss_curves(workdir / "metrics.jsonl"),
              # Which initial weights: the same pre-training gives other weights on another CPU.
              "init_sha256": params_digest(Path(options["init"])) if options.get("init") else None,
              "machine": machine()}
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def _other_inits(results: list[dict], pretraining: dict) -> str:
    """Runs that name other initial weights than OUT's pre-training (made on another machine)."""
    other = collections.defaultdict(lambda: ([], set()))
    for r in results:
        if r.get("init_sha256") and r["init_sha256"] != pretraining.get("params_sha256"):
            runs, machines = other[r["init_sha256"]]
            runs.append(f"{r['variant']} seed {r['seed']}")
            machines.add(r.get("machine", "?"))
    return "".join(f"; {', '.join(runs)} from {sha[:16]}... ({', '.join(sorted(machines))})"
                   for sha, (runs, machines) in sorted(other.items()))


def machine() -> str:
    """This machine as the results name it; the CPU's model (Linux) decides XLA's CPU code and
    so the rounding."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {model}"


def loss_curves(metrics: Path, points: int = 20) -> dict[str, list[list[float]]]:
    """The training losses (global and each group's region loss) as `points` window means:
    {name: [[last step of the window, mean], ...]}. Whether, and when, a region loss leaves
    chance (ln 64 = 4.16 at batch 64) says when the model starts to read that group's detail."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]  # training steps (not validation rows)
    names = [k for k in rows[0] if k == "loss_global" or k.startswith("loss_region/")] if rows else []
    size = max(1, -(-len(rows) // points))
    return {name.removeprefix("loss_region/").removeprefix("loss_"): [
        [rows[min(i + size, len(rows)) - 1]["step"], float(np.mean([r[name] for r in rows[i : i + size]]))]
        for i in range(0, len(rows), size)] for name in names}


# --- the tables -----------------------------------------------------------------------------------

COLUMNS = (  # (heading, how to read it from a result)
    ("full-cand. SumR, tags", lambda r: r["retrieval"]["full_candidate/tags/sumr"]),
    ("full-cand. SumR, descr.", lambda r: r["retrieval"]["full_candidate/description/sumr"]),
    ("sample-100 SumR, tags", lambda r: r["retrieval"]["sample_100/tags/sumr"]),
    ("sample-100 SumR, descr.", lambda r: r["retrieval"]["sample_100/description/sumr"]),
    ("I2T R@1, tags", lambda r: r["retrieval"]["full_candidate/tags/i2t_r1"]),
    ("T2I R@1, tags", lambda r: r["retrieval"]["full_candidate/tags/t2i_r1"]),
    ("I2T R@1, descr.", lambda r: r["retrieval"]["full_candidate/description/i2t_r1"]),
    ("T2I R@1, descr.", lambda r: r["retrieval"]["full_candidate/description/t2i_r1"]),
    *((f"probe {f}", lambda r, f=f: r["probe"][f]) for f in PROBE_FIELDS),
    # (absent from a result written before the back-view probes, until the study resumes over it)
    *((f"probe {f} (back view)", lambda r, f=f: r["probe"].get(f"{f}_back")) for f in BACK_PROBE_FIELDS),
    ("train s", lambda r: r["seconds"]["train"]),
)


def _mean_std(values: list[float | None]) -> str:
    missing = sum(v is None for v in values)
    values = [v for v in values if v is not None]
    if missing:
        return (_mean_std(values) + f" ({len(values)} of {len(values) + missing})") if values else "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def picks_table(by_variant: dict[str, list[dict]]) -> tuple[str, dict]:
    """Where the selection tokens look (`selection.picks_on_details`), mean ± std over seeds:
    one row per variant with fusion blocks, group with a detail, and fusion block."""
    lines = ["| variant | seeds | group | block | picks on own detail | chance | picks on any detail "
             "| chance |", "|---|---|---|---|---|---|---|---|"]
    data: dict[str, dict] = {}
    for variant in (v for v in synth_study.VARIANTS if v in by_variant):
        runs = [r["picks"] for r in by_variant[variant] if r.get("picks")]
        if not runs:
            continue
        for group, entry in runs[0].items():
            if entry["detail"] is None:
                continue
            for b in range(len(entry["blocks"])):
                cells = {key: [run[group]["blocks"][b][key] for run in runs]
                         for key in ("on_own", "chance", "on_any", "chance_any")}
                data.setdefault(variant, {})[f"{group} block {b + 1}"] = cells
                lines.append(f"| {variant} | {len(runs)} | {group} | {b + 1} | " + " | ".join(
                    _mean_std(cells[k]) for k in ("on_own", "chance", "on_any", "chance_any")) + " |")
    return ("\n".join(lines) if data else ""), data


RULE_SEEDS = (0, 1, 2)


def rule_table(by_variant: dict[str, list[dict]]) -> tuple[str, dict]:
    """The selection study's rule (docs/results.md), run by run: a run passes when, for every group
    with a detail, its picks on its own detail are above twice chance in at least one fusion
    block, and its full-candidate description SumR is at least E²'s mean minus one standard
    deviation over E²'s seeds. A variant meets the rule when its runs of seeds 0, 1 and 2 all pass;
    it fails when one of them does not, whatever the others give; else it is open."""
    sumr = dict(COLUMNS)["full-cand. SumR, descr."]
    reference = [sumr(r) for r in by_variant.get("e2", [])]
    if len(reference) < 2:
        return "", {}
    threshold = statistics.mean(reference) - statistics.stdev(reference)
    runs = {v: sorted((r for r in by_variant[v] if r.get("picks")), key=lambda r: r["seed"])
            for v in synth_study.VARIANTS if v in by_variant}
    runs = {v: rs for v, rs in runs.items() if rs}
    if not runs:
        return "", {}
    groups = [g for g, entry in next(iter(runs.values()))[0]["picks"].items() if entry["detail"] is not None]
    lines = ["| variant | seed | full-cand. SumR, descr. | "
             + " | ".join(f"{g} picks (block 1 / 2; twice chance)" for g in groups) + " | passes |",
             "|---|---|---|" + "---|" * len(groups) + "---|"]
    data: dict[str, dict] = {}
    for variant, rs in runs.items():
        passed = {}
        for r in rs:
            cells, ok = [], sumr(r) >= threshold
            for g in groups:
                blocks = r["picks"][g]["blocks"]
                above = [b["on_own"] is not None and b["on_own"] > 2 * b["chance"] for b in blocks]
                ok = ok and any(above)
                cells.append(" / ".join(f"**{b['on_own']:.1f}**" if hit else f"{b['on_own']:.1f}"
                                        for b, hit in zip(blocks, above, strict=True))
                             + f" ({2 * blocks[0]['chance']:.1f})")
            passed[r["seed"]] = ok
            lines.append(f"| {variant} | {r['seed']} | {sumr(r):.1f} | " + " | ".join(cells)
                         + f" | {'yes' if ok else 'no'} |")
        if any(not passed.get(seed, True) for seed in RULE_SEEDS):
            verdict = "fails"
        elif all(passed.get(seed) for seed in RULE_SEEDS):
            verdict = "meets the rule"
        else:
            verdict = "open (seeds " + ", ".join(str(s) for s in RULE_SEEDS if s not in passed) + " not run)"
        data[variant] = {"passes": passed, "verdict": verdict}
    verdicts = "; ".join(f"{v}: {d['verdict']}" for v, d in data.items())
    head = (f"The rule, run by run: description SumR at least {threshold:.1f} (E²'s mean minus one standard "
            f"deviation over {len(reference)} seeds), and for every group its picks on its own detail above twice "
            f"chance in block 1 or 2 (in bold where they are). Verdicts: {verdicts}.\n\n")
    return head + "\n".join(lines), {"threshold": threshold, "variants": data}


def summary(results: list[dict]) -> tuple[str, dict]:
    """Markdown tables (retrieval; probes and time; where the selection tokens look; the selection
    study's rule, run by run) and the numbers behind them."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    data = {v: {name: [get(r) for r in rs] for name, get in COLUMNS} | {"seeds": [r["seed"] for r in rs]}
            for v, rs in by_variant.items()}
    tables = []
    for names in (COLUMNS[:8], COLUMNS[8:]):
        heads = [n for n, _ in names]
        lines = ["| variant | seeds | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
        for v in (x for x in synth_study.VARIANTS if x in data):
            lines.append(f"| {v} | {len(data[v]['seeds'])} | "
                         + " | ".join(_mean_std(data[v][h]) for h in heads) + " |")
        tables.append("\n".join(lines))
    picks, picks_data = picks_table(by_variant)
    if picks:
        tables.append(picks)
        data = {v: d | ({"picks": picks_data[v]} if v in picks_data else {}) for v, d in data.items()}
    rule, rule_data = rule_table(by_variant)
    if rule:
        tables.append(rule)
        data["rule"] = rule_data
    return "\n\n".join(tables) + "\n", data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synth_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where the runs and the summary go (resumable)")
    parser.add_argument("--study", choices=("budget", "details"), default="budget",
                        help="budget: every variant at 160 steps (issue 7); details: CLIP-FT, E² and its "
                             f"mechanism's ablations at {synth_study.DETAILS_STEPS:,} steps (issue 22)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", help="default: the study's")
    parser.add_argument("--steps", type=int, help=f"fine-tuning steps (default: the study's, {synth_study.STEPS} "
                        f"or {synth_study.DETAILS_STEPS}; smaller for a smoke run)")
    parser.add_argument("--pretrain-steps", type=int, help=f"default {synth_study.PRETRAIN_STEPS}")
    parser.add_argument("--report-only", action="store_true", help="tables of the runs in --out, run nothing")
    parser.add_argument("--one", metavar="CONFIG_ARG", help=argparse.SUPPRESS)  # one run, into --out
    parser.add_argument("--probes-only", action="store_true", help=argparse.SUPPRESS)  # with --one
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    if args.one:
        return one(args.one, out, args.probes_only)
    out.mkdir(parents=True, exist_ok=True)
    if args.study == "details":
        args.variants = args.variants or ",".join(synth_study.DETAILS_VARIANTS)
        args.steps = args.steps or synth_study.DETAILS_STEPS
    variants = [v.strip() for v in (args.variants or ",".join(synth_study.VARIANTS)).split(",") if v.strip()]
    unknown = set(variants) - set(synth_study.VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(synth_study.VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    start = time.perf_counter()
    if not args.report_only:
        init = pretrain(out, args.pretrain_steps)
        for seed in seeds:  # seed-major: a study cut short still has every variant at some seed
            for variant in variants:
                r = run_variant(out, init, variant, seed, args.steps)
                print(f"{variant} seed {seed}: full-candidate SumR (tags) "
                      f"{r['retrieval']['full_candidate/tags/sumr']:.1f}, (description) "
                      f"{r['retrieval']['full_candidate/description/sumr']:.1f}; "
                      f"{sum(r['seconds'].values()):.0f} s", flush=True)
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    table, data = summary(results)
    pretrain_file = out / "pretrain_time.json"
    total = sum(sum(r["seconds"].values()) for r in results)
    pretraining = json.loads(pretrain_file.read_text()) if pretrain_file.is_file() else {}
    total += pretraining.get("seconds", 0.0)
    data_versions = sorted({r.get("data", f"{DATASET} 1.0.0") for r in results})
    header = (f"SynthFashion study ({', '.join(data_versions)}), {len(results)} runs, "
              f"{total / 3600:.2f} h of run time in all (pre-training "
              f"included); this invocation {time.perf_counter() - start:.0f} s. Machine: {machine()}"
              f", Python {platform.python_version()}. Initial weights: sha256 "
              f"{pretraining.get('params_sha256', 'not recorded')}{_other_inits(results, pretraining)}.\n\n")
    (out / "summary.md").write_text(header + table)
    (out / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
