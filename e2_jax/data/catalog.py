"""Product tables for the `catalog` dataset: your own products, read as E² reads FashionGen.

A catalog is one table, `products.jsonl`, `products.csv` or `products.parquet`, beside the
image files it names (docs/catalog.md). One column holds the product id (`id`), one the images
(`image`): a path relative to the table (or absolute), a list of paths, or, in Parquet, what
Hugging Face `datasets` writes for an `Image` feature (a struct of `bytes` and `path`, or a
list of them); several images of one product come as a list or as repeated rows with the
same id. An optional `split` column assigns each product to a split; without one, a hash of
the id does (`hash_split`: stable across runs, machines and row order). Every other column is
a text field, named by `field_name` (lower case, runs of other characters as `_`: "Product
Title" is `product_title`), for the global text format and the region groups.

This module reads tables and plans the dataset (which rows make which product, in which
split, and what is left out); `e2_jax.data.builders.catalog` writes it with TFDS. It reads a
table as a stream of rows (once to plan, then once per split), keeping per product only its
id, split, row numbers and a digest of its texts: memory grows with the number of products by
about 350 bytes each, never with the images.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from e2_jax.errors import ConfigError, DataError, MissingError, suggest

TABLES = ("products.jsonl", "products.csv", "products.parquet")
RESERVED = ("product_id", "images")  # the dataset's own fields
SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # what TFDS accepts as a split name


@dataclasses.dataclass(frozen=True)
class TableOptions:
    """How to read a product table. `fractions`: the hash split's (split, fraction) pairs, used
    when the table has no `split_column`; `optional`: text columns (field names) that may be
    empty; a product with any other text column empty is skipped; `outside`: read relative
    image paths that leave the table's folder (`../x.jpg`), which are otherwise refused (a
    table should not reach files beside it by accident)."""

    id_column: str = "id"
    image_column: str = "image"
    split_column: str = "split"
    fractions: tuple[tuple[str, float], ...] = (("train", 0.9), ("validation", 0.1))
    optional: tuple[str, ...] = ()
    outside: bool = False  # read relative image paths that leave the table's folder (../)

    def __post_init__(self) -> None:
        names = [name for name, _ in self.fractions]
        bad = [name for name in names if not SPLIT_NAME.match(name)]
        if bad or not names or len(set(names)) != len(names):
            raise ConfigError(f"catalog splits {names}: give distinct names of letters, digits and _")
        if any(f < 0 for _, f in self.fractions) or not math.isclose(sum(f for _, f in self.fractions), 1.0):
            raise ConfigError(f"catalog split fractions {dict(self.fractions)} must be >= 0 and sum to 1")


def parse_fractions(text: str) -> tuple[tuple[str, float], ...]:
    """'train=0.9,validation=0.05,test=0.05' -> (("train", 0.9), ...)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            raise ConfigError(f"catalog splits {text!r}: write name=fraction pairs, e.g. "
                              "train=0.9,validation=0.1") from None
    return tuple(out)


def find_table(root: str | Path) -> Path:
    """The one product table in `root`."""
    root = Path(root)
    if not root.is_dir():
        raise MissingError(f"catalog: {root} is not a folder; --manual-dir names the folder that holds the product "
                           f"table ({' or '.join(TABLES)}) and its images (docs/catalog.md)")
    found = [root / name for name in TABLES if (root / name).is_file()]
    if len(found) != 1:
        what = "no product table" if not found else f"{len(found)} product tables ({', '.join(p.name for p in found)})"
        raise MissingError(f"catalog: {root} holds {what}; it must hold exactly one of {', '.join(TABLES)} "
                           "(docs/catalog.md)")
    return found[0]


def field_name(column: str) -> str:
    """A column's field name: lower case, each run of characters other than letters and digits
    as one `_` ("Product Title" -> "product_title", "colour/finish" -> "colour_finish")."""
    name = re.sub(r"[^0-9a-z]+", "_", str(column).lower()).strip("_")
    return name if name and not name[0].isdigit() else f"c_{name}"


# --- Reading a table, row by row ------------------------------------------------------------------


def _rows_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}, line {number}: not a JSON object ({error}); each line of a .jsonl table "
                                "is one product row") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object")
            yield row


def _rows_csv(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            yield {k: v for k, v in row.items() if k is not None}


def _rows_parquet(path: Path, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq  # only for Parquet tables

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path} is not a readable Parquet file ({error})") from None
    for batch in table.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def rows(path: Path) -> Iterator[dict[str, Any]]:
    """The table's rows in order, as {column: value}, read as a stream."""
    reader = {".jsonl": _rows_jsonl, ".csv": _rows_csv, ".parquet": _rows_parquet}[path.suffix]
    try:
        yield from reader(path)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path} is not readable as {path.suffix[1:]} ({error})") from None


def columns(path: Path) -> list[str]:
    """The table's columns (for JSONL, every key of any row), in order of first appearance."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), [])
    seen: dict[str, None] = {}
    for row in rows(path):
        seen.update(dict.fromkeys(row))
    return list(seen)


# --- Values -----------------------------------------------------------------------------------------


def text(value: Any) -> str:
    """A cell as text: None and NaN empty, numbers as written, lists joined with ', ', and every
    run of whitespace (spaces, tabs, newlines) as one space, none at the ends."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}" if value != int(value) or abs(value) >= 1e16 else str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (text(v) for v in value) if t)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return " ".join(str(value).split())  # whitespace collapsed: runs of spaces, tabs, newlines as one space


def image_refs(value: Any) -> list[str | bytes]:
    """An image cell as a list of references: a path (str) or the image's bytes. A CSV cell may
    hold a JSON list of paths."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            try:
                return image_refs(json.loads(value))
            except ValueError:
                pass
        return [value] if value else []
    if isinstance(value, bytes):
        return [value] if value else []
    if isinstance(value, dict):  # Hugging Face datasets' Image: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        return [data] if data else [path] if path else []
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in image_refs(item)]
    raise DataError(f"an image cell holds a {type(value).__name__}; give a path, a list of paths or image bytes")


def hash_split(product_id: str, fractions: Sequence[tuple[str, float]]) -> str:
    """The split of a product without a split column: the first 8 bytes of sha256(id), as a
    number in [0, 1), placed on the cumulative fractions."""
    u = int.from_bytes(hashlib.sha256(product_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    total = 0.0
    for name, fraction in fractions:
        total += fraction
        if u < total:
            return name
    return fractions[-1][0]


# --- The plan: which rows make which product ------------------------------------------------------


@dataclasses.dataclass
class Product:
    split: str
    digest: bytes
    rows: list[int]
    conflict: str = ""  # why the product is left out, if its rows disagree


@dataclasses.dataclass
class Plan:
    """A table read once: its columns' field names, the products by id and the rows without an id."""

    path: Path
    options: TableOptions
    fields: dict[str, str]  # text column -> field name
    products: dict[str, Product]
    no_id: list[int]
    has_split_column: bool

    @property
    def splits(self) -> list[str]:
        """The splits that have products (a hash split's in the order of the fractions)."""
        have = {p.split for p in self.products.values()}
        if not self.has_split_column:
            return [name for name, _ in self.options.fractions if name in have]
        return sorted(have)

    def required(self) -> list[str]:
        return [f for f in self.fields.values() if f not in self.options.optional]


def plan(path: Path, options: TableOptions) -> Plan:
    """Reads the table once (ids, splits, texts' digests), checking its columns."""
    names = columns(path)
    for role, column in (("id", options.id_column), ("image", options.image_column)):
        if column not in names:
            raise ConfigError(f"catalog: {path} has no {role} column {column!r}{suggest(column, names)}; its columns "
                              f"are {names} (name it with --{role}-column)")
    has_split = options.split_column in names
    fields: dict[str, str] = {}
    for column in names:
        if column in (options.id_column, options.image_column) or (has_split and column == options.split_column):
            continue
        name = field_name(column)
        if name in RESERVED:
            raise ConfigError(f"catalog: {path}'s column {column!r} would be the field {name!r}, which the dataset "
                              f"uses itself ({', '.join(RESERVED)}); rename the column")
        clash = [c for c, n in fields.items() if n == name]
        if clash:
            raise ConfigError(f"catalog: {path}'s columns {clash[0]!r} and {column!r} both become the field "
                              f"{name!r}; rename one")
        fields[column] = name
    unknown = [f for f in options.optional if f not in fields.values()]
    if unknown:
        raise ConfigError(f"catalog: --optional names {unknown}, which are not text fields of {path}; its text fields "
                          f"are {list(fields.values())}")
    products: dict[str, Product] = {}
    no_id: list[int] = []
    for number, row in enumerate(rows(path)):
        product_id = text(row.get(options.id_column))
        if not product_id:
            no_id.append(number)
            continue
        texts = {name: text(row.get(column)) for column, name in fields.items()}
        split = text(row.get(options.split_column)) if has_split else hash_split(product_id, options.fractions)
        digest = hashlib.sha1(json.dumps([split, texts], sort_keys=True).encode("utf-8")).digest()
        seen = products.get(product_id)
        if seen is None:
            products[product_id] = Product(split, digest, [number])
            continue
        seen.rows.append(number)
        if digest != seen.digest and not seen.conflict:
            seen.conflict = f"duplicate id with conflicting texts (rows {seen.rows[0] + 1} and {number + 1})"
    if has_split:
        bad = sorted({p.split for p in products.values() if not SPLIT_NAME.match(p.split)})
        if bad:
            raise DataError(f"catalog: {path}'s {options.split_column!r} column holds {bad[:5]}: a split is named by "
                            "letters, digits and _ (e.g. train, validation, test)")
    return Plan(path, options, fields, products, no_id, has_split)


# --- Writing tables: the example catalog ----------------------------------------------------------


def write_table(table_rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Writes rows as a product table, its format from the suffix (.jsonl, .csv, .parquet). In
    CSV a list is written as JSON text, which `image_refs` reads back."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in table_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif path.suffix == ".csv":
        names = list(dict.fromkeys(k for row in table_rows for k in row))
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, names)
            writer.writeheader()
            for row in table_rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(table_rows)), path)
    else:
        raise ConfigError(f"a product table is .jsonl, .csv or .parquet, not {path.name}")
    return path


def example(out: str | Path, products: int = 64, variant: str = "tiny", table: str = "products.csv") -> Path:
    """A small catalog made from SynthFashion products (docs/catalog.md's worked example):
    their views as PNG files under `images/`, and a table with the columns a retailer's might
    have (`id`, `image`, `title`, `description`, `brand`, `material`, `season`, `category`).
    The brand (a logo), the material (a care label) and the season (a tag) show on the images."""
    from PIL import Image

    from e2_jax.data import synth_fashion  # deferred: only the example renders

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    config = synth_fashion.VARIANTS[variant][1]
    table_rows = []
    for index in range(products):
        item = synth_fashion.product(config, "train", index)
        names = []
        for view, pixels in zip(synth_fashion.VIEWS, item["images"], strict=True):
            names.append(f"images/{item['product_id']}_{view}.png")
            Image.fromarray(pixels).save(out / names[-1])
        table_rows.append({"id": f"SF{item['product_id']:06d}", "image": names, "title": item["name"],
                           "description": item["description"], "brand": item["brand"],
                           "material": item["composition"], "season": item["season"],
                           "category": item["subcategory"]})
    return write_table(table_rows, out / table)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m e2_jax.data.catalog",
                                     description="Writes docs/catalog.md's example catalog (SynthFashion products).")
    parser.add_argument("out", help="the folder to write (the table and images/)")
    parser.add_argument("--products", type=int, default=512)
    parser.add_argument("--variant", default="small", help="the SynthFashion variant rendered (default: small, 64 px)")
    parser.add_argument("--table", default="products.csv", choices=TABLES)
    args = parser.parse_args(argv)
    path = example(args.out, args.products, args.variant, args.table)
    print(f"{path}: {args.products} products")


if __name__ == "__main__":
    from e2_jax import errors

    errors.main(main)
