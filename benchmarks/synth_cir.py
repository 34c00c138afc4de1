"""SynthFashion-CIR: zero-shot composed retrieval with the details study's encoders, E² against CLIP-FT.

    python -m benchmarks.synth_cir --study /tmp/synth_details --out /tmp/synth_cir
    python -m benchmarks.synth_cir --study /tmp/synth_details --out /tmp/synth_cir --report-only

For each encoder of the details study (`python -m benchmarks.synth_study --study details`:
`runs/<variant>_seed<seed>`, 6,000 steps on SynthFashion/medium; its final parameters), as
the project's own commands do it:

1. a DeCap captioner on that encoder (`python -m e2_jax.captioning --mode train` with
   `configs/decap.py:encoder=W,dataset=synth_fashion/medium`: 1,500 steps on the training
   products' descriptions);
2. `python -m e2_jax.composed_retrieval` on SynthFashion-CIR (`synth_fashion_cir`, 600
   triplets of the validation products, built if missing) with the template recomposer: CIReVL
   with the DeCap captions, and the image, late-fusion and instruction baselines; and CIReVL
   once more with the references' true descriptions as captions (`true captions`: the
   pipeline without the captioner's errors).

Resumable: a run whose reports exist is not run again. Writes `summary.md` and `summary.json`
(mean ± std over seeds of R@10 and R@50 per category and their means) in `--out`.
"""

from __future__ import annotations

try:  # triton before TensorFlow (tests/conftest.py says why)
    import triton  # noqa: F401
except ImportError:
    pass

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from e2_jax import captioning
from e2_jax import config as recipes
from e2_jax.data import synth_cir, synth_fashion
from e2_jax.data.build import build
from e2_jax.evaluation import composed_retrieval

ROWS = (("cirevl", "decap", "CIReVL (DeCap captions)"), ("cirevl", "true", "CIReVL (true captions)"),
        ("image", "decap", "image only"), ("late_fusion", "decap", "image + text"),
        ("instruction", "decap", "text only (the modification)"))


def true_captions(path: Path) -> Path:
    """Each reference image's own description (the product's text), by image id."""
    config = synth_fashion.VARIANTS[synth_cir.VARIANT][1]
    table = {synth_cir.image_name(t["reference"]): t["reference"]["description"]
             for t in synth_cir.triplets(config, synth_cir.TRIPLETS)}
    path.write_text(json.dumps(table, indent=1))
    return path


def run_one(study: Path, out: Path, run: str, data_dir: str, captions: Path, log) -> dict:
    workdir, here = study / "runs" / run, out / "runs" / run
    decap = here / "decap_model"  # the DeCap run; the retrieval reports go to decap/ and true/
    seconds = {}
    if not (decap / captioning.MEMORY_FILE).is_file():
        settings = recipes.config_module("configs/decap.py").get_config(
            f"encoder={workdir},dataset=synth_fashion/medium")
        start = time.perf_counter()
        captioning.train(settings, decap, log=lambda _: None)
        seconds["decap_training"] = time.perf_counter() - start
    reports = {}
    for name, arg in (("decap", f"captioner=decap,decap={decap}"), ("true", f"captioner=file,captions={captions}")):
        report_file = here / name / "report.json"
        if not report_file.is_file():
            c = recipes.config_module("configs/cirevl.py").get_config(
                f"encoder={workdir},dataset=synth_fashion_cir,data_dir={data_dir},{arg}")
            if name == "true":
                c.methods = ("cirevl",)
            start = time.perf_counter()
            composed_retrieval.run(c, here / name, log=log)
            seconds[f"retrieval_{name}"] = time.perf_counter() - start
        reports[name] = json.loads(report_file.read_text())
    if seconds:
        (here / "seconds.json").write_text(json.dumps(seconds) + "\n")
    return reports


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summary(out: Path, variants: list[str], seeds: list[int]) -> tuple[str, dict]:
    table: dict = {}
    categories = list(synth_cir.CATEGORIES)
    for variant in variants:
        done = [s for s in seeds if all((out / "runs" / f"{variant}_seed{s}" / n / "report.json").is_file()
                                        for n in ("decap", "true"))]
        for method, source, label in ROWS:
            cells = {}
            for category in [*categories, "mean"]:
                for k in ("r10", "r50"):
                    values = [json.loads((out / "runs" / f"{variant}_seed{s}" / source / "report.json").read_text())
                              ["metrics"][method][category][k] for s in done]
                    cells[f"{category}/{k}"] = values
            table[f"{variant}/{label}"] = {"variant": variant, "row": label, "seeds": done, "values": cells}
    head = ("| encoder | query | seeds | " + " | ".join(f"{c} R@10 | {c} R@50" for c in categories)
            + " | mean R@10 | mean R@50 |")
    lines = [head, "|---" * (3 + 2 * len(categories) + 2) + "|"]
    for entry in table.values():
        if not entry["seeds"]:
            continue
        cells = [_mean_std(entry["values"][f"{c}/{k}"]) for c in [*categories, "mean"] for k in ("r10", "r50")]
        lines.append(f"| {entry['variant']} | {entry['row']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    by_change, change_table = _by_change(out, variants, seeds)
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    text = (f"SynthFashion-CIR ({synth_cir.TRIPLETS} triplets of synth_fashion/{synth_cir.VARIANT}'s validation "
            f"products; template recomposer), the details study's encoders at 6,000 steps; mean ± std over seeds. "
            f"Machine: {machine}.\n\n" + "\n".join(lines) + "\n\n" + by_change)
    return text, {"recalls": table, "by_change": change_table}


def _by_change(out: Path, variants: list[str], seeds: list[int]) -> tuple[str, dict]:
    """R@10 over the categories' pooled one-change queries, by what changed: where the encoder
    must see the colour, the garment's shape, the logo or the tag."""
    config = synth_fashion.VARIANTS[synth_cir.VARIANT][1]
    made = synth_cir.triplets(config, synth_cir.TRIPLETS)
    changes = {synth_cir.image_name(t["reference"]): t["changes"] for t in made}
    rows, table = [], {}
    for variant in variants:
        for method, source, label in ROWS:
            values: dict[str, list[float]] = {c: [] for c in synth_cir.CHANGES}
            for seed in seeds:
                path = out / "runs" / f"{variant}_seed{seed}" / source / "queries.jsonl"
                if not path.is_file():
                    continue
                queries = [json.loads(line) for line in path.read_text().splitlines()]
                for change, ranks in [*((c, [q["ranks"][method] for q in queries if changes[q["reference"]] == [c]])
                                        for c in synth_cir.CHANGES),
                                      *((f"{n} change{'s' * (n > 1)}", [q["ranks"][method] for q in queries
                                                                        if len(changes[q["reference"]]) == n])
                                        for n in (1, 2))]:
                    values.setdefault(change, []).append(100.0 * sum(r < 10 for r in ranks) / len(ranks))
            if values[synth_cir.CHANGES[0]]:
                table[f"{variant}/{label}"] = values
                rows.append(f"| {variant} | {label} | " + " | ".join(_mean_std(v) for v in values.values()) + " |")
    head = ("| encoder | query | " + " | ".join(f"{c} changed" for c in synth_cir.CHANGES)
            + " | one change (300) | two changes (300) |")
    text = ("R@10 of the queries pooled over the categories: the one-change queries by what changed, and all "
            "the one- and two-change queries:\n\n"
            + "\n".join([head, "|---" * (4 + len(synth_cir.CHANGES)) + "|", *rows]) + "\n")
    return text, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="/tmp/synth_details", help="the details study's --out")
    parser.add_argument("--out", default="/tmp/synth_cir")
    parser.add_argument("--variants", default="clip_ft,e2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-dir", default="", help="where SynthFashion-CIR is built (default: TFDS's)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        for name in ("synth_fashion_cir/images", "synth_fashion_cir/triplets"):
            build(name, args.data_dir or None)
        captions = true_captions(out / "true_captions.json")
        for seed in seeds:
            for variant in variants:
                run = f"{variant}_seed{seed}"
                print(f"== {run}", flush=True)
                run_one(Path(args.study), out, run, args.data_dir, captions, log=lambda m: print(m, flush=True))
    text, table = summary(out, variants, seeds)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(table, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
