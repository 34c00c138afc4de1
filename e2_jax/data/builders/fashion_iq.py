"""TFDS builder of FashionIQ (Wu et al., CVPR 2021) from its released files, for composed retrieval.

The manual directory holds FashionIQ's layout (https://github.com/XiaoxiaoGuo/fashion-iq), as
CIReVL and CLIP4Cir read it:

    captions/cap.{dress,shirt,toptee}.{train,val,test}.json        [{"candidate": ASIN, "target": ASIN,
                                                                       "captions": [text, text]}, ...]
    image_splits/split.{dress,shirt,toptee}.{train,val,test}.json  [ASIN, ...]
    images/<ASIN>.png   (or .jpg / .jpeg)

Two configs, built from the same files:

- `fashion_iq/images`: one example per image of a split's image list (`product_id` the ASIN,
  `category`, `index` its position in the list, `images` with the one image): the retrieval
  gallery, readable by every e2_jax tool that reads a dataset (the input pipeline, `search
  index --dataset`).
- `fashion_iq/triplets`: one example per (reference, modification, target) triplet:
  `reference`, `target` (ASINs; empty on the test split, whose targets are not released),
  `category`, `index` (its position in the caption file), `caption_1`, `caption_2` (the two
  annotators' modification texts, as released: an empty one stays empty).

TFDS stores examples in an order of its own; `index` gives back the files' order (the gallery's
order breaks ties in ranking; `max_queries` takes a caption file's first triplets).

Splits: `val`, and `train` and `test` when their files are there; categories: those with a
`val` image list (the same layout with other categories builds too: SynthFashion-CIR). Left out, counted and named in
`metadata.json` (`skipped`): images whose file is missing or undecodable, and triplets whose
reference or target image is missing, or whose target is not in its category's image list of
the split (the protocol ranks that list). A missing caption or split file stops the build with
an error naming the file and where FashionIQ comes from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from e2_jax.data import synth_cir, synth_fashion
from e2_jax.data.builders.images import checked_image
from e2_jax.data.builders.skipped import SkippedLog
from e2_jax.errors import DataError, MissingError

CATEGORIES = ("dress", "shirt", "toptee")  # FashionIQ's; a layout's own are read from its files
SPLITS = ("train", "val", "test")
SUFFIXES = (".png", ".jpg", ".jpeg")
HOW_TO_GET = ("FashionIQ's captions and image splits are at https://github.com/XiaoxiaoGuo/fashion-iq; its images "
              "are downloaded from the product URLs listed there (most CIR codebases share a copy of the resized "
              "images). Put captions/, image_splits/ and images/ in one folder, the manual directory")


def caption_file(root: Path, category: str, split: str) -> Path:
    return root / "captions" / f"cap.{category}.{split}.json"


def split_file(root: Path, category: str, split: str) -> Path:
    return root / "image_splits" / f"split.{category}.{split}.json"


def categories_in(root: Path) -> list[str]:
    """The categories of a layout: those with a validation image list (FashionIQ's three; a
    SynthFashion-CIR layout has its own)."""
    found = sorted(p.name.split(".")[1] for p in (root / "image_splits").glob("split.*.val.json"))
    if not found:
        raise MissingError(f"FashionIQ: no image_splits/split.CATEGORY.val.json in {root} (set the manual directory "
                           f"with --manual-dir; FashionIQ's are {', '.join(CATEGORIES)}). {HOW_TO_GET}.")
    return found


def _read_list(path: Path) -> list:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not readable JSON ({error}); FashionIQ's files are JSON lists") from None
    if not isinstance(value, list):
        raise DataError(f"{path} holds a JSON {type(value).__name__}, not the list FashionIQ's files hold")
    return value


def image_path(root: Path, asin: str) -> Path | None:
    for suffix in SUFFIXES:
        path = root / "images" / f"{asin}{suffix}"
        if path.is_file():
            return path
    return None


class FashionIQ(tfds.core.GeneratorBasedBuilder):
    """FashionIQ: dress, shirt and top/tee images, and relative captions between pairs of them."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {  # noqa: RUF012 (TFDS reads class attributes)
        "1.0.0": "First version.",
        "1.1.0": "Captions as released (an empty first caption was dropped); `index`: each image's position in its "
                 "image list, each triplet's in its caption file."}
    BUILDER_CONFIGS = [  # noqa: RUF012
        tfds.core.BuilderConfig(name="images", description="The images of each split's image lists (galleries)."),
        tfds.core.BuilderConfig(name="triplets", description="Reference image, two modification captions, target."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"{HOW_TO_GET}."
    HOMEPAGE = "https://github.com/XiaoxiaoGuo/fashion-iq"

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config.name == "images":
            features = {"product_id": tfds.features.Text(), "category": tfds.features.Text(),
                        "index": tfds.features.Scalar(dtype=np.int32),
                        "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)))}
        else:
            features = {name: tfds.features.Text() for name in
                        ("reference", "target", "category", "caption_1", "caption_2")}
            features["index"] = tfds.features.Scalar(dtype=np.int32)
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                              metadata=tfds.core.MetadataDict(),
                                              homepage=self.HOMEPAGE)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        return self._splits_of(Path(dl_manager.manual_dir))

    def _splits_of(self, root: Path) -> dict[str, Iterator]:
        if not (root / "images").is_dir():
            raise MissingError(f"FashionIQ: no images/ folder in {root} (set the manual directory with --manual-dir). "
                               f"{HOW_TO_GET}.")
        categories = categories_in(root)
        splits = [s for s in SPLITS if any(split_file(root, c, s).is_file() for c in categories)]
        for split in splits:
            for category in categories:
                for path in (caption_file(root, category, split), split_file(root, category, split)):
                    if not path.is_file():
                        raise MissingError(f"FashionIQ: {path} not found; the manual directory ({root}) holds "
                                           "captions/cap.CATEGORY.SPLIT.json and image_splits/split.CATEGORY.SPLIT"
                                           f".json for {', '.join(categories)} and {', '.join(splits)}. {HOW_TO_GET}.")
        self._categories = categories
        self._skipped = SkippedLog(f"{self.name}/{self.builder_config.name}")
        return {split: self._generate_examples(root, split) for split in splits}

    def _generate_examples(self, root: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        make = self._images if self.builder_config.name == "images" else self._triplets
        yield from make(root, split)
        self._skipped.finish(split, self.info.metadata)

    def _images(self, root: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for category in self._categories:
            first: dict[str, int] = {}  # each ASIN once, at its first position in the list
            for position, asin in enumerate(map(str, _read_list(split_file(root, category, split)))):
                first.setdefault(asin, position)
            for asin, position in first.items():
                path = image_path(root, asin)
                if path is None:
                    self._skipped.add(split, asin, f"missing image (no {asin}{', '.join(SUFFIXES)} in "
                                                   f"{root / 'images'})")
                    continue
                try:
                    data = checked_image(path.read_bytes())
                except ValueError as error:
                    self._skipped.add(split, asin, f"undecodable image ({path.name}: {error})")
                    continue
                yield f"{category}/{asin}", {"product_id": asin, "category": category, "index": position,
                                             "images": [data]}

    def _triplets(self, root: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for category in self._categories:
            gallery = set(map(str, _read_list(split_file(root, category, split))))
            for number, triplet in enumerate(_read_list(caption_file(root, category, split))):
                name = f"{category}/{number}"
                reference, target = str(triplet.get("candidate", "")), str(triplet.get("target", "") or "")
                captions = [str(c) for c in triplet.get("captions", [])]
                if not reference or not "".join(captions).strip() or (split != "test" and not target):
                    self._skipped.add(split, name, "incomplete triplet (needs candidate, target and captions)")
                    continue
                if image_path(root, reference) is None:
                    self._skipped.add(split, name, f"missing reference image ({reference})")
                    continue
                if target and image_path(root, target) is None:
                    self._skipped.add(split, name, f"missing target image ({target})")
                    continue
                if target and target not in gallery:
                    self._skipped.add(split, name, f"target not in the image list ({target})")
                    continue
                yield name, {"reference": reference, "target": target, "category": category, "index": number,
                             "caption_1": captions[0], "caption_2": captions[1] if len(captions) > 1 else ""}


class SynthFashionCir(FashionIQ):
    """SynthFashion-CIR (`e2_jax.data.synth_cir`): triplets made from SynthFashion/medium's
    validation products, written in FashionIQ's layout (under the download folder) and read by
    FashionIQ's code. No download."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "600 triplets of synth_fashion/medium 2.0.0's validation products.",  # noqa: RUF012
                     "1.1.0": "FashionIQ's builder 1.1.0: `index` in files' order, captions as written."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = None
    HOMEPAGE = ""  # (FashionIQ's page is not this dataset's)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = Path(dl_manager.download_dir) / "synth_fashion_cir" / str(self.version)
        if not (root / "complete").is_file():
            synth_cir.write_layout(root, synth_fashion.VARIANTS[synth_cir.VARIANT][1], synth_cir.TRIPLETS)
            (root / "complete").write_text("")
        return self._splits_of(root)
