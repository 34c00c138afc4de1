"""Evaluation of a model on a split: embeddings computed on the mesh, retrieval under every
protocol (E2_METHOD.md section 6; the metrics are `e2_jax.evaluation.retrieval`), and the report.

`pipeline.embed_split` runs an embedding function over a pass of the pipeline, each
(product, view) once across every device and process, padding dropped, and gathers the result
on every process. `retrieval_report` computes what the config asks for:

- `full_candidate`: the first view and one global text per product, all against all;
- `full_gallery`: every view of every product against one text per product;
- `sample_100`: 1,000 query products (seeded), each with 100 negatives of its sub-category,
  a random view (seeded) as each product's image;

each with every text in `eval.texts`: `tags` (the global text the model trains on, tags and
description) and `description` (the description alone). Results are keyed
`<protocol>/<text>/<metric>`; `write_report` writes them as JSON and a Markdown table. On a
split that records where its details are (SynthFashion), `--mode evaluate` also counts where
E²'s selection tokens look (`picks_report`, `selection`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from e2_jax import sharding, storage, workdir
from e2_jax.checkpoints import Checkpoints
from e2_jax.data import pipeline, synth_fashion
from e2_jax.data.preprocessing import Preprocessing
from e2_jax.evaluation import report as report_lib
from e2_jax.evaluation import retrieval, selection
from e2_jax.evaluation.protocols import REGISTRY, Protocols, Split
from e2_jax.models.e2 import E2Model
from e2_jax.numerics import l2_normalize
from e2_jax.spec import RunSpec, resolve

if TYPE_CHECKING:
    import ml_collections

KS = retrieval.KS


def retrieval_report(source: pipeline.Source, pre: Preprocessing, protocols: Protocols, *,
                     embed_images: Callable[[dict], jax.Array], embed_texts: Callable[[dict], jax.Array],
                     global_batch: int, sharding: jax.sharding.Sharding) -> dict:
    """Every protocol x text of `protocols` on `source`: {"metrics": {key: value}, "counts": ...}."""
    fields = [protocols.sample_field] if "sample_100" in protocols.protocols and protocols.sample_field else []
    scan = source.scan(fields)
    views, n = scan["views"], len(source)
    if np.any(views < 1):
        raise ValueError(f"{source.name}/{source.split}: products without images at {np.flatnonzero(views < 1)[:5]}")
    first = np.stack([np.arange(n), np.zeros(n, np.int64)], axis=1)
    every_view = any(REGISTRY[p].every_view for p in protocols.protocols)
    items = pipeline.every_view(views) if every_view else first
    batches = pipeline.eval_batches(source, pre, global_batch=global_batch, sharding=sharding, items=items)
    got = pipeline.embed_split(lambda b: {"image": embed_images(b)}, batches)
    split = Split(got["image"], got["index"], got["view"], views, scan)

    texts = {}
    for name, text_format in protocols.texts.items():
        text_pre = dataclasses.replace(pre, text_format=text_format)
        batches = pipeline.eval_batches(source, text_pre, global_batch=global_batch, sharding=sharding, images=False)
        texts[name] = pipeline.embed_split(lambda b: {"text": embed_texts(b)}, batches)["text"]

    metrics: dict[str, float] = {}
    counts = {"products": n, "images": len(split.image)}
    for name, text in texts.items():
        for protocol in protocols.protocols:
            result, counted = REGISTRY[protocol].score(split, text, protocols)
            counts.update(counted)
            metrics.update({f"{protocol}/{name}/{k}": v for k, v in result.items()})
    described = protocols.describe()
    for protocol in protocols.protocols:
        if REGISTRY[protocol].ran is not None:
            described[protocol] = REGISTRY[protocol].ran(protocols, counts)
    first_text = next(iter(texts))
    shown = examples(split.image[split.rows(np.zeros(n, np.int64))], texts[first_text])
    return {"metrics": metrics, "counts": counts, "protocols": described, "texts": dict(protocols.texts),
            "examples": {"text": first_text, **shown}}


def metrics_table(metrics: dict[str, float]) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(header, rows) of the metrics: one row per protocol x text."""
    keys = sorted({k.rsplit("/", 1)[0] for k in metrics}, key=lambda k: (list(REGISTRY).index(k.split("/")[0]), k))
    columns = [f"{d}_r{k}" for d in retrieval.DIRECTIONS for k in KS] + ["sumr"]
    header = ("protocol", "text", "I2T R@1", "R@5", "R@10", "T2I R@1", "R@5", "R@10", "SumR")
    return header, tuple((*key.split("/"), *(f"{metrics[f'{key}/{c}']:.1f}" for c in columns)) for key in keys)


def examples(image: np.ndarray, text: np.ndarray, queries: int = 4, misses: int = 4, top: int = 5) -> dict:
    """Text-to-image examples for the report's page, on each product's first view and one text
    format (full-candidate): `queries` products spread over the split, each with its `top`
    images and the rank of its own; and the `misses` products whose own image ranks worst."""
    n = len(text)
    ranks = retrieval.ranks(image, text)["t2i"]
    picked = np.unique(np.linspace(0, n - 1, min(queries, n)).round().astype(int))
    worst = np.argsort(-ranks, kind="stable")[:misses]
    image, text = l2_normalize(image), l2_normalize(text)

    def example(i: int) -> dict:
        scores = image @ text[i]
        best = np.argsort(-scores, kind="stable")[:top]
        return {"product": int(i), "rank": int(ranks[i]), "top": [[int(j), float(scores[j])] for j in best]}

    return {"queries": [example(i) for i in picked], "misses": [example(i) for i in worst]}


def write_report(report: dict, directory: str | os.PathLike) -> tuple[epath.Path, epath.Path]:
    """`report.json` and `report.md` in `directory` (process 0 only); `report.html`, with
    pictures, is written beside them by `visualize.write_report_page`."""
    directory = storage.path(directory)
    if jax.process_index() == 0:
        lines = [f"# Evaluation of {report.get('checkpoint', '?')}", "",
                 f"Dataset `{report.get('dataset', '?')}`, split `{report.get('split', '?')}`: "
                 + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in report["counts"].items()) + ".", "",
                 report_lib.markdown_table(*metrics_table(report["metrics"])), "Protocols:", ""]
        lines += [f"- `{p}`: {text}" for p, text in report["protocols"].items()]
        lines += ["", "Texts:", ""] + [f"- `{name}`: `{fmt}`" for name, fmt in report["texts"].items()]
        if "picks_on_details" in report:
            lines += ["", "Where the selection tokens look (every view; percent of each group's picks; "
                      "`e2_jax/evaluation/selection.py`):", "",
                      report_lib.markdown_table(*selection.table(report["picks_on_details"]))]
        report_lib.write(directory, report, "\n".join(lines) + "\n")
    return directory / "report.json", directory / "report.md"


# --- A trained model on the run's evaluation split ----------------------------------------------


def open_source(config: ml_collections.ConfigDict, protocols: Protocols) -> pipeline.Source | None:
    """The run's evaluation split (None without one), checked for the fields `protocols` read."""
    if not config.data.eval_split:
        return None
    source = pipeline.Source(config.data.dataset, config.data.eval_split, config.data.data_dir or None)
    lacking = sorted(f for f in protocols.fields() if f not in source.features.keys())
    if lacking:
        raise ValueError(f"{config.data.dataset}/{config.data.eval_split} has no field {lacking} that the evaluation "
                         f"texts or eval.sample_field name; it has {sorted(source.features.keys())}")
    return source


def make_embed(spec: RunSpec):
    """(images, texts): jitted (params, batch) -> the global image / text embeddings."""
    model, seed = spec.model, spec.config.seed

    @jax.jit
    def images(params: dict, batch: dict) -> jax.Array:
        rngs = {"gumbel": jax.random.key(seed)}  # used only with the authors' noisy evaluation
        return model.apply({"params": params}, batch["images"], False, method=E2Model.encode_image,
                           rngs=rngs).global_embedding

    @jax.jit
    def texts(params: dict, batch: dict) -> jax.Array:
        return model.apply({"params": params}, batch["text"], method=E2Model.encode_text)

    return images, texts


def evaluation_report(spec: RunSpec, source: pipeline.Source, params: dict, protocols: Protocols,
                      embed=None) -> dict[str, Any]:
    images, texts = embed or make_embed(spec)
    return retrieval_report(source, spec.pre, protocols, embed_images=lambda b: images(params, b),
                            embed_texts=lambda b: texts(params, b), global_batch=spec.config.eval.batch_size,
                            sharding=sharding.batch_sharding(spec.mesh))


DETAIL_BOXES = synth_fashion.DETAIL_BOXES  # a split's record of where its details are


def picks_report(spec: RunSpec, source: pipeline.Source, params: dict) -> dict | None:
    """Where the selection tokens look (`selection.picks_on_details`), over every view of
    `source`: for E² with fusion blocks on a split that records its details' boxes, else None."""
    e2, clip = spec.e2, spec.clip
    if not (e2.selection_tokens and e2.fusion) or DETAIL_BOXES not in source.features.keys():
        return None
    scan = source.scan([DETAIL_BOXES])
    items = pipeline.every_view(scan["views"])
    model, seed = spec.model, spec.config.seed

    @jax.jit
    def picks(params: dict, batch: dict) -> jax.Array:
        out = model.apply({"params": params}, batch["images"], False, method=E2Model.encode_image,
                          rngs={"gumbel": jax.random.key(seed)})
        return jnp.moveaxis(out.picks, 0, 1)  # [B, blocks, K]

    batches = pipeline.eval_batches(source, spec.pre, global_batch=spec.config.eval.batch_size,
                                    sharding=sharding.batch_sharding(spec.mesh), items=items)
    got = pipeline.embed_split(lambda b: {"picks": picks(params, b)}, batches)
    boxes = scan[DETAIL_BOXES][got["index"], got["view"]]
    groups = [(g.name, g.text_field, g.tokens) for g in e2.groups]
    return selection.picks_on_details(np.moveaxis(got["picks"], 1, 0), boxes, clip.image_size // clip.patch_size,
                                      groups, synth_fashion.DETAIL_FIELDS)


def validate(spec: RunSpec, source: pipeline.Source, params: dict, embed=None) -> dict[str, float]:
    """Validation during training: full-candidate retrieval (first views, the global text),
    as `i2t_r1` ... `sumr`."""
    report = evaluation_report(spec, source, params, spec.validation, embed)
    return {k.rsplit("/", 1)[-1]: v for k, v in report["metrics"].items()}


def format_retrieval(metrics: dict[str, float]) -> str:
    both = " | ".join(f"{d.upper()} R@1/5/10 " + "/".join(f"{metrics[f'{d}_r{k}']:.1f}" for k in KS)
                      for d in ("i2t", "t2i"))
    return f"{both} | SumR {metrics['sumr']:.1f}"


@dataclasses.dataclass
class Evaluated:
    spec: RunSpec
    source: pipeline.Source
    params: dict
    where: str  # which parameters
    result: dict[str, Any]  # {"report": ..., "eval": full-candidate metrics of the first text}


def evaluate_run(config: ml_collections.ConfigDict, directory: str | os.PathLike) -> Evaluated:
    """`--mode=evaluate`: the run's best parameters (else its latest) under every protocol of
    `config.eval`, reported in `<workdir>/eval/report.{json,md}`."""
    spec = resolve(config, stages=False)
    source = open_source(config, spec.protocols)
    if source is None:
        raise ValueError("nothing to evaluate on: data.eval_split is empty")
    checkpoints = Checkpoints(storage.path(directory), config.checkpoint.keep)
    try:
        params, where = workdir.trained_params(checkpoints, tuple(config.stages), spec.abstract_params())
    finally:
        checkpoints.close()
    report = evaluation_report(spec, source, params, spec.protocols)
    report.update(checkpoint=where, dataset=config.data.dataset, split=config.data.eval_split)
    on_details = picks_report(spec, source, params)
    if on_details is not None:
        report["picks_on_details"] = on_details
    json_path, md_path = write_report(report, storage.path(directory) / workdir.EVAL_DIR)
    table = report_lib.markdown_table(*metrics_table(report["metrics"]))
    if on_details is not None:
        table += "\nwhere the selection tokens look (percent of picks):\n" + report_lib.markdown_table(
            *selection.table(on_details))
    print(f"evaluation of {where} ({report['counts']}):\n{table}report: {json_path}, {md_path}", flush=True)
    first = next(iter(report["texts"]))
    validation = {k.rsplit("/", 1)[-1]: v for k, v in report["metrics"].items()
                  if k.startswith(f"full_candidate/{first}/")}
    return Evaluated(spec, source, params, where, {"report": report, **({"eval": validation} if validation else {})})
