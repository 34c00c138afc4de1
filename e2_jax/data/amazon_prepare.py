"""Builds the authors' AmazonFashion layout from Amazon's public review metadata.

    python -m e2_jax.data.amazon_prepare --meta meta_AMAZON_FASHION.json.gz --out data/amazon_fashion

The input is the AMAZON_FASHION metadata of the Amazon Review Data (2018,
https://nijianmo.github.io/amazon/): one JSON object per line with `asin`, `title`, `brand` and
image URLs (`imageURLHighRes`, `imageURL`; the 2014 files' `imUrl` and Python-literal lines
are read too). The output is what `amazon_fashion`'s builder reads:

    meta-fashion.json   {asin: {"images": [file, ...], "title": ..., "brand": ...}}
    split.json          {"train": [...], "test": [...]}
    Fashion/<asin>/<asin>_<k>.<jpg|png|...>
    prepare_report.json what was kept, skipped and why (every skipped product named)

Downloads run in a thread pool with a timeout per request and retries with exponential
backoff on timeouts, connection errors, 429 and 5xx (a 4xx is a dead link at once). Every file
is written to a temporary name and renamed when complete, so an interrupted run leaves no
half files; a re-run skips what is on disk and the links recorded in `dead_links.txt` (dead,
or serving something that is not an image; `--retry-dead` tries them again). Bytes that are
not a decodable image are not kept. The train/test split is a pure function of the ASIN (a
hash), so it does not depend on which downloads succeeded, on their order, or on the machine.
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from e2_jax import errors, storage
from e2_jax.data.builders.amazon_fashion import IMAGES, META, SPLIT
from e2_jax.data.builders.images import checked_image

DEAD_LINKS = "dead_links.txt"
REPORT = "prepare_report.json"
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}


@dataclasses.dataclass(frozen=True)
class Product:
    asin: str
    title: str
    brand: str
    urls: tuple[str, ...]


def _parse_line(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    try:  # the 2014 metadata files hold Python literals, one per line
        value = ast.literal_eval(line)
        return value if isinstance(value, dict) else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def read_metadata(path: str | Path, max_images: int, skipped: dict[str, list[str]]) -> Iterator[Product]:
    """Products of the metadata file (gzip or plain), first occurrence of each ASIN, with a title,
    a brand and at least one image URL; what is left out is listed in `skipped` (reason -> the
    ASINs, or "line N" for a line without one)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    seen: set[str] = set()
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _parse_line(line)
            if record is None or not record.get("asin"):
                skipped["unreadable metadata lines"].append(f"line {number}")
                continue
            asin = str(record["asin"]).strip()
            if asin in seen:
                skipped["duplicate asin"].append(f"{asin} (line {number})")
                continue
            seen.add(asin)
            urls = record.get("imageURLHighRes") or record.get("imageURL") or record.get("image") or []
            if isinstance(urls, str):
                urls = [urls]
            if not urls and record.get("imUrl"):
                urls = [record["imUrl"]]
            title, brand = str(record.get("title") or "").strip(), str(record.get("brand") or "").strip()
            if not title or not brand or not urls:
                skipped["no " + ("title" if not title else "brand" if not brand else "image url")].append(asin)
                continue
            yield Product(asin, title, brand, tuple(dict.fromkeys(urls))[:max_images])


def is_test(asin: str, test_fraction: float) -> bool:
    """Deterministic split: the ASIN's hash, not a random draw."""
    digest = int.from_bytes(hashlib.sha256(asin.encode()).digest()[:8], "big")
    return digest / 2**64 < test_fraction


class _Dead(Exception):
    """A link that will not work: 4xx, or still failing after the retries."""


def fetch(url: str, timeout: float, retries: int, backoff: float) -> bytes:
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "e2_jax-amazon-prepare"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if error.code != 429 and error.code < 500:
                raise _Dead(f"HTTP {error.code}") from None
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            reason = type(getattr(error, "reason", error)).__name__
        if attempt < retries:
            time.sleep(backoff * 2**attempt * (0.5 + random.random()))
    raise _Dead(f"{reason} after {retries + 1} tries")


def _existing(folder: Path, stem: str) -> Path | None:
    for path in folder.glob(stem + ".*"):
        if not path.name.endswith(".part"):
            return path
    return None


def _download_one(out: Path, asin: str, k: int, url: str, args: argparse.Namespace) -> tuple[str, str | None]:
    """('kept' | 'on disk' | 'dead' | 'undecodable', file name or None)."""
    folder, stem = out / IMAGES / asin, f"{asin}_{k}"
    existing = _existing(folder, stem)
    if existing is not None:
        return "on disk", existing.name
    try:
        data = fetch(url, args.timeout, args.retries, args.backoff)
    except _Dead:
        return "dead", None
    try:
        checked_image(data)
        with Image.open(io.BytesIO(data)) as image:
            extension = _EXTENSIONS.get(image.format or "", "img")
    except ValueError:
        return "undecodable", None
    folder.mkdir(parents=True, exist_ok=True)
    path, part = folder / f"{stem}.{extension}", folder / f"{stem}.{extension}.part"
    part.write_bytes(data)
    os.replace(part, path)  # atomic: never a half file under the final name
    return "kept", path.name


def _write_json(path: Path, value: Any) -> None:
    storage.write_text(path, json.dumps(value, indent=1, ensure_ascii=False))


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    products = list(read_metadata(args.meta, args.max_images, skipped))
    if args.limit:
        products = products[: args.limit]
    dead_file = out / DEAD_LINKS
    dead = set() if args.retry_dead or not dead_file.exists() else set(dead_file.read_text().split())
    jobs = [(p.asin, k, url) for p in products for k, url in enumerate(p.urls)]
    files: dict[str, list[tuple[int, str]]] = {p.asin: [] for p in products}
    outcomes: Counter = Counter()
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool, \
            tqdm(total=len(jobs), desc="images", unit="img", disable=args.quiet) as bar:
        futures = {}
        for asin, k, url in jobs:
            if url in dead:
                outcomes["dead (recorded earlier)"] += 1
                bar.update()
                continue
            futures[pool.submit(_download_one, out, asin, k, url, args)] = (asin, k, url)
        with dead_file.open("a") as dead_log:
            for future in concurrent.futures.as_completed(futures):
                asin, k, url = futures[future]
                outcome, name = future.result()
                outcomes[outcome] += 1
                if name is not None:
                    files[asin].append((k, name))
                elif outcome in ("dead", "undecodable"):  # neither will work on a re-run
                    dead_log.write(url + "\n")
                    dead_log.flush()
                bar.update()
                bar.set_postfix(dead=outcomes["dead"] + outcomes["dead (recorded earlier)"],
                                undecodable=outcomes["undecodable"], refresh=False)
    meta, split = {}, {"train": [], "test": []}
    for p in sorted(products, key=lambda p: p.asin):
        if not files[p.asin]:
            skipped["no image downloaded"].append(p.asin)
            continue
        meta[p.asin] = {"images": [name for _, name in sorted(files[p.asin])], "title": p.title, "brand": p.brand}
        split["test" if is_test(p.asin, args.test_fraction) else "train"].append(p.asin)
    _write_json(out / META, meta)
    _write_json(out / SPLIT, split)
    report = {"products with title, brand and image urls": len(products), "products kept": len(meta),
              "train": len(split["train"]), "test": len(split["test"]),
              "skipped": {reason: len(ids) for reason, ids in skipped.items()}, "images": dict(outcomes),
              "skipped_products": dict(skipped)}  # every product left out, by reason
    _write_json(out / REPORT, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2_jax.data.amazon_prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta", required=True, help="meta_AMAZON_FASHION.json.gz (or an uncompressed copy)")
    parser.add_argument("--out", required=True, help="the layout's root (the builder's manual directory)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--max-images", type=int, default=4, help="images kept per product, in the listed order")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per request")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubling)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N products (0: all)")
    parser.add_argument("--retry-dead", action="store_true", help=f"try again the links in {DEAD_LINKS}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.meta).is_file():
        parser.error(f"{args.meta} not found. Download meta_AMAZON_FASHION.json.gz from the Amazon Review Data "
                     "(2018) page, https://nijianmo.github.io/amazon/ (per-category metadata, AMAZON_FASHION).")
    print(json.dumps(prepare(args), indent=1))


if __name__ == "__main__":
    errors.main(main)
