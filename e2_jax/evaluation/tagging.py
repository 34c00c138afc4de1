"""Zero-shot attribute tagging: rank every known value of an attribute for a product image.

    python -m e2_jax.tagging evaluate --workdir workdirs/e2 --fields brand,season,subcategory,composition
    python -m e2_jax.tagging tag --workdir workdirs/e2 --images ~/catalog --top 3

E² has a region embedding per group, trained against the text embedding of the raw tag (the
brand's name, the season code, ...): tagging ranks the candidate values of a group's field by
the similarity of that group's region embedding with each value's text embedding, the values
encoded exactly as they were in training. CLIP and CLIP-FT have only the global embedding:
they rank the values by its similarity with each value's text put in a prompt template
(`TEMPLATES`, `--template`); a model with E² regions can be asked to do the same
(`--global`). The candidates are every distinct value of the field in the run's training split.

`evaluate` scores top-1 and top-5 accuracy on the evaluation split (products whose value is
not among the candidates are left out and counted); `tag` prints the best values for each image
of a folder.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from e2_jax import distributed, errors, images, storage, workdir
from e2_jax.data import pipeline
from e2_jax.evaluation import report as report_lib
from e2_jax.inference import Encoder, ImageOutputs
from e2_jax.numerics import l2_normalize

KS = (1, 5)
TEMPLATES = {
    "brand": "a fashion product by {}.",
    "season": "a fashion product from the {} collection.",
    "subcategory": "a photo of {}.",
    "composition": "a fashion product made of {}.",
    "description": "{}",
}
DEFAULT_TEMPLATE = "a photo of {}."


def topk_accuracy(query: np.ndarray, candidates: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = KS) -> dict[str, float]:
    """Percent of rows of `query` ([N, D]) whose label (index into `candidates`, [C, D]) is
    among its k most similar candidates (cosine); ties count in the query's favour."""
    q, c = l2_normalize(np.asarray(query)), l2_normalize(np.asarray(candidates))
    s = q.astype(np.float64) @ c.astype(np.float64).T
    correct = s[np.arange(len(q)), labels]
    rank = (s > correct[:, None]).sum(1)
    return {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in ks}


def _group_index(encoder, field: str) -> int | None:
    if encoder.e2.num_tokens == 0:
        return None
    for g, group in enumerate(encoder.e2.groups):
        if group.text_field == field:
            return g
    return None


def value_embeddings(encoder, field: str, values: Sequence[str], use_regions: bool, template: str | None):
    """The candidates' text embeddings: the raw values for a region head, else in a template."""
    if use_regions:
        return encoder.encode_texts(list(values))
    template = template or TEMPLATES.get(field, DEFAULT_TEMPLATE)
    return encoder.encode_texts([template.format(v) for v in values])


def image_queries(outputs, encoder, field: str, use_global: bool) -> tuple[np.ndarray, bool]:
    """(the embedding each image is tagged with, whether it is a region embedding)."""
    g = None if use_global else _group_index(encoder, field)
    if g is None or outputs.region_embeddings is None:
        return outputs.global_embedding, False
    return outputs.region_embeddings[:, g], True


def table(report: dict) -> tuple[tuple[str, ...], tuple[tuple, ...]]:
    """One row per field: how it was scored, its candidates, top-1 and top-5, products scored and left out."""
    return (("field", "by", "candidates", "top-1", "top-5", "scored", "left out"),
            tuple((f, r["by"], r["candidates"], f"{r['top1']:.1f}", f"{r['top5']:.1f}", r["scored"], r["left_out"])
                  for f, r in report.items()))


def _training_values(config, fields: Sequence[str]) -> dict[str, np.ndarray]:
    source = pipeline.Source(config.data.dataset, config.data.train_split, config.data.data_dir or None)
    scanned = source.scan(fields)
    return {f: np.unique(scanned[f]) for f in fields}


def evaluate_tagging(encoder, config, fields: Sequence[str], *, use_global: bool = False,
                     template: str | None = None, batch_size: int = 256) -> dict:
    """Top-1/top-5 per field on the run's evaluation split."""
    candidates = _training_values(config, fields)
    source = pipeline.Source(config.data.dataset, config.data.eval_split, config.data.data_dir or None)
    labels = source.scan(fields)
    got = encoder.split_outputs(source, batch_size=batch_size)
    outputs = ImageOutputs(got["global"], got.get("regions"), None)
    report = {}
    for field in fields:
        values = list(candidates[field])
        index = {v: i for i, v in enumerate(values)}
        known = np.array([v in index for v in labels[field]])
        queries, regions = image_queries(outputs, encoder, field, use_global)
        text = value_embeddings(encoder, field, values, regions, template)
        y = np.array([index[v] for v in labels[field][known]], np.int64)
        result = topk_accuracy(queries[known], text, y) if known.any() else {f"top{k}": float("nan") for k in KS}
        report[field] = {**result, "candidates": len(values), "scored": int(known.sum()),
                         "left_out": int((~known).sum()), "by": "region" if regions else "global"}
    return report


def tag_images(encoder, images: Sequence, candidates: dict[str, Sequence[str]], *, top: int = 3,
               use_global: bool = False, template: str | None = None) -> list[dict[str, list[tuple[str, float]]]]:
    """For each image, per field, the `top` (value, similarity)."""
    outputs = encoder.image_outputs(images)
    out: list[dict] = [{} for _ in range(len(images))]
    for field, values in candidates.items():
        queries, regions = image_queries(outputs, encoder, field, use_global)
        text = value_embeddings(encoder, field, values, regions, template)
        scores = queries @ text.T
        for i, row in enumerate(scores):
            best = np.argsort(-row, kind="stable")[:top]
            out[i][field] = [(str(values[j]), float(row[j])) for j in best]
    return out


def main(argv: list[str] | None = None) -> None:
    distributed.single_host_only("python -m e2_jax.tagging")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate", help="top-1/top-5 accuracy on the run's evaluation split")
    t = sub.add_parser("tag", help="tag a folder of images")
    t.add_argument("--images", required=True)
    t.add_argument("--top", type=int, default=3)
    t.add_argument("--values", help="JSON {field: [values]} (default: the run's training split)")
    for s in (e, t):
        s.add_argument("--workdir", required=True)
        s.add_argument("--fields", default="brand,season,subcategory,composition")
        s.add_argument("--global", dest="use_global", action="store_true", help="use the global embedding")
        s.add_argument("--template", help="prompt for the global embedding, with {} for the value")
    args = parser.parse_args(argv)

    encoder = Encoder.from_workdir(args.workdir)
    config = workdir.read_config(args.workdir)
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    if args.command == "evaluate":
        report = evaluate_tagging(encoder, config, fields, use_global=args.use_global, template=args.template)
        header, rows = table(report)
        print(report_lib.markdown_table(header, rows), end="")
        # One folder per way of scoring: the global embedding's result does not replace the regions'.
        out = storage.path(args.workdir) / "eval" / ("tagging_global" if args.use_global else "tagging")
        written = report_lib.write(out, report, report_lib.markdown_table(header, rows), page=(
            "Zero-shot tagging", [report_lib.Text(f"Top-1 and top-5 accuracy (%) per field on the evaluation split, "
                                                  f"by the {'global' if args.use_global else 'region'} embedding where "
                                                  "it can."), report_lib.Table(header, rows)]))
        print(f"written to {written['json'].parent} (report.json, report.md, report.html)")
        return

    candidates = json.loads(Path(args.values).read_text()) if args.values else {
        f: list(v) for f, v in _training_values(config, fields).items()}
    paths, skipped, tagged = images.find(args.images), [], 0
    for start in range(0, len(paths), 1024):  # a chunk of images in memory at a time
        loaded = images.read(paths[start : start + 1024])
        skipped += loaded.skipped
        if not loaded.images:
            continue
        for path, tags in zip(loaded.paths, tag_images(encoder, loaded.images, candidates, top=args.top,
                                                       use_global=args.use_global, template=args.template),
                              strict=True):
            print(path)
            for field, values in tags.items():
                print(f"  {field}: " + ", ".join(f"{v} ({s:.2f})" for v, s in values))
        tagged += len(loaded.images)
    images.report(f"tagged {tagged} images", skipped)


if __name__ == "__main__":
    errors.main(main)
