"""TFDS builder of SynthFashion (see `e2_jax.data.synth_fashion`): one example per product.

    python -m e2_jax.data.build synth_fashion/small --data-dir DIR   # as the pipeline reads it

Configs (`synth_fashion.VARIANTS`): `default` (128 px, 10,000 training and 1,000 validation
products), `medium` (64 px, 4,096 + 1,024, the study's), `small` (64 px, 1,024 + 256, for CPU
runs) and `tiny` (32 px, 64 + 16, for tests). A custom one:
`SynthFashion(config=SynthFashionConfig(name="mine", synth=SynthConfig(...)))`.
Rendering runs in a process pool (`E2_SYNTH_WORKERS`, default: all cores).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from e2_jax.data import synth_fashion
from e2_jax.data.builders.images import png
from e2_jax.data.synth_fashion import SynthConfig

TEXT_FIELDS = ("name", "description", "caption", "brand", "category", "subcategory", "composition",
               "season", "gender")
LABEL_FIELDS = ("subcategory_id", "colour_id", "brand_id", "composition_id", "season_id")


class SynthFashionConfig(tfds.core.BuilderConfig):
    def __init__(self, *, synth: SynthConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.synth = synth


def _render(args: tuple[SynthConfig, str, int]) -> tuple[int, dict[str, Any]]:
    config, split, index = args
    example = synth_fashion.product(config, split, index)
    # Encoded here, in the worker processes, rather than by TFDS in the main one (images.py).
    return example["product_id"], {**example, "images": [png(view) for view in example["images"]]}


class SynthFashion(tfds.core.GeneratorBasedBuilder):
    """Procedural fashion products: silhouettes and colours shared, details that differ."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {  # noqa: RUF012 (TFDS reads class attributes)
        "1.0.0": "First version.",
        "2.0.0": "Details readable by construction (anti-aliased, the care label's stripes of one thickness, "
                 "`tiny`'s details 0.25 of the side) and `detail_boxes`, where each view shows each detail.",
    }
    BUILDER_CONFIGS = [  # noqa: RUF012
        SynthFashionConfig(name=name, description=description, synth=synth)
        for name, (description, synth) in synth_fashion.VARIANTS.items()
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.synth.image_size
        features = {
            "product_id": tfds.features.Scalar(dtype=np.int64),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(size, size, 3), encoding_format="png")),
            **{field: tfds.features.Text() for field in TEXT_FIELDS},
            **{field: tfds.features.Scalar(dtype=np.int64) for field in LABEL_FIELDS},
            # [views, details, 4]: synth_fashion.render's boxes (DETAILS order), -1 where absent
            synth_fashion.DETAIL_BOXES: tfds.features.Tensor(
                shape=(self.builder_config.synth.views, len(synth_fashion.DETAILS), 4), dtype=np.float32),
        }
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                              supervised_keys=None)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config.synth
        jobs = [(config, split, i) for i in range(synth_fashion.num_products(config, split))]
        workers = int(os.environ.get("E2_SYNTH_WORKERS", os.cpu_count() or 1))
        if workers <= 1:
            yield from map(_render, jobs)
            return
        # "spawn": the builder may run in a process that has already started JAX's threads.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap(_render, jobs, chunksize=64)
