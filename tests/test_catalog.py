"""The `catalog` dataset: your own product table (JSONL, CSV, Parquet) built as the pipeline reads it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2_jax.data import catalog
from e2_jax.data.builders.skipped import describe
from e2_jax.data.catalog import TableOptions
from e2_jax.errors import ConfigError, DataError

PRODUCTS = 12


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The worked example's catalog (SynthFashion/tiny products, three PNG views each) and its rows."""
    root = tmp_path_factory.mktemp("example")
    path = catalog.example(root, PRODUCTS, variant="tiny", table="products.jsonl")
    return root, [json.loads(line) for line in path.read_text().splitlines()]


def build(root: Path, name: str, data_dir: Path, options: TableOptions | None = None):
    from e2_jax.data.build import build as build_dataset

    return build_dataset(f"catalog/{name}", str(data_dir), str(root), options)


def read(data_dir: Path, name: str) -> dict[str, dict[str, dict]]:
    """{split: {product_id: example, images decoded}} of a built catalog."""
    from e2_jax.data import builders

    builder = builders.builder(f"catalog/{name}", data_dir=str(data_dir))
    out = {}
    for split in builder.info.splits:
        records = builder.as_data_source(split)
        out[split] = {}
        for i in range(len(records)):
            example = records[i]
            product_id = example["product_id"].decode()
            out[split][product_id] = {k: [np.asarray(x) for x in v] if k == "images" else
                                      [int(x) for x in v] if k == "image_positions" else v.decode()
                                      for k, v in example.items()}
    return out


def with_table(root: Path, out: Path, table_rows: list[dict], table: str) -> Path:
    """A copy of the example's images with another table beside them."""
    shutil.copytree(root / "images", out / "images", dirs_exist_ok=True)
    catalog.write_table(table_rows, out / table)
    return out


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_every_table_format_builds_the_same_dataset(example, tmp_path):
    """JSONL, CSV, Parquet with paths, Parquet with image bytes (Hugging Face `datasets`'
    Image layout: a list of {bytes, path} structs), and one row per image: the same examples."""
    root, rows = example
    per_image = [{**row, "image": name} for row in rows for name in row["image"]]
    with_bytes = [{**row, "image": [{"bytes": (root / name).read_bytes(), "path": name} for name in row["image"]]}
                  for row in rows]
    tables = {"jsonl": (rows, "products.jsonl"), "csv": (rows, "products.csv"),
              "parquet_paths": (rows, "products.parquet"), "parquet_bytes": (with_bytes, "products.parquet"),
              "rows_per_image": (per_image, "products.csv")}
    built = {}
    for name, (table_rows, table) in tables.items():
        source = root if name == "jsonl" else with_table(root, tmp_path / name, table_rows, table)
        build(source, name, tmp_path / "tfds")
        built[name] = read(tmp_path / "tfds", name)
    reference = built["jsonl"]
    assert sum(len(v) for v in reference.values()) == PRODUCTS
    for row in rows:  # every column's text, all three views, pixel for pixel
        split = catalog.hash_split(row["id"], TableOptions().fractions)
        example = reference[split][row["id"]]
        assert {k: example[k] for k in ("title", "description", "brand", "material", "season", "category")} == \
            {k: row[k] for k in ("title", "description", "brand", "material", "season", "category")}
        assert len(example["images"]) == 3
        for pixels, name in zip(example["images"], row["image"], strict=True):
            np.testing.assert_array_equal(pixels, np.asarray(Image.open(root / name).convert("RGB")))
    for name, dataset in built.items():
        assert dataset.keys() == reference.keys(), name
        for split in reference:
            assert dataset[split].keys() == reference[split].keys(), name
            for product_id, example in reference[split].items():
                other = dataset[split][product_id]
                assert {k: v for k, v in other.items() if k != "images"} == \
                    {k: v for k, v in example.items() if k != "images"}, (name, product_id)
                assert len(other["images"]) == len(example["images"])
                for a, b in zip(other["images"], example["images"], strict=True):
                    np.testing.assert_array_equal(a, b)


def test_splits_come_from_the_split_column_or_from_a_stable_hash_of_the_id(example, tmp_path):
    root, rows = example
    # By column: exactly as written, any split names.
    named = [{**row, "split": ("train", "validation", "test")[i % 3]} for i, row in enumerate(rows)]
    build(with_table(root, tmp_path / "by_column", named, "products.csv"), "by_column", tmp_path / "tfds")
    got = read(tmp_path / "tfds", "by_column")
    assert {split: sorted(v) for split, v in got.items()} == {
        s: sorted(r["id"] for r in named if r["split"] == s) for s in ("train", "validation", "test")}
    # By hash: sha256 of the id on the cumulative fractions, whatever the order of the rows.
    options = TableOptions(fractions=(("train", 0.5), ("validation", 0.25), ("test", 0.25)))
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    for name, table_rows in (("hash_a", rows), ("hash_b", shuffled)):
        build(with_table(root, tmp_path / name, table_rows, "products.parquet"), name, tmp_path / "tfds", options)
    a, b = read(tmp_path / "tfds", "hash_a"), read(tmp_path / "tfds", "hash_b")
    assert {s: sorted(v) for s, v in a.items()} == {s: sorted(v) for s, v in b.items()}
    for split, products in a.items():
        for product_id in products:
            u = int(hashlib.sha256(product_id.encode()).hexdigest()[:16], 16) / 2**64
            assert split == ("train" if u < 0.5 else "validation" if u < 0.75 else "test")
    # Fixed values: the hash split never changes between versions of e2_jax.
    assert [catalog.hash_split(f"p{i}", options.fractions) for i in range(6)] == \
        ["train", "test", "train", "train", "validation", "train"]


def test_bad_rows_are_skipped_counted_and_named(example, tmp_path):
    root, rows = example
    out = with_table(root, tmp_path / "bad", [], "products.jsonl")
    (out / "images" / "broken.png").write_bytes(png(np.zeros((8, 8, 3), np.uint8))[:40])  # truncated
    good = rows[:4]
    bad = [
        {**rows[6], "image": ["images/missing.png"]},  # its only image is missing: left out
        {**rows[7], "image": [rows[7]["image"][0], "images/broken.png"]},  # one view dropped, kept
        {**rows[8], "brand": "  "},  # empty brand: left out
        {**rows[9], "id": ""},  # no id
        rows[10], {**rows[10], "title": "Another title"},  # one id, two texts: left out
        {**rows[11], "image": rows[11]["image"][:1]}, {**rows[11], "image": rows[11]["image"][1:]},  # merged
        {**rows[4], "image": [rows[4]["image"][0], "../outside.png", "images/../images/" +
                               rows[4]["image"][1].split("/")[-1]]},  # leaves the folder: refused
        {**rows[5], "title": "  A\n  title\twith   gaps "},  # whitespace collapsed
    ]
    (tmp_path / "outside.png").write_bytes(png(np.full((8, 8, 3), 200, np.uint8)))
    catalog.write_table(good + bad, out / "products.jsonl")
    options = TableOptions(fractions=(("train", 1.0),))
    builder = build(out, "bad", tmp_path / "tfds", options)
    kept = read(tmp_path / "tfds", "bad")["train"]
    assert sorted(kept) == sorted([r["id"] for r in good] + [rows[i]["id"] for i in (7, 11, 4, 5)])
    assert len(kept[rows[7]["id"]]["images"]) == 1 and len(kept[rows[11]["id"]]["images"]) == 3
    assert len(kept[rows[4]["id"]]["images"]) == 2  # its first, and the one whose ../ stays inside
    # A kept view keeps its position in the product's image list: its third image is view 2.
    assert kept[rows[4]["id"]]["image_positions"] == [0, 2] and kept[rows[7]["id"]]["image_positions"] == [0]
    assert kept[rows[11]["id"]]["image_positions"] == [0, 1, 2]  # over its two rows, in table order
    from e2_jax.data import pipeline

    source = pipeline.Source("catalog/bad", "train", str(tmp_path / "tfds"))
    scan = source.scan(["product_id", "image_positions"])
    items = pipeline.every_view(scan["views"])  # the (product, stored view) pairs an index visits
    named = pipeline.table_views(scan, items[:, 0], items[:, 1])
    fourth = list(scan["product_id"]).index(rows[4]["id"])
    assert list(named[items[:, 0] == fourth]) == [0, 2] and list(items[items[:, 0] == fourth, 1]) == [0, 1]
    assert list(pipeline.table_views({"views": scan["views"]}, items[:, 0], items[:, 1])) == list(items[:, 1])
    assert kept[rows[5]["id"]]["title"] == "A title with gaps"
    skipped = json.loads((Path(builder.data_dir) / "metadata.json").read_text())["skipped"]["train"]
    assert skipped["products"] == 4 and skipped["views"] == 2
    assert skipped["views_by_reason"] == {"undecodable image": 1, "outside the table's folder": 1}
    said = describe(skipped)  # what the build command prints: products and views apart
    assert said.startswith("skipped 4 products (") and " and 2 views of kept products (" in said, said
    products_part, views_part = said.split(" and 2 views of kept products ")
    assert "no id: 1" in products_part and "outside" not in products_part
    assert views_part in ("(undecodable image: 1, outside the table's folder: 1)",
                          "(outside the table's folder: 1, undecodable image: 1)")
    assert describe({"products": 1, "views": 1, "by_reason": {"x": 1, "y": 1}, "views_by_reason": {"y": 1}}) == \
        "skipped 1 product (x: 1) and 1 view of a kept product (y: 1)"
    refused = next(e for e in skipped["examples"] if e.get("view") == "../outside.png")
    assert "--outside-images" in refused["reason"]
    # Asked for, a path outside the folder is read.
    allowed = build(out, "bad_outside", tmp_path / "tfds", dataclasses.replace(options, outside=True))
    assert len(read(tmp_path / "tfds", "bad_outside")["train"][rows[4]["id"]]["images"]) == 3
    assert read(tmp_path / "tfds", "bad_outside")["train"][rows[4]["id"]]["image_positions"] == [0, 1, 2]
    assert json.loads((Path(allowed.data_dir) / "metadata.json").read_text())["skipped"]["train"]["views"] == 1
    assert sorted(skipped["product_ids"]) == sorted([rows[6]["id"], rows[8]["id"], "row 8", rows[10]["id"]])
    named = {(e["product"], e["reason"].split(" (")[0], e.get("view")) for e in skipped["examples"]}
    assert named == {
        (rows[6]["id"], "no usable image", None),
        (rows[7]["id"], "undecodable image", "images/broken.png"), (rows[8]["id"], "empty brand", None),
        ("row 8", "no id", None), (rows[10]["id"], "duplicate id with conflicting texts", None),
        (rows[4]["id"], "outside the table's folder", "../outside.png")}
    reasons = {e["product"]: e["reason"] for e in skipped["examples"] if "view" not in e}
    assert reasons[rows[6]["id"]] == "no usable image (missing image (images/missing.png))"
    conflict = next(e for e in skipped["examples"] if e["product"] == rows[10]["id"])
    assert conflict["reason"] == "duplicate id with conflicting texts (rows 9 and 10)"


def test_optional_fields_may_be_empty_but_a_config_that_uses_them_is_stopped(example, tmp_path):
    from e2_jax.data import pipeline

    root, rows = example
    table_rows = [{**row, "season": "" if i % 4 == 0 else row["season"]} for i, row in enumerate(rows)]
    out = with_table(root, tmp_path / "optional", table_rows, "products.csv")
    build(out, "optional", tmp_path / "tfds", TableOptions(fractions=(("train", 1.0),), optional=("season",)))
    source = pipeline.Source("catalog/optional", "train", str(tmp_path / "tfds"))
    assert len(source) == PRODUCTS and source.metadata["catalog"]["empty"] == {"train": {"season": 3}}
    fine = pipeline.local_eval_batches(source, pipeline.Preprocessing(image_size=32, text_format="{title}"),
                                       global_batch=4, rows=range(4))
    assert next(fine)["text"].shape == (4, 77)
    with pytest.raises(ConfigError, match=r"uses \['season'\], empty in \{'season': 3\} products"):
        pipeline.local_eval_batches(source, pipeline.Preprocessing(image_size=32, text_format="{title}",
                                                                   tags=(("season", "season", 8),)),
                                    global_batch=4, rows=range(4))


def test_table_mistakes_are_errors_that_say_what_the_table_has(example, tmp_path):
    root, rows = example
    out = with_table(root, tmp_path / "columns", rows, "products.csv")
    with pytest.raises(ConfigError, match=r"no image column 'images' \(did you mean 'image'\?\); its columns are "
                                          r"\['id', 'image', 'title'"):
        build(out, "columns", tmp_path / "tfds", TableOptions(image_column="images"))
    with pytest.raises(ConfigError, match="no id column 'sku'"):
        build(out, "columns", tmp_path / "tfds", TableOptions(id_column="sku"))
    with pytest.raises(ConfigError, match="--optional names"):
        build(out, "columns", tmp_path / "tfds", TableOptions(optional=("colour",)))
    # Every row unusable: an error, and nothing is left marked as built.
    unusable = with_table(root, tmp_path / "unusable", [{**r, "image": "images/none.png"} for r in rows],
                          "products.csv")
    with pytest.raises(DataError, match="no usable product"):
        build(unusable, "unusable", tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "catalog" / "unusable").exists() or not any(
        (tmp_path / "tfds" / "catalog" / "unusable").glob("*/dataset_info.json"))
    # Two tables, or none.
    catalog.write_table(rows, out / "products.jsonl")
    with pytest.raises(FileNotFoundError, match="2 product tables"):
        build(out, "columns", tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="no product table"):
        build(tmp_path / "columns" / "images", "columns", tmp_path / "tfds")


def test_the_catalog_config_is_the_papers_recipe_on_the_catalog():
    from e2_jax import config as recipes

    catalog_config = recipes.config_module("configs/e2_catalog.py").get_config
    for method, paper in (("e2", "configs/e2_b16.py"), ("clip_ft", "configs/clip_ft_b16.py")):
        ours, theirs = catalog_config(f"name=shop,groups=brand+material,method={method}"), \
            recipes.config_module(paper).get_config(None)
        for key in ("model", "optim", "loss", "batch_size", "stages", "finetune", "e2.enabled", "e2.fusion"):
            got, want = ours, theirs
            for part in key.split("."):
                got, want = got[part], want[part]
            assert got == want, key
        assert ours.data.dataset == "catalog/shop" and [g["name"] for g in ours.e2.groups] == ["brand", "material"]
    assert catalog_config("name=shop").stages == ("finetune",)  # no groups: CLIP-FT
    assert catalog_config("name=shop,groups=brand,ablation=no_fusion").e2.fusion is False
    with pytest.raises(ConfigError, match="ablation of E²"):
        catalog_config("name=shop,groups=brand,method=clip_ft,ablation=no_fusion")
    with pytest.raises(ConfigError, match="method must be e2 or clip_ft"):
        catalog_config("name=shop,groups=brand,method=e3")


@pytest.mark.slow
def test_the_catalog_config_trains_a_tiny_model_and_evaluates_it(example, tmp_path, capsys, caplog):
    """configs/e2_catalog.py:runlocal on the worked example: E² with three of the table's
    columns as region groups, trained a few steps and evaluated under every protocol."""
    from e2_jax import config as recipes
    from e2_jax import main

    root, _ = example
    build(root, "shop", tmp_path / "tfds", TableOptions(fractions=(("train", 0.5), ("validation", 0.5))))
    arg = (f"name=shop,data_dir={tmp_path / 'tfds'},text={{title}}. {{brand}}. {{material}},"
           "groups=brand+material+season,description={description},sample_field=category,runlocal")
    c = recipes.config_module("configs/e2_catalog.py").get_config(arg)
    assert [g["name"] for g in c.e2.groups] == ["brand", "material", "season"] and c.e2.enabled
    assert c.data.dataset == "catalog/shop" and c.model.preset == "tiny"
    c.eval.sample_negatives = 2  # the example's few validation products
    from e2_jax.training import train

    wrong = recipes.config_module("configs/e2_catalog.py").get_config(arg.replace("+season", "+colour"))
    with pytest.raises(ConfigError, match=r"no text field \['colour'\] .*; it has \[.*'season'"):
        train.prepare(wrong)  # before anything is compiled or written
    trained = main.run(c, tmp_path / "run", mode="train_and_evaluate")
    assert trained["step"] == 8 and trained["eval"]["sumr"] > 0  # validated on the catalog as it trained
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        evaluated = main.run(c, tmp_path / "run", mode="evaluate")
    # The report once: printed, not logged as well, and no validation line after it.
    printed = capsys.readouterr().out
    assert printed.count("| protocol | text |") == 1 and printed.count("evaluation of") == 1, printed
    assert not [r for r in caplog.records if "full_candidate" in r.getMessage()]
    assert main.summary(evaluated) is None  # its report is printed
    assert main.summary(trained).startswith("validation: ")  # training ends with its last validation
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["dataset"] == "catalog/shop" and set(report["texts"]) == {"tags", "description"}
    for protocol in ("full_candidate", "sample_100"):
        for text in ("tags", "description"):
            assert 0 <= report["metrics"][f"{protocol}/{text}/sumr"] <= 600
    assert evaluated["eval"]["sumr"] == report["metrics"]["full_candidate/tags/sumr"]
    assert "picks_on_details" not in report  # a catalog records no detail boxes
    assert list((tmp_path / "run" / "eval" / "selection_maps").glob("*.png"))  # but the maps are drawn
    with pytest.raises(ConfigError, match="needs name=NAME"):
        recipes.config_module("configs/e2_catalog.py").get_config("runlocal")


def test_the_embedding_export_round_trips_ids_and_vectors(example, trained_tiny, tmp_path, capsys):
    """`python -m e2_jax.search index --dataset catalog/NAME` writes each product's id, view and
    embeddings (Parquet and NumPy the same), equal to the Encoder on the product's files."""
    from e2_jax import search
    from e2_jax.inference import Encoder

    root, rows = example
    workdir, _ = trained_tiny
    build(root, "export", tmp_path / "tfds", TableOptions(fractions=(("train", 0.5), ("validation", 0.5))))
    built = read(tmp_path / "tfds", "export")["validation"]
    common = ["index", "--workdir", str(workdir), "--dataset", "catalog/export", "--data-dir", str(tmp_path / "tfds"),
              "--batch-size", "4"]
    search.main([*common, "--out", str(tmp_path / "first.parquet"), "--regions"])
    assert f"indexed {len(built)} images of {len(built)} products of catalog/export/validation" in \
        capsys.readouterr().err
    import pyarrow.parquet as pq

    encoder = Encoder.from_workdir(workdir, batch_size=4)  # the command's own functions, one compile
    for name in ("all.npz", "all.parquet"):
        search.index_split(encoder, "catalog/export", "validation", tmp_path / name, data_dir=str(tmp_path / "tfds"),
                           views="all", normalize=False, batch_size=4)
    files = {row["id"]: [root / name for name in row["image"]] for row in rows}
    first = pq.read_table(tmp_path / "first.parquet").to_pydict()
    assert sorted(first["id"]) == sorted(built) and set(first["view"]) == {0}
    want = encoder.image_outputs([files[i][0] for i in first["id"]])
    np.testing.assert_allclose(np.array(first["embedding"]), want.global_embedding, atol=2e-5)
    for g, name in enumerate(["brand", "season"]):  # the tiny run's groups
        np.testing.assert_allclose(np.array(first[f"region_{name}"]), want.region_embeddings[:, g], atol=2e-5)

    index = search.load_index(tmp_path / "all.parquet")
    with np.load(tmp_path / "all.npz") as npz:
        np.testing.assert_array_equal(npz["ids"], index.ids)
        np.testing.assert_array_equal(npz["embeddings"], index.embeddings)
        views = npz["views"]
    assert index.meta["normalized"] is False and index.meta["views"] == "all"
    assert len(index.ids) == sum(len(files[i]) for i in built)
    raw = encoder.encode_images([files[i][v] for i, v in zip(index.ids, views, strict=True)], normalize=False)
    np.testing.assert_allclose(index.embeddings, raw, atol=1e-4)
    assert index.views is not None and list(index.views) == list(views)
    scores = encoder.encode_texts(["Red top"])[0] @ (raw / np.linalg.norm(raw, axis=1, keepdims=True)).T
    every = search.query(tmp_path / "all.parquet", ["Red top"], encoder, top=3, every_view=True)[0]
    assert [m.score for m in every] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-5)
    # By default one line per product, its best view.
    got = search.query(tmp_path / "all.parquet", ["Red top"], encoder, top=3)[0]
    best = {}
    for product, view, score in zip(index.ids, views, scores, strict=True):
        if product not in best or score > best[product][1]:
            best[product] = (int(view), float(score))
    want = sorted(best.items(), key=lambda kv: -kv[1][1])[:3]
    assert [(m.id, m.view) for m in got] == [(p, v) for p, (v, _) in want]
    assert [m.score for m in got] == pytest.approx([s for _, (_, s) in want], abs=1e-5)
    # An image of the index, as a query, finds its own product (and view) first.
    product = sorted(built)[0]
    (hit,) = search.query(tmp_path / "all.parquet", [str(files[product][1])], encoder, top=1)[0]
    assert (hit.id, hit.view) == (product, 1) and hit.score == pytest.approx(1.0, abs=1e-4)
    capsys.readouterr()
    search.main(["query", "--index", str(tmp_path / "all.parquet"), "Red top", "--top", "2", "--every-view"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "text: Red top" and len(printed) == 3 and printed[1].endswith(f"(view {every[0].view})")
    with pytest.raises(ConfigError, match=r"\.npz or \.parquet"):
        search.main([*common, "--out", str(tmp_path / "index.csv")])
