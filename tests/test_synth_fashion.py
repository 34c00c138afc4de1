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
    front_a = synth_fashion.render(CONFIG, a)[0][0].astype(float)
    front_b = synth_fashion.render(CONFIG, b)[0][0].astype(float)
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


@pytest.mark.slow
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


# Which views show which detail: front (logo, tag), back (care label, tag), detail crop (logo, label).
DESIGN = (("logo", ("front", "detail")), ("label", ("back", "detail")), ("tag", ("front", "back")))


@pytest.mark.parametrize("field, detail", [("brand_id", "logo"), ("composition_id", "label"), ("season_id", "tag")])
def test_each_detail_is_inside_its_box_in_every_view_that_shows_it(field, detail):
    d = synth_fashion.DETAILS.index(detail)
    for index in range(4):
        record = product_record(CONFIG, "train", index)
        images, boxes = synth_fashion.render(CONFIG, record)
        other = {**record, field: (record[field] + 1) % {"brand_id": 24, "composition_id": 10, "season_id": 6}[field]}
        changed = np.abs(images.astype(int) - synth_fashion.render(CONFIG, other)[0].astype(int)).max(-1) > 0
        for view, name in enumerate(synth_fashion.VIEWS):
            box = boxes[view, d]
            assert (box[0] >= 0) == (name in dict(DESIGN)[detail]), (detail, name)
            if box[0] < 0:
                assert not changed[view].any()  # a view without the detail does not change with it
                continue
            assert changed[view].any()
            y, x = np.nonzero(changed[view])
            side = CONFIG.image_size  # every changed pixel overlaps the box
            assert (y + 1 > box[0] * side).all() and (y < box[2] * side).all(), (detail, name)
            assert (x + 1 > box[1] * side).all() and (x < box[3] * side).all(), (detail, name)



def test_every_product_shows_each_detail_in_the_views_designed_to():
    config = synth_fashion.VARIANTS["medium"][1]  # the study's validation split (labels past the top edge)
    for index in range(config.num_validation):
        boxes = synth_fashion.render(config, product_record(config, "validation", index))[1]
        shown = boxes[..., 0] >= 0  # [views, details]
        for d, detail in enumerate(synth_fashion.DETAILS):
            assert [synth_fashion.VIEWS[v] for v in np.flatnonzero(shown[:, d])] == list(dict(DESIGN)[detail]), index
        present = boxes[shown]
        assert (present >= 0).all() and (present <= 1).all() and (present[:, :2] < present[:, 2:]).all()
        assert (boxes[~shown] == -1).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "medium", "tiny"])
def test_every_detail_reads_from_every_view_that_shows_it(variant):
    """docs/data.md's table: a linear classifier on the detail's pixels reads its value from
    each view that shows it (`python -m e2_jax.data.synth_fashion --readability`)."""
    config = synth_fashion.VARIANTS[variant][1]
    accuracy = synth_fashion.readability(config)
    assert set(accuracy) == {(detail, view) for detail, views in DESIGN for view in views}
    assert min(accuracy.values()) >= 0.95, accuracy


def test_small_renders_as_medium():  # so medium's readability is small's
    medium, small = synth_fashion.VARIANTS["medium"][1], synth_fashion.VARIANTS["small"][1]
    assert small.replace(num_train=1, num_validation=1) == medium.replace(num_train=1, num_validation=1)
