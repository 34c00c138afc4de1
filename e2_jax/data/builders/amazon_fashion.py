"""TFDS builder of AmazonFashion (the E² paper's set) from the authors' layout: one example per product.

The manual directory holds (E2_METHOD.md section 5):

    meta-fashion.json   {asin: {"images": ["<asin>_0.png", ...], "title": ..., "brand": ...}}
    split.json          {"train": [asin, ...], "test": [asin, ...]}
    Fashion/<asin>/<file>

`python -m e2_jax.data.amazon_prepare` makes this layout from Amazon's public review metadata.
Each example: `asin`, `title`, `brand`, and `images` (the product's files as they are, JPEG or
PNG; other formats are converted to PNG). Products missing from the metadata, with an empty
title or brand, or without a decodable image are skipped and listed in `metadata.json`; so are
missing and undecodable image files. The global text is `brand + ". " + title`; the one region
entity is the brand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from e2_jax.data.builders.images import checked_image
from e2_jax.data.builders.skipped import SkippedLog
from e2_jax.errors import DataError, MissingError

META, SPLIT, IMAGES = "meta-fashion.json", "split.json", "Fashion"
SPLITS = ("train", "test")
HOW_TO_GET = ("Make it with `python -m e2_jax.data.amazon_prepare --meta meta_AMAZON_FASHION.json.gz --out DIR` "
              "from the AMAZON_FASHION metadata of the Amazon Review Data (2018), "
              "https://nijianmo.github.io/amazon/ (or use the E² authors' copy of the layout)")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not readable JSON ({error}); write it again (python -m "
                        "e2_jax.data.amazon_prepare, docs/data.md)") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


class AmazonFashion(tfds.core.GeneratorBasedBuilder):
    """AmazonFashion: product photos with titles and brands, from Amazon review metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012 (TFDS reads class attributes)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"The manual directory holds {META}, {SPLIT} and {IMAGES}/. {HOW_TO_GET}."

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "asin": tfds.features.Text(),
            "title": tfds.features.Text(),
            "brand": tfds.features.Text(),
            # Stored as given (JPEG or PNG): shape and format vary from product to product.
            "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
        }
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                              metadata=tfds.core.MetadataDict(),
                                              homepage="https://nijianmo.github.io/amazon/")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = Path(dl_manager.manual_dir)
        for name in (META, SPLIT, IMAGES):
            if not (root / name).exists():
                raise MissingError(f"AmazonFashion: {root / name} not found. It belongs in the manual directory "
                                        f"({root}; set it with --manual-dir) next to {META}, {SPLIT} and "
                                        f"{IMAGES}/. {HOW_TO_GET}.")
        meta, split = _read_json(root / META), _read_json(root / SPLIT)
        missing = [s for s in SPLITS if s not in split]
        if missing:
            raise DataError(f"{root / SPLIT} has no {missing} list (it has {sorted(split)})")
        self._skipped = SkippedLog("amazon_fashion")
        return {s: self._generate_examples(root, meta, split[s], s) for s in SPLITS}

    def _generate_examples(self, root: Path, meta: dict, asins: list[str],
                           split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for asin in asins:
            example = self._example(root, meta, asin, split)
            if example is not None:
                yield asin, example
        self._skipped.finish(split, self.info.metadata)

    def _example(self, root: Path, meta: dict, asin: str, split: str) -> dict[str, Any] | None:
        """The product's example, or None (reported to the skipped log) if it has to be left out."""
        skip = lambda reason, view=None: self._skipped.add(split, asin, reason, view)
        item = meta.get(asin)
        if item is None:
            skip(f"not in {META}")
            return None
        title, brand = str(item.get("title") or "").strip(), str(item.get("brand") or "").strip()
        if not title or not brand:
            skip("empty " + " and ".join(n for n, t in (("title", title), ("brand", brand)) if not t))
            return None
        images = []
        for name in item.get("images", []):
            path = root / IMAGES / asin / name
            if not path.is_file():
                skip(f"missing image ({path.name})", view=path.name)
                continue
            try:
                images.append(checked_image(path.read_bytes()))
            except ValueError as error:
                skip(f"undecodable image ({path.name}: {error})", view=path.name)
        if not images:
            skip("no usable image")
            return None
        return {"asin": asin, "title": title, "brand": brand, "images": images}
