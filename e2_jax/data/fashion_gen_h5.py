"""The FashionGen h5 format (E2_METHOD.md section 5): read it product by product, and write it.

One row per image. `input_image` is uint8 [N, 256, 256, 3]; the text fields are fixed-length
byte strings of shape [N, 1], which the authors decode as latin-1; `input_productID`,
`input_msrpUSD`, `index` and `index_2` are numbers of shape [N, 1] (or [N]). The rows of a
product are not assumed contiguous: `read_products` groups them by product id.

Reading is streaming: rows come in chunks of `chunk_rows` (the 13 GB training file is never
loaded whole); a product is emitted once its last row has been read, its earlier rows being
taken from the current chunk or, when they lie before it, read directly. Memory stays at one
chunk plus one product, however the rows are ordered.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from e2_jax.errors import DataError

if TYPE_CHECKING:
    from e2_jax.data.builders.skipped import SkippedLog

# Text fields of a FashionGen row (h5 key: "input_" + name).
TEXT_FIELDS = ("name", "description", "concat_description", "brand", "category", "subcategory",
               "composition", "season", "gender", "department", "pose")
NUMBER_KEYS = ("input_productID", "input_msrpUSD", "index", "index_2")
IMAGE_KEY = "input_image"
KEYS = (IMAGE_KEY, *(f"input_{f}" for f in TEXT_FIELDS), *NUMBER_KEYS)
# Text decodings: the authors' latin-1, or UTF-8 where the bytes are valid UTF-8 (which
# repairs text stored as UTF-8, "CrÃªpe" -> "Crêpe") and latin-1 elsewhere.
TEXT_ENCODINGS = ("latin-1", "utf-8")


def file_name(split: str, size: int = 256) -> str:
    return f"fashiongen_{size}_{size}_{split}.h5"


def decode_text(raw: bytes, encoding: str = "latin-1") -> str:
    if encoding == "latin-1":
        return raw.decode("latin-1")
    if encoding == "utf-8":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    raise ValueError(f"text encoding must be one of {TEXT_ENCODINGS}, got {encoding!r}")


def open_file(path: str | os.PathLike) -> h5py.File:
    """`path` opened for reading, or a DataError naming it (a truncated download, another format)."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        reason = str(error).split("(", 1)[-1].rstrip(")") if "(" in str(error) else str(error)
        raise DataError(f"{path} cannot be read as an h5 file ({reason}): a truncated download, or not a "
                        "FashionGen file. Download it again (docs/data.md).") from None


def check_file(f: h5py.File) -> int:
    """Raises if `f` is not a FashionGen file (naming the missing keys, the keys of mismatched
    length, or a wrongly shaped image array); returns the number of rows."""
    missing = [k for k in KEYS if k not in f]
    if missing:
        raise DataError(f"{f.filename}: not a FashionGen h5 file: missing keys {missing} "
                         f"(it has {sorted(f.keys())})")
    lengths = {k: f[k].shape[0] for k in KEYS}
    if len(set(lengths.values())) > 1:
        common = max(set(lengths.values()), key=list(lengths.values()).count)
        odd = {k: n for k, n in lengths.items() if n != common}
        raise DataError(f"{f.filename}: fields of mismatched length: {odd} (the other fields have {common} rows)")
    image = f[IMAGE_KEY]
    if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise DataError(f"{f.filename}: {IMAGE_KEY} must be uint8 [N, H, W, 3], got {image.dtype} {image.shape}")
    for key in (*(f"input_{t}" for t in TEXT_FIELDS), *NUMBER_KEYS):
        if f[key].ndim not in (1, 2) or f[key].size != lengths[key]:
            raise DataError(f"{f.filename}: {key} must have shape [N, 1] or [N], got {f[key].shape}")
    return lengths[IMAGE_KEY]


def _column(values: np.ndarray) -> np.ndarray:
    return values.reshape(len(values))


def _read(f: h5py.File, rows: np.ndarray) -> dict[str, np.ndarray]:
    """All keys at `rows` (increasing) as 1-D columns (images stay [n, H, W, 3])."""
    return {k: (f[k][rows] if k == IMAGE_KEY else _column(f[k][rows])) for k in KEYS}


def _product_groups(ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each product, increasing, ordered by the product's last row."""
    order = np.argsort(ids, kind="stable")
    boundaries = np.flatnonzero(ids[order][1:] != ids[order][:-1]) + 1
    groups = np.split(order, boundaries)
    return sorted(groups, key=lambda rows: rows[-1])


def read_products(path: str | os.PathLike, *, encoding: str = "latin-1", chunk_rows: int = 256,
                  required: Iterable[str] = ("description",), skipped: SkippedLog | None = None,
                  split: str = "") -> Iterator[dict[str, Any]]:
    """One dict per product: `product_id`, `images` (its rows' images, in row order), `poses`,
    `msrp`, and the text fields of its first row. Products whose first row has an empty
    required field are skipped; so are blank images (every pixel the same: a failed capture);
    both are reported to `skipped` (a `SkippedLog`) with the product id."""
    required = tuple(required)
    unknown = [r for r in required if r not in TEXT_FIELDS]
    if unknown:
        raise ValueError(f"required fields {unknown} are not FashionGen text fields {TEXT_FIELDS}")
    with open_file(path) as f:
        n = check_file(f)
        ids = _column(f["input_productID"][:]).astype(np.int64)
        groups = _product_groups(ids)
        done = 0
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            chunk = None
            while done < len(groups) and groups[done][-1] < stop:
                rows = groups[done]
                done += 1
                if chunk is None:
                    chunk = {k: (f[k][start:stop] if k == IMAGE_KEY else _column(f[k][start:stop])) for k in KEYS}
                early = rows[rows < start]
                parts = [_read(f, early)] if len(early) else []
                parts.append({k: v[rows[rows >= start] - start] for k, v in chunk.items()})
                columns = {k: np.concatenate([p[k] for p in parts]) for k in KEYS}
                product = _product(columns, rows, encoding, required, skipped, split)
                if product is not None:
                    yield product


def _product(columns: dict[str, np.ndarray], rows: np.ndarray, encoding: str, required: tuple[str, ...],
             skipped: SkippedLog | None, split: str) -> dict[str, Any] | None:
    product_id = int(columns["input_productID"][0])

    def skip(reason: str, view: str | None = None) -> None:
        if skipped is not None:
            skipped.add(split, product_id, reason, view)

    texts = {t: decode_text(bytes(columns[f"input_{t}"][0]), encoding) for t in TEXT_FIELDS}
    empty = [r for r in required if not texts[r].strip()]
    if empty:
        skip(f"empty {', '.join(empty)} (row {rows[0]})")
        return None
    images, poses = [], []
    for i, row in enumerate(rows):
        image = columns[IMAGE_KEY][i]
        if image.min() == image.max():
            skip(f"blank image (row {row})", view=f"row {row}")
            continue
        images.append(image)
        poses.append(decode_text(bytes(columns["input_pose"][i]), encoding))
    if not images:
        skip("no usable image")
        return None
    texts.pop("pose")
    return {"product_id": product_id, "images": images, "poses": poses,
            "msrp": float(columns["input_msrpUSD"][0]), **texts}


class Writer:
    """Writes FashionGen-format rows in chunks (for SynthFashion's export and for tests).

    `text_lengths` fixes each text field's byte length (h5 fixed-length strings), as the real
    files do; a longer text is an error naming the field.
    """

    def __init__(self, path: str | os.PathLike, text_lengths: dict[str, int], image_size: int = 256,
                 encoding: str = "latin-1") -> None:
        self._file = h5py.File(path, "w")
        self._encoding = encoding
        self._lengths = {t: max(1, text_lengths.get(t, 1)) for t in TEXT_FIELDS}
        f = self._file
        f.create_dataset(IMAGE_KEY, (0, image_size, image_size, 3), np.uint8,
                         maxshape=(None, image_size, image_size, 3), chunks=(1, image_size, image_size, 3))
        for t in TEXT_FIELDS:
            f.create_dataset(f"input_{t}", (0, 1), f"S{self._lengths[t]}", maxshape=(None, 1))
        for key, dtype in (("input_productID", np.int32), ("input_msrpUSD", np.float32), ("index", np.int64),
                           ("index_2", np.int64)):
            f.create_dataset(key, (0, 1), dtype, maxshape=(None, 1))
        self.rows = 0

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Each row: `image` uint8 [H, W, 3], `product_id`, `msrp`, `index`, `index_2` and the
        text fields (str)."""
        start, self.rows = self.rows, self.rows + len(rows)
        for key in KEYS:
            self._file[key].resize(self.rows, axis=0)
        self._file[IMAGE_KEY][start:] = np.stack([r["image"] for r in rows])
        for t in TEXT_FIELDS:
            encoded = [r[t].encode(self._encoding) for r in rows]
            too_long = [len(e) for e in encoded if len(e) > self._lengths[t]]
            if too_long:
                raise ValueError(f"text field {t!r}: {max(too_long)} bytes, longer than its {self._lengths[t]}")
            self._file[f"input_{t}"][start:] = np.array(encoded, dtype=f"S{self._lengths[t]}")[:, None]
        for key, field in (("input_productID", "product_id"), ("input_msrpUSD", "msrp"), ("index", "index"),
                           ("index_2", "index_2")):
            self._file[key][start:] = np.array([r[field] for r in rows])[:, None]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
