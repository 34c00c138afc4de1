"""Zero-shot composed image retrieval with any e2_jax encoder: CIReVL, and the baselines beside it.

    python -m e2_jax.composed_retrieval --config 'configs/cirevl.py:encoder=workdirs/e2_b32,...' --out runs/cir_e2

CIReVL (Karthik et al., ICLR 2024) is training-free: for a query (a reference image and a
modification text, "is darker and has a logo") it (1) captions the reference image, (2) lets a
language model rewrite the caption as the modification says (`e2_jax.evaluation.recompose`), and (3)
retrieves with the rewritten description's text embedding. E² replaces CLIP in step 3 (and
can serve the captioner: DeCap, `e2_jax.captioning`). Beside it, per query: `image` (the
reference image's embedding), `late_fusion` (the reference image's plus the modification
text's, each normalised) and `instruction` (the modification text's). Scored by FashionIQ's
protocol (`evaluation/composed.py`): per category, R@K of the target among the category's
gallery, and the means over categories.

`exact` (the default on FashionIQ) does what CIReVL's released code does where it changes the
numbers: images padded to a ratio of 1.25 before resizing (`image_pad`), the two captions
joined even when one is empty (`keep_empty_caption`), and the recomposer's prompt, chat
settings and parsing (`e2_jax.evaluation.recompose`); docs/composed_retrieval.md lists each difference.

SynthFashion-CIR is built on first use. The gallery and the queries are in the files' order
(the image lists', which breaks ties, and the caption files'). Queries whose reference or target
image is not in the gallery (left out of the built images) are dropped and counted. Writes
`report.json`, `report.md` and `queries.jsonl` (each query's category, its `index` in its caption
file, caption, instruction, description and target rank per method) to `--out`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from e2_jax import distributed, errors, inference, spec, storage
from e2_jax.data import pipeline, synth_cir, synth_fashion
from e2_jax.data.build import build
from e2_jax.errors import ConfigError, DataError
from e2_jax.evaluation import captioning, composed, recompose
from e2_jax.evaluation import report as report_lib
from e2_jax.numerics import l2_normalize

# The template recomposer's words for FashionIQ (colours and garments its captions name).
FASHION_WORDS = {
    "colour": ["black", "white", "grey", "gray", "red", "blue", "navy", "green", "yellow", "pink", "purple",
               "orange", "brown", "beige", "khaki", "cream", "gold", "silver", "maroon", "burgundy", "teal",
               "turquoise", "olive", "tan", "coral", "lavender", "darker", "lighter"],
    "garment": ["dress", "gown", "shirt", "t-shirt", "tee", "top", "blouse", "tank top", "sweater", "hoodie",
                "jacket", "tunic", "polo", "cardigan"],
}


def vocabulary(dataset: str) -> dict[str, list[str]]:
    if dataset == "synth_fashion_cir":
        return synth_cir.vocabulary(synth_fashion.VARIANTS[synth_cir.VARIANT][1])  # the builder's variant
    return FASHION_WORDS


def make_recomposer(c: ml_collections.ConfigDict, dataset: str):
    kind = c.kind
    if kind == "template":
        return recompose.TemplateRecomposer(vocabulary(dataset))
    prompt = c.prompt_file or None
    if kind == "chat":
        return recompose.ChatRecomposer(c.url, c.model, api_key=os.environ.get(c.api_key_env, ""), timeout=c.timeout,
                                        retries=c.retries, max_tokens=c.max_tokens, stop=[s for s in c.stop if s],
                                        prompt_file=prompt, strict=c.strict, exact=c.exact)
    if kind == "hf":
        return recompose.HFRecomposer(c.hf_model, prompt_file=prompt, strict=c.strict, exact=c.exact)
    raise AssertionError(kind)  # spec.check_cirevl names the kinds


def read_captions(path: str | Path) -> dict[str, str]:
    """Captions by image id: a JSON object {id: caption}, or JSON lines {"id": ..., "caption": ...}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no caption file {path} (captions=...: a JSON object {{image id: caption}} or JSON lines "
                          "with id and caption)")
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
    except ValueError:
        pass
    out = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = str(row["caption"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}, line {number}: not a JSON line with id and caption") from None
    return out


def _gallery(encoder, c) -> tuple[dict, np.ndarray]:
    """The gallery in its image lists' order: {"source", "rows" (each image's example in the
    source), "ids", "categories"}, and its embeddings."""
    source = pipeline.Source(f"{c.dataset}/images", c.split, c.data_dir or None)
    scan = source.scan(["product_id", "category", "index"])
    rows = np.lexsort((scan["index"], scan["category"]))
    got = encoder.split_outputs(source, _first_views(rows), batch_size=c.batch_size, progress=True,
                                pad_ratio=c.image_pad)
    return {"source": source, "rows": rows, "ids": scan["product_id"][rows].astype(str),
            "categories": scan["category"][rows].astype(str)}, _in_order(got, rows)


def _first_views(examples: np.ndarray) -> np.ndarray:
    return np.stack([examples, np.zeros_like(examples)], axis=1)


def _in_order(got: dict[str, np.ndarray], examples: np.ndarray) -> np.ndarray:
    """`split_outputs`' global embeddings of `examples` (each once), in `examples`' order."""
    where = {int(e): i for i, e in enumerate(got["index"])}
    return got["global"][[where[int(e)] for e in examples]]


def _where(origin: dict) -> dict:
    """An encoder's origin with its paths resolved (the same model named two ways is the same)."""
    return {k: str(Path(v).resolve()) if k in ("workdir", "pretrained") else v for k, v in origin.items()}


def _captions(c, gallery: dict, rows: np.ndarray, encoder, embeddings: np.ndarray) -> list[str]:
    """The reference images' captions (rows of the gallery)."""
    if c.captioner.kind == "file":
        table = read_captions(c.captioner.captions)
        names = [str(n) for n in gallery["ids"][rows]]
        missing = sorted({n for n in names if n not in table})
        if missing:
            raise DataError(f"{c.captioner.captions} has no caption for {len(missing)} reference images (e.g. "
                            f"{missing[:3]})")
        return [table[n] for n in names]
    captioner = captioning.captioner_from_workdir(c.captioner.decap)
    if _where(captioner.encoder.origin) == _where(encoder.origin):
        image = embeddings[rows]  # the same encoder: its gallery embeddings
    else:
        examples = np.unique(gallery["rows"][rows])
        got = captioner.encoder.split_outputs(gallery["source"], _first_views(examples), batch_size=c.batch_size,
                                              pad_ratio=c.image_pad)
        image = _in_order(got, gallery["rows"][rows])
    return captioner.caption_image_embeddings(image, beam_size=c.captioner.beam_size)


def run(c: ml_collections.ConfigDict, out: str | os.PathLike, log=print) -> dict[str, Any]:
    spec.check_cirevl(c)
    recomposer = make_recomposer(c.recomposer, c.dataset)  # its errors before any work
    if c.dataset == "synth_fashion_cir":  # made here, no download: built on first use (10 s)
        for part in ("images", "triplets"):
            build(f"{c.dataset}/{part}", c.data_dir or None)
    encoder = inference.load_encoder(c.encoder or None, c.pretrained or None, batch_size=c.batch_size)
    gallery, embeddings = _gallery(encoder, c)
    triplets = pipeline.Source(f"{c.dataset}/triplets", c.split, c.data_dir or None).scan(
        ["reference", "target", "category", "caption_1", "caption_2", "index"])
    order = np.lexsort((triplets["index"], triplets["category"]))  # each category's caption file, in order
    triplets = {k: v[order] for k, v in triplets.items()}
    row = {(cat, name): i for i, (cat, name) in enumerate(zip(gallery["categories"], gallery["ids"], strict=True))}
    keep, dropped = [], {"reference not in the gallery": 0, "target not in the gallery": 0}
    taken: dict[str, int] = {}
    for q, (cat, ref, target) in enumerate(zip(triplets["category"], triplets["reference"], triplets["target"],
                                               strict=True)):
        if (cat, ref) not in row:
            dropped["reference not in the gallery"] += 1
        elif (cat, target) not in row:
            dropped["target not in the gallery"] += 1
        elif not c.max_queries or taken.get(cat, 0) < c.max_queries:
            taken[cat] = taken.get(cat, 0) + 1
            keep.append(q)
    if not keep:
        raise DataError(f"{c.dataset}/{c.split}: no query left to score ({dropped})")
    keep = np.array(keep)
    categories, targets = triplets["category"][keep].astype(str), triplets["target"][keep].astype(str)
    references = np.array([row[(cat, ref)] for cat, ref in zip(categories, triplets["reference"][keep], strict=True)])
    instructions = [composed.join_captions(a, b, keep_empty=c.keep_empty_caption)
                    for a, b in zip(triplets["caption_1"][keep], triplets["caption_2"][keep], strict=True)]
    log(f"{len(keep)} queries of {c.dataset}/{c.split} ({dropped}); gallery {len(gallery['ids'])} images")
    queries: dict[str, np.ndarray] = {}
    captions = descriptions = None
    if "cirevl" in c.methods:
        captions = _captions(c, gallery, references, encoder, embeddings)
        descriptions = recomposer.recompose(captions, instructions)
        queries["cirevl"] = encoder.encode_texts(descriptions)
    image = embeddings[references]
    instruction = encoder.encode_texts(instructions) if {"late_fusion", "instruction"} & set(c.methods) else None
    if "image" in c.methods:
        queries["image"] = image
    if "late_fusion" in c.methods:
        queries["late_fusion"] = np.asarray(l2_normalize(l2_normalize(image) + l2_normalize(instruction)))
    if "instruction" in c.methods:
        queries["instruction"] = instruction
    metrics, ranks = {}, {}
    for method in c.methods:
        ranks[method] = np.zeros(len(keep), np.int64)
        per_category = {}
        for category in sorted(set(categories)):
            mine, theirs = categories == category, gallery["categories"] == category
            ranks[method][mine] = composed.target_ranks(queries[method][mine], embeddings[theirs],
                                                        gallery["ids"][theirs], targets[mine])
            per_category[category] = composed.recalls(ranks[method][mine])
        metrics[method] = {**per_category, "mean": composed.summary(per_category)}
    report = {
        "dataset": c.dataset, "split": c.split, "encoder": encoder.source, "origin": encoder.origin,
        "exact": c.exact, "image_pad": c.image_pad, "keep_empty_caption": c.keep_empty_caption,
        "captioner": c.captioner.to_dict(), "recomposer": {"kind": c.recomposer.kind, **(
            {"url": c.recomposer.url, "model": c.recomposer.model} if c.recomposer.kind == "chat" else {}),
            "queries": recomposer.stats.queries, "fallbacks": recomposer.stats.fallbacks,
            "fallback_examples": recomposer.stats.examples},
        "counts": {"queries": len(keep), "dropped": dropped, "gallery": len(gallery["ids"]),
                   "per_category": {k: int((categories == k).sum()) for k in sorted(set(categories))}},
        "metrics": metrics,
    }
    start = time.perf_counter()
    page = report_page(report, gallery, embeddings, queries, categories, references, targets, instructions, captions,
                       descriptions, ranks)
    report["page_seconds"] = time.perf_counter() - start
    _write(storage.path(out), report, categories, triplets["index"][keep], triplets["reference"][keep], targets,
           instructions, captions, descriptions, ranks, page)
    log(markdown(report))
    return report


EXAMPLES = 4  # queries shown on the report page


def report_page(report: dict, gallery: dict, embeddings: np.ndarray, queries: dict[str, np.ndarray],
                categories: np.ndarray, references: np.ndarray, targets: np.ndarray, instructions: list[str],
                captions: list[str] | None, descriptions: list[str] | None,
                ranks: dict[str, np.ndarray]) -> tuple[str, list]:
    """`report.html`'s blocks: the metrics, then the first query of each category (up to
    `EXAMPLES`): its reference image, instruction, caption and recomposed description (CIReVL),
    and the top 5 of the category's gallery by CIReVL's query (else the first method's), the
    target framed in green (and shown after them with its rank when it is not among them)."""
    method = "cirevl" if "cirevl" in queries else next(iter(queries))
    shown = [int(np.flatnonzero(categories == c)[0]) for c in sorted(set(categories))][:EXAMPLES]
    tops, target_rows = {}, {}
    for q in shown:
        theirs = np.flatnonzero(gallery["categories"] == categories[q])
        tops[q] = theirs[np.argsort(-(embeddings[theirs] @ queries[method][q]), kind="stable")[:5]]
        target_rows[q] = int(theirs[gallery["ids"][theirs] == targets[q]][0])
    wanted = sorted({int(r) for q in shown for r in (references[q], *tops[q], target_rows[q])})
    pictures = dict(zip(wanted, (image for image, _ in gallery["source"].first_views(gallery["rows"][wanted])),
                        strict=True))
    figure = lambda row, caption, marked=False: report_lib.Figure(report_lib.png(pictures[row], 192), caption, marked)
    blocks = [report_lib.Text(f"{report['counts']['queries']} queries against a gallery of "
                              f"{report['counts']['gallery']} images, encoder {report['encoder']}; recall in %."),
              metrics_table(report),
              report_lib.Text(f"Example queries, ranked by {method}", heading=2)]
    for q in shown:
        said = [f"instruction: {instructions[q]}"]
        if captions is not None and descriptions is not None:
            said += [f"caption: {captions[q]}", f"recomposed: {descriptions[q]}"]
        figures = [figure(int(references[q]), "reference\n" + "\n".join(said))]
        figures += [figure(int(r), f"{k}. {gallery['ids'][r]}", gallery["ids"][r] == targets[q])
                    for k, r in enumerate(tops[q], 1)]
        if target_rows[q] not in tops[q]:
            figures.append(figure(target_rows[q], f"target {targets[q]}, rank {int(ranks[method][q])}", True))
        blocks.append(report_lib.Gallery(f"{categories[q]}: {instructions[q]}", tuple(figures), width=160))
    return f"Composed retrieval on {report['dataset']}/{report['split']}", blocks


def metrics_table(report: dict) -> report_lib.Table:
    """One row per method: R@10 and R@50 per category, their means and average."""
    categories = [k for k in next(iter(report["metrics"].values())) if k != "mean"]
    header = ("method", *(f"{c} R@{k}" for c in categories for k in (10, 50)), "mean R@10", "mean R@50", "avg")
    return report_lib.Table(header, tuple(
        (method, *(f"{m[c][f'r{k}']:.1f}" for c in categories for k in (10, 50)), f"{m['mean']['r10']:.1f}",
         f"{m['mean']['r50']:.1f}", f"{m['mean']['average']:.1f}") for method, m in report["metrics"].items()))


def markdown(report: dict) -> str:
    return metrics_table(report).markdown()


def _write(out, report, categories, indices, references, targets, instructions, captions, descriptions,
           ranks, page) -> None:
    report_lib.write(out, report, f"Composed retrieval on {report['dataset']}/{report['split']} with "
                     f"{report['encoder']} ({report['counts']['queries']} queries).\n\n" + markdown(report), page=page)
    with (out / "queries.jsonl").open("w") as f:
        for i in range(len(targets)):
            f.write(json.dumps({"category": str(categories[i]), "index": int(indices[i]),
                                "reference": str(references[i]),
                                "target": str(targets[i]), "instruction": instructions[i],
                                **({"caption": captions[i], "description": descriptions[i]} if captions else {}),
                                "ranks": {m: int(r[i]) for m, r in ranks.items()}}) + "\n")


def main(argv: list[str] | None = None) -> None:
    distributed.single_host_only("python -m e2_jax.composed_retrieval")
    config_flag = config_flags.DEFINE_config_file("config", None, "configs/cirevl.py[:arg]", lock_config=True)
    out_flag = flags.DEFINE_string("out", None, "where report.json, report.md and queries.jsonl go")
    flags.mark_flags_as_required(["config", "out"])

    def go(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        run(config_flag.value, out_flag.value, log=lambda message: print(message, flush=True))

    errors.run(go, argv=argv or sys.argv)


if __name__ == "__main__":
    main()
