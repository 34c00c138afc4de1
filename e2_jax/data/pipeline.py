"""The input pipeline: a built TFDS dataset -> batches as global `jax.Array`s on the mesh.

Order. Training reads an endless stream of positions; position t of epoch e = t // N holds
example `permutation(seed, e)[t % N]`. The global batch of step s is positions
[s * B, (s + 1) * B): a pure function of (seed, s). So every example appears exactly once per
epoch (a batch may straddle two epochs; nothing is dropped), the same seed gives the same
batches, and resuming at step s needs no iterator state: the run sees the batches of an
uninterrupted one. The view of a product is drawn from (seed, position) too (E2_METHOD.md
section 4: a random view for training, the first view for evaluation).

Sharding. Each process reads only the rows of the global batch that its devices hold (worked
out from the batch sharding: on a TPU pod slice these are not one block, since the mesh follows
the chips' topology, not the hosts), in increasing order, then
`jax.make_array_from_process_local_data` lays them out over the mesh. Evaluation visits each
example exactly once across all processes: the last batch is padded with example 0 and the
output's `valid` mask marks the padding.

Per example (tf.data, parallel): the record is read by index from array_record (random
access), the chosen view's PNG/JPEG decoded, resized so its shorter side is `image_size`
(bicubic with antialiasing, rounded to uint8: PIL's `resize(BICUBIC)` as torchvision's
`Resize` does, to within one grey level), centre-cropped, CLIP-normalised; the global text is
formatted from the record's fields. Per batch: the global text and each group's tag are
tokenised (tags at the group's own context length; a tag seen before comes from a cache).

Output of each step: `images` float32 [B, S, S, 3], `text` int32 [B, context], `index` int32
[B] (the example's index in the split); for training with tags, `region_tokens` (a tuple of
int32 [rows, tokens], one per text-tower call) and `region_index` int32 [B, groups] (see
region_texts.py: each distinct tag once, trimmed, in at most two calls); for evaluation `valid`
bool [B] and `view` int32 [B]. The local (per-process) iterators give `tags` {group: int32
[rows, group context]}, one row per item.
"""

from __future__ import annotations

import functools
import string
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from e2_jax import distributed
from e2_jax.data import (
    builders,  # (importing it registers the project's builders with TFDS)
    region_texts,
)

# Defined without TensorFlow (the trainer's step builds without it: benchmarks/device.py).
from e2_jax.data.preprocessing import AMAZON_TEXT, FASHIONGEN_TEXT, MEAN, STD, Preprocessing  # noqa: F401
from e2_jax.data.tensorflow_cpu import tf
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.errors import ConfigError, DataError, MissingError, suggest
from e2_jax.sharding import host_array


class Source:
    """Random access to the raw records of one split of a built TFDS dataset (array_record)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None) -> None:
        builder = builders.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise MissingError(
                f"dataset {name} is not built in {builder.data_dir}. Build it with "
                f"`python -m e2_jax.data.build {name}" + (f" --data-dir {data_dir}" if data_dir else "")
                + "` (FashionGen and AmazonFashion also need --manual-dir; see docs/data.md).")
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise DataError(f"{builder.data_dir} was built as {builder.info.file_format.value}; the pipeline reads "
                             "examples by index and needs array_record: rebuild it with `python -m e2_jax.data.build`")
        if split not in builder.info.splits:
            raise ConfigError(f"dataset {name} has no split {split!r}{suggest(split, builder.info.splits)}; it has "
                              f"{list(builder.info.splits)}")
        self.name, self.split = name, split
        self.features = builder.info.features
        self.metadata = dict(builder.info.metadata or {})
        self._records = builder.as_data_source(split, deserialize_method=tfds.core.decode.DeserializeMethod.RAW_BYTES)

    def __len__(self) -> int:
        return len(self._records)

    def read(self, indices: Sequence[int]) -> list[bytes]:
        return self._records.__getitems__([int(i) for i in indices])

    def first_views(self, indices: Sequence[int], fields: Sequence[str] = ()) -> list[tuple[np.ndarray, dict]]:
        """Each example's first view (uint8 [H, W, 3]) and its text `fields`, read and decoded
        from the records: for pictures of a few products (reports, selection maps)."""
        features = self.features.tf_example_spec
        spec = {k: features[k] for k in ("images", *fields) if k in features}
        out = []
        for record in self.read(list(indices)):
            parsed = tf.io.parse_single_example(record, spec)
            image = tf.io.decode_image(parsed.pop("images")[0], channels=3, expand_animations=False).numpy()
            out.append((image, {k: v.numpy().decode("utf-8") if v.dtype == tf.string else str(v.numpy())
                                for k, v in parsed.items()}))
        return out

    def scan(self, fields: Sequence[str] = (), chunk: int = 1024) -> dict[str, np.ndarray]:
        """Every example's number of views (`views`, int64; 0 in a dataset without images) and the
        `fields` (text as str, integers as int64, floats as they are, a sequence as an object
        array of int64 arrays), read from the records without decoding any image."""
        spec = {k: tf.io.RaggedFeature(v.dtype) if k != "images" and isinstance(v, tf.io.FixedLenSequenceFeature)
                else v for k, v in self.features.tf_example_spec.items() if k in ("images", *fields)}
        missing = [f for f in fields if f not in spec]
        if missing:
            raise ConfigError(f"{self.name}: no field {missing}; it has {sorted(self.features.keys())}")

        @tf.function
        def parse(records):
            parsed = tf.io.parse_example(records, spec)
            if "images" not in parsed:  # a dataset of texts only (FashionIQ's triplets)
                return {"views": tf.zeros(tf.shape(records)[:1], tf.int64), **parsed}
            images = parsed.pop("images")
            views = images.row_lengths() if isinstance(images, tf.RaggedTensor) else tf.reduce_sum(
                tf.cast(tf.strings.length(images) > 0, tf.int64), axis=1)
            return {"views": views, **parsed}

        out: dict[str, list[np.ndarray]] = {"views": [], **{f: [] for f in fields}}
        for start in range(0, len(self), chunk):
            got = parse(tf.constant(self.read(range(start, min(start + chunk, len(self))))))
            for key, value in got.items():
                if isinstance(value, tf.RaggedTensor):
                    rows = np.empty(value.shape[0], object)
                    rows[:] = [np.asarray(r, np.int64) for r in value.numpy()]
                    out[key].append(rows)
                    continue
                value = value.numpy()
                out[key].append(np.array([v.decode("utf-8") for v in value], dtype=str) if value.dtype == object
                                else value if value.dtype.kind == "f" else value.astype(np.int64))
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64 if k == "views" else str) for k, v in out.items()}


# --- Which examples, in which order ---------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _mix(seed: int, positions: np.ndarray) -> np.ndarray:
    """A well-spread non-negative int64 per (seed, position): splitmix64's finaliser."""
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((z ^ (z >> np.uint64(31))) >> np.uint64(1)).astype(np.int64)


def train_indices(num_examples: int, global_batch: int, step: int, rows: Sequence[int],
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, view seeds) of `rows` of the global batch at `step`."""
    positions = step * global_batch + np.asarray(rows, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        indices[here] = _permutation(seed, int(epoch), num_examples)[offsets[here]]
    return indices, _mix(seed, positions)


def eval_steps(num_examples: int, global_batch: int) -> int:
    return -(-num_examples // global_batch)


def eval_indices(num_examples: int, global_batch: int, step: int,
                 rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(positions, valid) of `rows` of the global batch at `step`: positions 0, 1, ... in
    order, the last batch padded with position 0."""
    positions = step * global_batch + np.asarray(rows, dtype=np.int64)
    valid = positions < num_examples
    return np.where(valid, positions, 0), valid


def process_rows(sharding: jax.sharding.Sharding, global_batch: int, process: int | None = None) -> np.ndarray:
    """The rows of a [global_batch, ...] array that the devices of `process` (default: this
    one) hold, in increasing order: what `jax.make_array_from_process_local_data` expects that
    process to give, whatever the mesh's device order (on a TPU pod slice `jax.make_mesh`
    follows the torus, and a host's devices hold rows far apart)."""
    process = jax.process_index() if process is None else process
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        if device.process_index == process:
            rows.update(range(global_batch)[index[0]])
    if not rows:
        raise ValueError(f"process {process} holds no device of the batch sharding {sharding}")
    return np.array(sorted(rows), dtype=np.int64)


# --- Decoding and preprocessing -------------------------------------------------------------------


def resize_and_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [h, w, 3] -> uint8 [size, size, 3]: torchvision's Resize(size, BICUBIC) (shorter side
    to `size`, longer side truncated) on a PIL image, then CenterCrop(size)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = size * long // short
    new_h, new_w = tf.where(h <= w, size, new_long), tf.where(h <= w, new_long, size)

    def resize() -> tf.Tensor:
        resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bicubic", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    image = tf.cond((h == new_h) & (w == new_w), lambda: image, resize)
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
    return tf.ensure_shape(image[top : top + size, left : left + size], (size, size, 3))


def target_pad(image: tf.Tensor, ratio: float) -> tf.Tensor:
    """uint8 [h, w, 3] padded with black, evenly on both sides, towards a `ratio` of longer to
    shorter side, when its own is `ratio` or more (else unchanged): CIReVL's `TargetPad`
    (Baldrati et al. 2022; `src/data_utils.py`), to be followed by `resize_and_crop`. As there,
    each side gets int((max(h, w) / ratio - side) / 2) pixels, so a square needs a ratio of 1."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    scaled = tf.maximum(h, w) / ratio
    pad_w = tf.cast(tf.maximum(tf.math.floor((scaled - w) / 2), 0), tf.int32)
    pad_h = tf.cast(tf.maximum(tf.math.floor((scaled - h) / 2), 0), tf.int32)
    padded = tf.pad(image, tf.stack([tf.stack([pad_h, pad_h]), tf.stack([pad_w, pad_w]), [0, 0]]))
    return tf.cond(tf.maximum(h, w) / tf.minimum(h, w) < ratio, lambda: image, lambda: padded)


_SCALE = tuple(1 / (255 * s) for s in STD)
_OFFSET = tuple(-m / s for m, s in zip(MEAN, STD, strict=True))


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> (x / 255 - mean) / std, as one multiply-add (a third of the cost of four passes)."""
    return tf.cast(image, tf.float32) * _SCALE + _OFFSET


def _format_text(text_format: str, fields: dict[str, tf.Tensor]) -> tf.Tensor:
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(text_format):
        if spec or conversion:
            raise ConfigError(f"text format {text_format!r}: only plain {{field}} names are supported")
        if literal:
            parts.append(tf.constant(literal))
        if name:
            parts.append(fields[name])
    return tf.strings.join(parts)


class _Tokenize:
    """Batch texts -> ids, tags through a cache (they repeat: seasons, brands, sub-categories)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.tokenizer = CLIPTokenizer(pre.context_length)
        self.lengths = [length for _, _, length in pre.tags]
        self.cache: dict[tuple[bytes, int], np.ndarray] = {}

    def __call__(self, texts: np.ndarray, *tags: np.ndarray) -> list[np.ndarray]:
        out = [self.tokenizer([t.decode("utf-8") for t in texts])]
        for values, length in zip(tags, self.lengths, strict=True):
            new = [v for v in dict.fromkeys(values.tolist()) if (v, length) not in self.cache]
            if new:
                if len(self.cache) > 500_000:
                    self.cache.clear()
                ids = self.tokenizer([v.decode("utf-8") for v in new], context_length=length)
                self.cache.update({(v, length): row for v, row in zip(new, ids, strict=True)})
            out.append(np.stack([self.cache[(v, length)] for v in values.tolist()]))
        return out


def _dataset(source: Source, pre: Preprocessing, batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
             local_batch: int, train: bool, images: bool = True) -> tf.data.Dataset:
    """tf.data over `batches` of (indices, views, valid); an example's view is its `views`
    entry modulo its number of views (a random seed for training, the view for evaluation)."""
    fields = pre.fields()
    known = [k for k, f in source.features.items() if isinstance(f, tfds.features.Text)]
    unknown = [f for f in fields if f not in known]
    if unknown:
        raise ConfigError(f"{source.name}: no text field {unknown} for the text format / tags; it has {known}")
    empty = source.metadata.get("catalog", {}).get("empty", {}).get(source.split, {})
    blank = {f: empty[f] for f in fields if empty.get(f)}
    if blank:  # a catalog's --optional field, empty in some products, used as a text
        raise ConfigError(f"{source.name}/{source.split}: the text format or a tag uses {sorted(blank)}, empty in "
                          f"{blank} products (built as --optional); rebuild without --optional for them (products "
                          "with them empty are then left out, and named) or leave them out of the config")
    spec = {k: v for k, v in source.features.tf_example_spec.items() if k in ("images", *fields)}

    def generate():
        for indices, seeds, valid in batches:
            yield source.read(indices), indices, seeds, valid

    def decode(record, index, seed, valid):
        example = tf.io.parse_single_example(record, spec)
        out = {"text": _format_text(pre.text_format, example), "index": tf.cast(index, tf.int32), "valid": valid}
        if images:
            views = example["images"]
            image = tf.io.decode_image(views[seed % tf.cast(tf.size(views), tf.int64)], channels=3,
                                       expand_animations=False)
            if pre.pad_ratio:
                image = target_pad(image, pre.pad_ratio)
            out["images"] = normalize(resize_and_crop(image, pre.image_size))
            out["view"] = tf.cast(seed % tf.cast(tf.size(views), tf.int64), tf.int32)
        for group, field, _ in pre.tags:
            out[f"tag/{group}"] = example[field]
        return out

    tokenize = _Tokenize(pre)
    groups = [group for group, _, _ in pre.tags]

    def tokenize_batch(batch):
        ids = tf.numpy_function(tokenize, [batch.pop("text"), *(batch.pop(f"tag/{g}") for g in groups)],
                                [tf.int32] * (1 + len(groups)), stateful=False)
        batch["text"] = tf.ensure_shape(ids[0], (local_batch, pre.context_length))
        batch["tags"] = {g: tf.ensure_shape(x, (local_batch, length))
                         for g, x, (_, _, length) in zip(groups, ids[1:], pre.tags, strict=True)}
        if train:
            del batch["valid"], batch["view"]
        return batch

    signature = (tf.TensorSpec([local_batch], tf.string), tf.TensorSpec([local_batch], tf.int64),
                 tf.TensorSpec([local_batch], tf.int64), tf.TensorSpec([local_batch], tf.bool))
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).map(tokenize_batch).prefetch(2)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


# --- The iterators --------------------------------------------------------------------------------


class TrainBatches:
    """The endless NumPy iterator of `local_train_batches`, with `close()`.

    A tf.data iterator must not be dropped while its threads run Python (reading records,
    tokenising): its destructor waits for them holding the GIL they need, and the process
    hangs (seen on a preemption: the trainer stopped mid-stream). `close()` stops the
    stream at its source and drains what is in flight, so the iterator is idle when it goes;
    the trainer calls it when a stage ends for any reason."""

    def __init__(self, make_iterator, stop: threading.Event) -> None:
        self._iterator, self._stop = make_iterator(), stop

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def close(self) -> None:
        if self._iterator is None:
            return
        self._stop.set()
        for _ in self._iterator:  # a few batches already requested; each waits without the GIL
            pass
        self._iterator = None


def local_train_batches(source: Source, pre: Preprocessing, *, global_batch: int, rows: Sequence[int], seed: int = 0,
                        start_step: int = 0) -> TrainBatches:
    """NumPy batches of `rows` of each global training batch, from `start_step` on (endless
    until `close()`)."""
    if len(source) == 0:
        raise ValueError(f"{source.name}/{source.split} has no examples")
    stop = threading.Event()

    def batches():
        step = start_step
        while not stop.is_set():
            indices, seeds = train_indices(len(source), global_batch, step, rows, seed)
            yield indices, seeds, np.ones(len(rows), bool)
            step += 1

    return TrainBatches(lambda: _dataset(source, pre, batches(), len(rows), train=True).as_numpy_iterator(), stop)


def local_eval_batches(source: Source, pre: Preprocessing, *, global_batch: int, rows: Sequence[int],
                       items: np.ndarray | None = None, images: bool = True) -> Iterator[dict]:
    """NumPy batches of `rows` of each global evaluation batch: one pass over `items`
    ([M, 2] of (example index, view); default every example's first view) in order, the last
    batch padded with the first item and marked by `valid`. `images=False` reads texts only."""
    if items is None:
        items = np.stack([np.arange(len(source)), np.zeros(len(source), np.int64)], axis=1)
    items = np.asarray(items, np.int64).reshape(-1, 2)
    if len(items) == 0:
        raise ValueError(f"{source.name}/{source.split}: nothing to evaluate")

    def batches():
        for step in range(eval_steps(len(items), global_batch)):
            positions, valid = eval_indices(len(items), global_batch, step, rows)
            yield items[positions, 0], items[positions, 1], valid

    return _dataset(source, pre, batches(), len(rows), train=False, images=images).as_numpy_iterator()


def _global(batches: Iterator[dict], sharding: jax.sharding.Sharding, global_batch: int,
            local_batch: int) -> Iterator[dict]:
    """Each leaf's rows are this process's share of a global array `global_batch / local_batch`
    times as long (the batch, or one of the region-text calls)."""
    for batch in batches:
        yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            sharding, x, (x.shape[0] * global_batch // local_batch, *x.shape[1:])), batch)


_iterators = iter(range(1 << 62))  # names each training iterator's agreements (same order in every process)


def _pack_region_texts(batches: Iterator[dict], pre: Preprocessing, sharding: jax.sharding.Sharding,
                       global_batch: int, start_step: int) -> Iterator[dict]:
    """Replaces each batch's per-item `tags` by `region_tokens` and `region_index`
    (e2_jax.data.region_texts), with shapes every process agrees on."""
    rows = process_rows(sharding, global_batch)
    processes = global_batch // len(rows)
    shards = {index[0].indices(global_batch) for index in sharding.addressable_devices_indices_map(
        (global_batch,)).values()}  # this process's distinct blocks of rows
    packing = region_texts.Packing(pre.region_texts, len(rows), processes, len(shards))
    lengths = [length for _, _, length in pre.tags]
    name = f"region_texts/{next(_iterators)}"
    global_rows: dict[int, np.ndarray] = {}
    for step, batch in enumerate(batches, start_step):
        tags = [batch["tags"][group] for group, _, _ in pre.tags]
        needs = packing.needs(tags)
        if packing.agrees:
            needs = np.array(distributed.agree_max(f"{name}/{step}", needs))
            if step > start_step:
                distributed.forget(f"{name}/{step - 1}")
        shapes = packing.shapes(needs, lengths)
        for count, _ in shapes:
            if count not in global_rows:
                global_rows[count] = process_rows(sharding, processes * count)
        packed = packing.pack(tags, shapes, [global_rows[count] for count, _ in shapes])
        del batch["tags"]
        yield {**batch, "region_tokens": packed.tokens, "region_index": packed.index}


def train_batches(source: Source, pre: Preprocessing, *, global_batch: int, sharding: jax.sharding.Sharding,
                  seed: int = 0, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Global training batches laid out by `sharding` (over the batch dimension), from
    `start_step` on, endless: the batch of step s is the same whenever the run starts. With
    `pre.tags`, the tags come as `region_tokens` and `region_index` (region_texts.Packing)."""
    rows = process_rows(sharding, global_batch)
    if jax.process_count() > 1:
        blocks = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        logging.info("process %d reads rows %s of each global batch of %d", jax.process_index(),
                     ", ".join(f"{b[0]}-{b[-1]}" for b in blocks), global_batch)
    local = local_train_batches(source, pre, global_batch=global_batch, rows=rows, seed=seed, start_step=start_step)
    stream = _pack_region_texts(local, pre, sharding, global_batch, start_step) if pre.tags else local
    return _closing(_global(stream, sharding, global_batch, len(rows)), local)


def _closing(batches: Iterator[dict], local: TrainBatches) -> Iterator[dict]:
    try:
        yield from batches
    finally:  # the caller closed (or dropped) this generator: stop reading first (TrainBatches)
        local.close()


def every_view(views: np.ndarray) -> np.ndarray:
    """[M, 2] (example index, view) of every view of every example (`views`: each one's count),
    in order: the `items` of an evaluation pass over all images."""
    return np.concatenate([np.stack([np.full(v, i), np.arange(v)], axis=1) for i, v in enumerate(views)])


def table_views(scan: dict[str, np.ndarray], index: np.ndarray, view: np.ndarray) -> np.ndarray:
    """Each (example `index`, `view`)'s position in its product's image list as the dataset's
    source gave it: a catalog keeps it (`image_positions`, from `scan`), for a view left out
    before it shifts the stored ones; elsewhere a view's position is its index."""
    if "image_positions" not in scan:
        return np.asarray(view, np.int64)
    positions = scan["image_positions"]
    return np.array([positions[i][v] for i, v in zip(index, view, strict=True)], np.int64)


def eval_batches(source: Source, pre: Preprocessing, *, global_batch: int, sharding: jax.sharding.Sharding,
                 items: np.ndarray | None = None, images: bool = True) -> Iterator[dict[str, jax.Array]]:
    """One pass over the split (or over `items`, (example, view) pairs) in global batches,
    padded, with a `valid` mask."""
    rows = process_rows(sharding, global_batch)
    local = local_eval_batches(source, pre, global_batch=global_batch, rows=rows, items=items, images=images)
    return _global(local, sharding, global_batch, len(rows))


def embed_split(embed: Callable[[dict], dict[str, jax.Array]], batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Every output of `embed(batch)` ({name: [B, ...]}) for the valid rows of `eval_batches`,
    in the batches' order, on every process; plus the batches' `index` (and `view`)."""
    out: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        valid = host_array(batch["valid"])
        got = dict(embed(batch))
        got["index"] = batch["index"]
        if "view" in batch:
            got["view"] = batch["view"]
        for key, value in got.items():
            out.setdefault(key, []).append(host_array(value)[valid])
    return {k: np.concatenate(v) for k, v in out.items()}
