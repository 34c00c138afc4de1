"""The input pipeline on one device: preprocessing against torchvision, order, content, exact
resume, evaluation padding, and the errors a user meets."""

import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from e2_jax.data import pipeline as pl
from e2_jax.data import synth_fashion
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.sharding import batch_sharding
from tests.test_region_texts import unpack

TAGS = (("subcategory", "subcategory", 8), ("brand", "brand", 8), ("description", "description", 77))
PRE = pl.Preprocessing(image_size=24, tags=TAGS)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes, hard edges and noise: what resizing gets wrong shows up."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    image = np.stack([np.sin(9 * x + 4 * y), np.cos(6 * y), (x > 0.4) * 1.0], -1) * 0.4 + 0.5
    return (np.clip(image + 0.05 * rng.standard_normal((h, w, 3)), 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize(("shape", "size"), [((256, 256), 224), ((300, 200), 224), ((200, 330), 160),
                                             ((64, 64), 224), ((33, 47), 32)])
def test_resize_and_crop_is_torchvisions(shape, size):
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image: the authors' transform."""
    from PIL import Image
    from torchvision import transforms

    image = _photo(*shape)
    reference = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(size)])
    want = np.asarray(reference(Image.fromarray(image))).astype(int)
    got = pl.resize_and_crop(tf.constant(image), size).numpy().astype(int)
    assert got.shape == want.shape == (size, size, 3)
    diff = np.abs(got - want)
    assert diff.mean() < 0.5 and diff.max() <= 5, (diff.mean(), diff.max())


def test_an_image_at_the_right_size_is_left_alone():
    image = _photo(32, 32)
    np.testing.assert_array_equal(pl.resize_and_crop(tf.constant(image), 32).numpy(), image)


def test_normalisation_is_clips():
    pixel = tf.constant([[[0, 128, 255]]], tf.uint8)
    want = (np.array([0, 128, 255]) / 255 - np.array(pl.MEAN)) / np.array(pl.STD)
    np.testing.assert_allclose(pl.normalize(pixel).numpy()[0, 0], want, rtol=1e-6)


@pytest.mark.parametrize(("n", "batch"), [(12, 4), (10, 4), (7, 16)])
def test_every_example_once_per_epoch(n, batch):
    steps = 4 * n // batch + 1
    stream = np.concatenate([pl.train_indices(n, batch, s, range(batch), seed=3)[0] for s in range(steps)])
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # reshuffled each epoch
    again = np.concatenate([pl.train_indices(n, batch, s, range(batch), seed=3)[0] for s in range(steps)])
    other = np.concatenate([pl.train_indices(n, batch, s, range(batch), seed=4)[0] for s in range(steps)])
    np.testing.assert_array_equal(stream, again)
    assert not np.array_equal(stream, other)


def test_process_rows_split_the_batch():
    rows = [pl.train_indices(20, 8, 5, range(a, b), seed=0)[0] for a, b in ((0, 4), (4, 8))]
    np.testing.assert_array_equal(np.concatenate(rows), pl.train_indices(20, 8, 5, range(8), seed=0)[0])


def _records(source: pl.Source) -> list[dict]:
    features = source.features
    return [features.deserialize_example_np(r) for r in source.read(range(len(source)))]


def _text(record: dict, field: str) -> str:
    return record[field].decode()


def test_batches_hold_the_right_images_and_texts(synth_tiny):
    source = pl.Source("synth_fashion/tiny", "train", synth_tiny)
    records = _records(source)
    tokenizer = CLIPTokenizer()
    batches = pl.local_train_batches(source, PRE, global_batch=16, rows=range(16), seed=0)
    views_used = []
    for batch in itertools.islice(batches, 2):
        assert batch["images"].shape == (16, 24, 24, 3) and batch["images"].dtype == np.float32
        for row, index in enumerate(batch["index"]):
            record = records[index]
            text = pl.FASHIONGEN_TEXT.format(**{k: _text(record, k) for k in PRE.fields()})
            np.testing.assert_array_equal(batch["text"][row], tokenizer(text)[0])
            for group, field, length in TAGS:
                np.testing.assert_array_equal(batch["tags"][group][row],
                                              tokenizer(_text(record, field), context_length=length)[0])
            candidates = [pl.normalize(pl.resize_and_crop(tf.constant(v), 24)).numpy() for v in record["images"]]
            matches = [v for v, c in enumerate(candidates) if np.allclose(batch["images"][row], c, atol=1e-6)]
            assert matches, f"row {row}: the image is none of product {index}'s views"
            views_used.append(matches[0])
    assert set(views_used) == {0, 1, 2}  # a random view per product


def test_resuming_at_step_s_gives_the_uninterrupted_batches(synth_tiny):
    source = pl.Source("synth_fashion/tiny", "train", synth_tiny)
    whole = list(itertools.islice(pl.local_train_batches(source, PRE, global_batch=12, rows=range(12), seed=7), 9))
    resumed = list(itertools.islice(pl.local_train_batches(source, PRE, global_batch=12, rows=range(12), seed=7,
                                                           start_step=6), 3))
    for a, b in zip(whole[6:], resumed, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    other = next(pl.local_train_batches(source, PRE, global_batch=12, rows=range(12), seed=8))
    assert not np.array_equal(other["index"], whole[0]["index"])


def test_evaluation_sees_each_example_once_with_first_views(synth_tiny):
    source = pl.Source("synth_fashion/tiny", "validation", synth_tiny)
    records = _records(source)
    batches = list(pl.local_eval_batches(source, PRE, global_batch=6, rows=range(6)))
    assert len(batches) == 3  # 16 examples: 6 + 6 + 4 and 2 padding rows
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 16 and not valid[-2:].any()
    assert sorted(index[valid]) == list(range(16))
    for row in range(6):
        first_view = pl.normalize(pl.resize_and_crop(tf.constant(records[batches[0]["index"][row]]["images"][0]), 24))
        np.testing.assert_allclose(batches[0]["images"][row], first_view.numpy(), atol=1e-6)


def test_global_arrays_on_one_device(synth_tiny):
    source = pl.Source("synth_fashion/tiny", "train", synth_tiny)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = batch_sharding(mesh, ("data",))
    batch = next(pl.train_batches(source, PRE, global_batch=8, sharding=sharding))
    assert isinstance(batch["images"], jax.Array) and batch["images"].sharding == sharding
    local = next(pl.local_train_batches(source, PRE, global_batch=8, rows=range(8)))
    np.testing.assert_array_equal(np.asarray(batch["text"]), local["text"])
    # The tags come packed (e2_jax.data.region_texts): each item's tag is its row of the calls.
    assert "tags" not in batch and batch["region_index"].shape == (8, len(TAGS))
    for g, (group, _, length) in enumerate(TAGS):
        np.testing.assert_array_equal(unpack(batch["region_tokens"], batch["region_index"], g, length),
                                      local["tags"][group])
    with pytest.raises(ValueError, match="none of the batch axes"):
        batch_sharding(mesh, ("fsdp",))


@pytest.mark.slow
def test_errors_name_the_problem(synth_tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not built in .*python -m e2_jax.data.build synth_fashion/small"):
        pl.Source("synth_fashion/small", "train", str(tmp_path))
    with pytest.raises(ValueError, match="no split 'test'"):
        pl.Source("synth_fashion/tiny", "test", synth_tiny)
    source = pl.Source("synth_fashion/tiny", "train", synth_tiny)
    with pytest.raises(ValueError, match=r"no text field \['title'\].*'brand'"):
        pl.local_train_batches(source, pl.Preprocessing(text_format=pl.AMAZON_TEXT), global_batch=4, rows=range(4))
    builder = tfds.builder("synth_fashion/tiny", data_dir=str(tmp_path), file_format="tfrecord")
    builder.download_and_prepare()
    with pytest.raises(ValueError, match="array_record"):
        pl.Source("synth_fashion/tiny", "train", str(tmp_path))


def test_synth_records_reach_the_pipeline_unchanged(synth_tiny):
    """The built dataset holds what the generator made (the builder's own contract)."""
    source = pl.Source("synth_fashion/tiny", "validation", synth_tiny)
    record = next(r for r in _records(source) if int(r["product_id"]) == 64)
    want = synth_fashion.product(synth_fashion.VARIANTS["tiny"][1], "validation", 0)
    np.testing.assert_array_equal(record["images"], want["images"])
    np.testing.assert_array_equal(record["detail_boxes"], want["detail_boxes"])
    assert record["brand"].decode() == want["brand"]
