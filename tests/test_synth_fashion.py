"""SynthFashion: deterministic, disjoint splits, hard negatives, and its TFDS builder."""

import numpy as np
import pytest

from e2_jax.data import synth_fashion
from e2_jax.data.synth_fashion import SynthConfig, product, product_record

CONFIG = SynthConfig(image_size=64, num_train=48, num_validation=12)


def test_same_seed_same_bytes_other_seed_other_data():
    a, b = product(CONFIG, "train", 5), product(CONFIG, "train", 5)
    assert a["images"].dtype == np.uint8 and a["images"].shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(a["images"], b["images"])
    other = product(CONFIG.replace(seed=1), "train", 5)
    assert not np.array_equal(a["images"], other["images"])


def test_splits_are_disjoint_products():
    train = {product_record(CONFIG, "train", i)["product_id"] for i in range(CONFIG.num_train)}
    validation = {product_record(CONFIG, "validation", i)["product_id"] for i in range(CONFIG.num_validation)}
    assert len(train) == 48 and len(validation) == 12 and not train & validation


def test_families_are_hard_negatives_that_differ_in_the_details():
    records = [product_record(CONFIG, "train", i) for i in range(CONFIG.family_size)]
    assert len({(r["subcategory"], r["colour_id"]) for r in records}) == 1  # one look
    assert len({(r["brand"], r["composition"], r["season"]) for r in records}) > 1  # other details
    # Two products of a family with different brands differ at the logo, not at large.
    a, b = next((x, y) for x in records for y in records if x["brand_id"] != y["brand_id"])
    front_a = synth_fashion.render_views(CONFIG, a)[0].astype(float)
    front_b = synth_fashion.render_views(CONFIG, b)[0].astype(float)
    differs = np.abs(front_a - front_b).max(-1) > 60
    assert 0 < differs.mean() < 0.2


def test_records_are_fashiongen_like():
    record = product_record(CONFIG, "validation", 3)
    for field in ("name", "description", "caption", "brand", "category", "subcategory", "composition",
                  "season", "gender"):
        assert isinstance(record[field], str) and record[field]
    assert record["subcategory"] in synth_fashion.SUBCATEGORIES
    assert record["season"] in synth_fashion.SEASONS
    assert record["brand"] not in record["description"]  # the brand is seen only in its logo


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="num_brands"):
        SynthConfig(num_brands=99)
    with pytest.raises(ValueError, match="views"):
        SynthConfig(views=4)


def test_tfds_builder_writes_every_product(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    import e2_jax.data.builders.synth_fashion  # noqa: F401  (registers the builder)

    monkeypatch.setenv("E2_SYNTH_WORKERS", "2")
    builder = tfds.builder("synth_fashion/tiny", data_dir=str(tmp_path), file_format="tfrecord")
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 64
    assert builder.info.splits["validation"].num_examples == 16
    examples = list(tfds.as_numpy(builder.as_dataset(split="validation")))
    assert sorted(int(e["product_id"]) for e in examples) == list(range(64, 80))
    first = next(e for e in examples if int(e["product_id"]) == 64)
    want = product(builder.builder_config.synth, "validation", 0)
    np.testing.assert_array_equal(first["images"], want["images"])  # PNG: lossless
    assert first["brand"].decode() == want["brand"]
