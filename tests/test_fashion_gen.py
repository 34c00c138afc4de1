"""The fashion_gen builder on small h5 files in FashionGen's exact schema, and SynthFashion's export."""

import shutil
import tracemalloc

import h5py
import numpy as np
import pytest

from e2_jax.data import fashion_gen_h5
from e2_jax.data.build import build
from e2_jax.data.builders.fashion_gen import FashionGen
from e2_jax.data.synth_fashion import SynthConfig, product_record, render, write_fashiongen_h5

# Rows of the hand-written file: product id per row. 101's rows are not contiguous, row 4 is
# blank (a corrupt capture), 104 has an empty description, 105's description is UTF-8 bytes.
PRODUCT_OF_ROW = [101, 102, 102, 101, 103, 104, 105, 101, 103]
DESCRIPTIONS = {101: "Crêpe de Chine blouse in ivory.".encode("latin-1"), 102: b"Wool coat.",
                103: b"Silk scarf.", 104: b"", 105: "Laine mérinos.".encode()}


def _image(row: int) -> np.ndarray:
    return np.random.default_rng(row).integers(0, 256, (256, 256, 3), dtype=np.uint8)


def write_real_schema(path, rows=PRODUCT_OF_ROW, drop_row_of=None, blank_row=4) -> None:
    """An h5 file laid out as FashionGen's, written with h5py alone (not our Writer)."""
    n = len(rows)
    with h5py.File(path, "w") as f:
        image = f.create_dataset("input_image", (n, 256, 256, 3), np.uint8)
        for row in range(n):
            image[row] = 0 if row == blank_row else _image(row)
        descriptions = [DESCRIPTIONS.get(p, b"Plain shirt.") for p in rows]
        texts = {"description": descriptions, "concat_description": [b"Name. " + d for d in descriptions],
                 "name": [f"Item {p}".encode() for p in rows], "brand": ["Comme des Garçons".encode("latin-1")] * n,
                 "category": [b"TOPS"] * n, "subcategory": [b"SHIRTS"] * n, "composition": [b"100% silk."] * n,
                 "season": [b"FW2016"] * n, "gender": [b"WOMEN"] * n, "department": [b"CLOTHING"] * n,
                 "pose": [f"id_gridfs_{r}".encode() for r in range(n)]}
        for field, values in texts.items():
            data = np.array(values, dtype=f"S{max(64, max(map(len, values)))}")[:, None]  # (N, 1) fixed-length
            f.create_dataset(f"input_{field}", data=data[:-1] if field == drop_row_of else data)
        f.create_dataset("input_productID", data=np.array(rows, np.int32)[:, None])
        f.create_dataset("input_msrpUSD", data=np.full((n, 1), 120.0))
        f.create_dataset("index", data=np.arange(n, dtype=np.int64)[:, None])
        f.create_dataset("index_2", data=np.arange(n, dtype=np.int64))  # some files hold it as (N,)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashiongen_manual")
    for split in ("train", "validation"):
        write_real_schema(path / fashion_gen_h5.file_name(split))
    return path


def _products(builder, split="train"):
    return {int(e["product_id"]): e for e in builder.as_data_source(split)}


def test_builder_groups_rows_by_product_and_skips_bad_data(manual_dir, tmp_path):
    builder = build("fashion_gen", str(tmp_path), str(manual_dir))
    products = _products(builder)
    assert sorted(products) == [101, 102, 103, 105]  # 104: empty description
    # All views, in row order, lossless; product 101's rows are 0, 3 and 7.
    np.testing.assert_array_equal(products[101]["images"], np.stack([_image(0), _image(3), _image(7)]))
    assert [p.decode() for p in products[101]["poses"]] == ["id_gridfs_0", "id_gridfs_3", "id_gridfs_7"]
    np.testing.assert_array_equal(products[103]["images"], _image(8)[None])  # blank row 4 dropped
    assert products[101]["description"].decode() == "Crêpe de Chine blouse in ivory."
    assert products[101]["brand"].decode() == "Comme des Garçons"
    assert products[105]["description"].decode() == "Laine mÃ©rinos."  # latin-1, as the authors decode
    assert products[102]["msrp"] == pytest.approx(120.0)
    skipped = builder.info.metadata["skipped"]["train"]
    # Product 104 left out; one view (row 4) of product 103 dropped, the product kept.
    assert skipped["products"] == 1 and skipped["views"] == 1 and skipped["product_ids"] == ["104"]
    assert skipped["by_reason"] == {"empty description": 1, "blank image": 1}
    assert {(e["product"], e.get("view")) for e in skipped["examples"]} == {("103", "row 4"), ("104", None)}
    # The metadata is saved with the dataset.
    import tensorflow_datasets as tfds
    reloaded = tfds.builder("fashion_gen", data_dir=str(tmp_path))
    assert reloaded.info.metadata["skipped"]["validation"]["product_ids"] == ["104"]


def test_corrected_decoding(manual_dir, tmp_path):
    products = _products(build("fashion_gen/utf8", str(tmp_path), str(manual_dir)))
    assert products[105]["description"].decode() == "Laine mérinos."
    assert products[101]["description"].decode() == "Crêpe de Chine blouse in ivory."  # not UTF-8: latin-1


@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 1000])
def test_reading_does_not_depend_on_chunking(manual_dir, chunk_rows):
    path = manual_dir / fashion_gen_h5.file_name("train")
    products = list(fashion_gen_h5.read_products(path, chunk_rows=chunk_rows))
    assert sorted(p["product_id"] for p in products) == [101, 102, 103, 105]
    by_id = {p["product_id"]: p for p in products}
    np.testing.assert_array_equal(np.stack(by_id[101]["images"]), np.stack([_image(0), _image(3), _image(7)]))


def test_reading_is_streaming(tmp_path):
    """Peak memory follows the chunk, not the file (the training file is 13 GB)."""
    path = tmp_path / "big.h5"
    write_real_schema(path, rows=[1000 + i // 2 for i in range(96)], blank_row=None)  # 19 MB of images
    tracemalloc.start()
    count = sum(1 for _ in fashion_gen_h5.read_products(path, chunk_rows=4))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 48
    assert peak < 4e6, f"peak {peak / 1e6:.1f} MB while reading 19 MB of images in chunks of 4 rows"


def test_mismatched_lengths_are_named(tmp_path):
    path = tmp_path / "bad.h5"
    write_real_schema(path, drop_row_of="brand")
    with pytest.raises(ValueError, match=r"mismatched length: \{'input_brand': 8\}.*9 rows"):
        next(fashion_gen_h5.read_products(path))
    (tmp_path / "manual").mkdir()
    for split in ("train", "validation"):
        write_real_schema(tmp_path / "manual" / fashion_gen_h5.file_name(split), drop_row_of="brand")
    with pytest.raises(ValueError, match="input_brand"):
        build("fashion_gen", str(tmp_path / "data"), str(tmp_path / "manual"))


def test_missing_keys_are_named(tmp_path):
    path = tmp_path / "nokeys.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("input_image", data=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"missing keys.*input_productID"):
        next(fashion_gen_h5.read_products(path))


def test_missing_manual_file_names_it_where_it_goes_and_where_it_comes_from(manual_dir, tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / fashion_gen_h5.file_name("train")).symlink_to(manual_dir / fashion_gen_h5.file_name("train"))
    with pytest.raises(FileNotFoundError) as error:
        build("fashion_gen", str(tmp_path / "data"), str(tmp_path / "manual"))
    message = str(error.value)
    assert "fashiongen_256_256_validation.h5" in message and str(tmp_path / "manual") in message
    assert "fashion-gen.com" in message and "--manual-dir" in message
    # No manual directory at all: TFDS's own check, which quotes our instructions.
    with pytest.raises(AssertionError, match=r"fashiongen_256_256_train\.h5.*fashion-gen\.com"):
        build("fashion_gen", str(tmp_path / "data"), str(tmp_path / "nowhere"))
    assert "fashiongen_256_256_train.h5" in FashionGen.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_synth_fashion_exports_itself_as_fashiongen(tmp_path):
    config = SynthConfig(num_train=10, num_validation=4, seed=3)
    for split in ("train", "validation"):
        path = write_fashiongen_h5(config, tmp_path / "manual", split, chunk_products=3)
    with h5py.File(path) as f:  # the validation file: real schema, rows shuffled
        assert f["input_image"].shape == (12, 256, 256, 3) and f["input_description"].shape == (12, 1)
        ids = f["input_productID"][:, 0]
        assert any(ids[i] == ids[j] for i in range(12) for j in range(i + 2, 12))  # a product's rows apart
    builder = build("fashion_gen", str(tmp_path / "data"), str(tmp_path / "manual"))
    products = _products(builder, "validation")
    assert sorted(products) == list(range(10, 14))
    for index in range(4):
        record = product_record(config, "validation", index)
        got = products[record["product_id"]]
        for field in ("brand", "description", "subcategory", "composition", "season", "name"):
            assert got[field].decode() == record[field]
        views = render(config.replace(image_size=256), record)[0]
        for image, pose in zip(got["images"], got["poses"], strict=True):
            np.testing.assert_array_equal(image, views[int(pose.decode()[-1]) - 1])
    assert any("é" in p["brand"].decode() or "ö" in p["brand"].decode() or "è" in p["brand"].decode()
               for p in _products(builder, "train").values())  # accented brands went through latin-1


@pytest.mark.parametrize("fault", ["truncated", "not h5", "missing"])
def test_a_bad_validation_file_is_named_before_any_split_is_written(manual_dir, tmp_path, fault):
    """The validation file is checked with the training file, before the (on the real data,
    40-minute) training split is built."""
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(manual_dir / fashion_gen_h5.file_name("train"), manual)
    bad = manual / fashion_gen_h5.file_name("validation")
    if fault == "truncated":
        data = (manual_dir / bad.name).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif fault == "not h5":
        bad.write_text("<html>Access denied</html>")
    with pytest.raises(FileNotFoundError if fault == "missing" else ValueError) as error:
        build("fashion_gen", str(tmp_path / "data"), str(manual))
    assert str(bad) in str(error.value)
    if fault != "missing":
        assert "cannot be read as an h5 file" in str(error.value) and "Download it again" in str(error.value)
    assert not list((tmp_path / "data").rglob("*array_record*"))
