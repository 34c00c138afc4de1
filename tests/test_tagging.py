"""Zero-shot tagging: accuracy against a brute-force reference, the region and global paths on
a trained tiny E², and the folder command."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from e2_jax import config as recipes
from e2_jax.data import pipeline
from e2_jax.evaluation import tagging
from e2_jax.inference import Encoder
from tests.test_inference import _raw_first_views


def test_topk_accuracy_equals_brute_force():
    rng = np.random.default_rng(0)
    query, candidates = rng.standard_normal((300, 8)), rng.standard_normal((20, 8))
    labels = rng.integers(0, 20, 300)
    got = tagging.topk_accuracy(query, candidates, labels)
    hits = {1: 0, 5: 0}
    for q, y in zip(query, labels, strict=True):
        sims = [q @ c / np.linalg.norm(q) / np.linalg.norm(c) for c in candidates]
        better = sum(s > sims[y] for s in sims)
        hits[1] += better < 1
        hits[5] += better < 5
    assert got == pytest.approx({"top1": 100 * hits[1] / 300, "top5": 100 * hits[5] / 300}, abs=1e-9)
    assert 0 < got["top1"] < got["top5"] < 100
    assert tagging.topk_accuracy(candidates, candidates, np.arange(20)) == {"top1": 100.0, "top5": 100.0}


def test_region_and_global_tagging_of_a_trained_model(synth_tiny, trained_tiny, tmp_path, capsys):
    workdir, _ = trained_tiny
    encoder = Encoder.from_workdir(workdir, batch_size=8)
    config = recipes.from_json((workdir / "config.json").read_text())
    report = tagging.evaluate_tagging(encoder, config, ["brand", "subcategory"], batch_size=8)
    assert report["brand"]["by"] == "region" and report["subcategory"]["by"] == "global"  # no subcategory group
    # The same numbers through the public API on the raw images: the brand group's region
    # embedding (group 0 of "brand,season") against the raw brand names.
    train_values = pipeline.Source("synth_fashion/tiny", "train", synth_tiny).scan(["brand"])["brand"]
    values = list(np.unique(train_values))
    labels = pipeline.Source("synth_fashion/tiny", "validation", synth_tiny).scan(["brand"])["brand"]
    known = np.array([v in values for v in labels])
    outputs = encoder.image_outputs(_raw_first_views(synth_tiny, 16))
    want = tagging.topk_accuracy(outputs.region_embeddings[known, 0], encoder.encode_texts(values),
                                 np.array([values.index(v) for v in labels[known]]))
    assert {k: report["brand"][k] for k in want} == want
    assert report["brand"]["scored"] + report["brand"]["left_out"] == 16
    assert tagging.evaluate_tagging(encoder, config, ["brand"], use_global=True, batch_size=8)["brand"]["by"] == \
        "global"
    # The folder command.
    for i, image in enumerate(_raw_first_views(synth_tiny, 2)):
        Image.fromarray(image).save(tmp_path / f"p{i}.png")
    tagging.main(["tag", "--workdir", str(workdir), "--images", str(tmp_path), "--fields", "brand,season",
                  "--top", "2"])
    printed = capsys.readouterr().out.splitlines()
    # Region and global results go to their own reports (in a copy: the session's workdir is shared).
    workdir = shutil.copytree(workdir, tmp_path / "run")
    for flags in ([], ["--global"]):
        tagging.main(["evaluate", "--workdir", str(workdir), "--fields", "brand", *flags])
    region = json.loads((workdir / "eval" / "tagging" / "report.json").read_text())["brand"]
    overall = json.loads((workdir / "eval" / "tagging_global" / "report.json").read_text())["brand"]
    assert (region["by"], overall["by"]) == ("region", "global")
    assert "| brand | region |" in (workdir / "eval" / "tagging" / "report.md").read_text()
    assert "<td>brand</td><td>global</td>" in (workdir / "eval" / "tagging_global" / "report.html").read_text()
    assert printed[0].endswith("p0.png") and printed[1].startswith("  brand: ") and printed[1].count("(") == 2
