"""TFDS builder of FashionGen from its official h5 files: one example per product.

    import e2_jax.data.builders  # registers fashion_gen, amazon_fashion, synth_fashion
    builder = tfds.builder("fashion_gen", data_dir=..., file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))

or `python -m e2_jax.data.build fashion_gen --manual-dir DIR`. The manual directory holds
`fashiongen_256_256_train.h5` and `fashiongen_256_256_validation.h5` (see docs/data.md for
where they come from). Each example: `images` (every view of the product, in row order, PNG:
lossless), `poses`, `msrp`, and the text fields of the product's first row. Configs:
`default` decodes text as latin-1, as the authors do; `utf8` decodes UTF-8 where the bytes
are valid UTF-8 (see `e2_jax.data.fashion_gen_h5.decode_text`). Products with an empty
description and blank images are skipped and listed in `metadata.json` (see `skipped.py`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from e2_jax.data import fashion_gen_h5
from e2_jax.data.builders.images import png
from e2_jax.data.builders.skipped import SkippedLog
from e2_jax.errors import MissingError

SOURCE = ("FashionGen (Rostamzadeh et al., 2018): request access at https://fashion-gen.com/ (the files "
          "are also distributed through the FashionBERT / Kaleido-BERT dataset pages)")
SPLITS = ("train", "validation")
TEXT_FIELDS = tuple(t for t in fashion_gen_h5.TEXT_FIELDS if t != "pose")


class FashionGenConfig(tfds.core.BuilderConfig):
    def __init__(self, *, encoding: str = "latin-1", required: tuple[str, ...] = ("description",),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if encoding not in fashion_gen_h5.TEXT_ENCODINGS:
            raise ValueError(f"encoding must be one of {fashion_gen_h5.TEXT_ENCODINGS}, got {encoding!r}")
        self.encoding, self.required = encoding, required


def missing_file_message(path: Path, split: str) -> str:
    return (f"FashionGen {split} file not found: {path}. Place {path.name} in the manual directory "
            f"({path.parent}; set it with --manual-dir). Where it comes from: {SOURCE}.")


class FashionGen(tfds.core.GeneratorBasedBuilder):
    """FashionGen: about 60K training and 8K validation products, 1-6 views each, 256 px."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012 (TFDS reads class attributes)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {', '.join(fashion_gen_h5.file_name(s) for s in SPLITS)} in the manual directory. {SOURCE}.")
    BUILDER_CONFIGS = [  # noqa: RUF012
        FashionGenConfig(name="default", description="texts decoded latin-1, as the authors do"),
        FashionGenConfig(name="utf8", encoding="utf-8", description="texts decoded UTF-8 where valid, else latin-1"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "product_id": tfds.features.Scalar(dtype=np.int64),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="png")),
            "poses": tfds.features.Sequence(tfds.features.Text()),
            "msrp": tfds.features.Scalar(dtype=np.float32),
            **{field: tfds.features.Text() for field in TEXT_FIELDS},
        }
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                              metadata=tfds.core.MetadataDict(),
                                              homepage="https://fashion-gen.com/")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        manual = Path(dl_manager.manual_dir)
        paths = {split: manual / fashion_gen_h5.file_name(split) for split in SPLITS}
        for split, path in paths.items():
            if not path.is_file():
                raise MissingError(missing_file_message(path, split))
        for path in paths.values():  # every file whole and FashionGen's before any split is written
            with fashion_gen_h5.open_file(path) as f:
                fashion_gen_h5.check_file(f)
        self._skipped = SkippedLog("fashion_gen")
        return {split: self._generate_examples(path, split) for split, path in paths.items()}

    def _generate_examples(self, path: Path, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        products = fashion_gen_h5.read_products(path, encoding=config.encoding, required=config.required,
                                                skipped=self._skipped, split=split)
        for product in _encoded(products, workers=os.cpu_count() or 1):
            yield product["product_id"], product
        self._skipped.finish(split, self.info.metadata)


def _encoded(products: Iterator[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    """Products with their images as PNG bytes, encoded by a thread pool (PIL releases the GIL
    while it compresses), in order, with at most 2 * workers products in flight."""
    encode = lambda product: {**product, "images": [png(image) for image in product["images"]]}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for product in products:
            pending.append(pool.submit(encode, product))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
