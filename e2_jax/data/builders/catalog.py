"""TFDS builder of a product catalog (your own table, `e2_jax.data.catalog`): one example per product.

    python -m e2_jax.data.build catalog/mystore --manual-dir ~/data/mystore   # the table's folder

Each example: `product_id`, `images` (the product's files as they are, JPEG or PNG; other
formats converted to PNG) and one text field per other column of the table. A catalog's name
is its builder config (`catalog/mystore`), made from the table by `for_table`; once built it is
read like any TFDS dataset from its files (`tfds.builder("catalog/mystore", data_dir=...)`),
without the table. Left out, counted and named in `metadata.json` (`skipped`): rows without an
id, products whose rows disagree (one id, different texts or splits), products with an empty
text column (other than `--optional` ones), missing and undecodable image files, relative image
paths that leave the table's folder (unless built with `--outside-images`), and products
left without an image. `metadata.json` also keeps how the table was read (`catalog`): columns
and their fields, the optional fields and how many products of each split have them empty, and
where the splits came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from e2_jax.data import catalog, tensorflow_cpu
from e2_jax.data.builders.images import checked_image
from e2_jax.data.builders.skipped import SkippedLog
from e2_jax.data.catalog import TableOptions
from e2_jax.errors import DataError


class CatalogConfig(tfds.core.BuilderConfig):
    def __init__(self, *, table: str = "", options: TableOptions | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table = table
        self.options = options or TableOptions()


def for_table(name: str, manual_dir: str | Path, options: TableOptions | None = None,
              data_dir: str | None = None, **kwargs: Any) -> Catalog:
    """The builder of catalog `name` from the table in `manual_dir`."""
    table = catalog.find_table(manual_dir)
    tensorflow_cpu.load()  # before TFDS starts TensorFlow, which must not see GPUs
    config = CatalogConfig(name=name, table=str(table), options=options, description=f"Products of {table}.")
    return Catalog(config=config, data_dir=data_dir, **kwargs)


class Catalog(tfds.core.GeneratorBasedBuilder):
    """Your own products: images and text columns from a JSONL, CSV or Parquet table."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {  # noqa: RUF012 (TFDS reads class attributes)
        "1.0.0": "First version.",
        "1.1.0": "Relative image paths that leave the table's folder are refused unless --outside-images; text "
                 "cells of bytes have their whitespace collapsed as other text cells do.",
        "1.2.0": "image_positions: each kept image's position in the product's image list, so that a view is named "
                 "by its place in the table even where an earlier image was left out.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (f"The manual directory holds the product table ({', '.join(catalog.TABLES)}) and "
                                    "the images it names; see docs/catalog.md.")

    def _info(self) -> tfds.core.DatasetInfo:
        config: CatalogConfig = self.builder_config
        if not config.table:
            raise DataError(f"catalog {config.name!r}: a catalog is built from its table: "
                            f"python -m e2_jax.data.build catalog/{config.name} --manual-dir DIR (docs/catalog.md)")
        path = Path(config.table)
        fields = self._fields(path)
        features = {
            "product_id": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
            # each kept image's position in the product's image list (its rows' cells in table order)
            "image_positions": tfds.features.Sequence(np.int32),
            **{field: tfds.features.Text() for field in fields.values()},
        }
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                              metadata=tfds.core.MetadataDict())

    def _fields(self, path: Path) -> dict[str, str]:
        if not hasattr(self, "_plan"):
            self._plan = catalog.plan(path, self.builder_config.options)
        return self._plan.fields

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # the table's path is in the config
        plan = self._plan
        options = plan.options
        self._skipped = SkippedLog(f"catalog/{self.builder_config.name}")
        self._empty: dict[str, dict[str, int]] = {}
        self.info.metadata["catalog"] = {
            "table": str(plan.path), "id_column": options.id_column, "image_column": options.image_column,
            "fields": plan.fields, "optional": list(options.optional),
            "splits_from": f"column {options.split_column!r}" if plan.has_split_column
            else f"sha256 of the id: {dict(options.fractions)}",
            "empty": self._empty,
        }
        splits = plan.splits
        if not plan.products:
            raise DataError(f"catalog: {plan.path} has no row with a product id (column {options.id_column!r})")
        for number in plan.no_id:
            self._skipped.add(splits[0], f"row {number + 1}", f"no id (data row {number + 1})")
        return {split: self._generate_examples(plan, split) for split in splits}

    def _generate_examples(self, plan: catalog.Plan, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        options, root = plan.options, plan.path.parent
        wanted = {}
        for product_id, product in plan.products.items():
            if product.split != split:
                continue
            if product.conflict:
                self._skipped.add(split, product_id, product.conflict)
            else:
                wanted[product_id] = product.rows[-1]
        required = plan.required()
        empty = self._empty.setdefault(split, dict.fromkeys(options.optional, 0))
        pending: dict[str, list[tuple[str, str | bytes]]] = {}
        kept = 0
        for number, row in enumerate(catalog.rows(plan.path)):
            product_id = catalog.text(row.get(options.id_column))
            if product_id not in wanted:
                continue
            refs = pending.setdefault(product_id, [])
            try:
                refs.extend((f"row {number + 1}", ref) for ref in catalog.image_refs(row.get(options.image_column)))
            except DataError as error:
                self._skipped.add(split, product_id, f"unreadable image cell ({error})", view=f"row {number + 1}")
            if number != wanted[product_id]:
                continue
            del pending[product_id]
            texts = {field: catalog.text(row.get(column)) for column, field in plan.fields.items()}
            blank = [field for field in required if not texts[field]]
            if blank:
                self._skipped.add(split, product_id, f"empty {', '.join(blank)}")
                continue
            images, positions, problems = self._images(root, refs, options.outside)
            if not images:
                why = "; ".join(why for _, why in problems) or "none named"
                self._skipped.add(split, product_id, f"no usable image ({why})")
                continue
            for view, problem in problems:
                self._skipped.add(split, product_id, problem, view=view)
            for field in options.optional:
                empty[field] += not texts[field]
            kept += 1
            yield product_id, {"product_id": product_id, "images": images, "image_positions": positions, **texts}
        self._skipped.finish(split, self.info.metadata)
        if not kept:  # (TFDS cannot write an empty split)
            raise DataError(f"catalog: no usable product in split {split!r} of {plan.path}: each of its rows was "
                            f"left out ({self._skipped.summary(split)['by_reason']}); see docs/catalog.md for what a "
                            "row needs")

    def _images(self, root: Path, refs: list[tuple[str, str | bytes]],
                outside: bool) -> tuple[list[bytes], list[int], list[tuple[str, str]]]:
        """The product's decodable images, their positions in `refs`, and (view, why) for each
        missing or undecodable one."""
        out, positions, problems = [], [], []
        for k, (where, ref) in enumerate(refs):
            if isinstance(ref, bytes):
                name, data = f"image {k} (bytes, {where})", ref
            else:
                path = Path(ref) if Path(ref).is_absolute() else root / ref
                name = ref
                if not outside and not Path(ref).is_absolute() and Path(os.path.normpath(ref)).parts[:1] == ("..",):
                    problems.append((name, f"outside the table's folder ({ref}: build with --outside-images to "
                                           "read it)"))
                    continue
                if not path.is_file():
                    problems.append((name, f"missing image ({ref})"))
                    continue
                data = path.read_bytes()
            try:
                out.append(checked_image(data))
                positions.append(k)
            except ValueError as error:
                problems.append((name, f"undecodable image ({name}: {error})"))
        return out, positions, problems
