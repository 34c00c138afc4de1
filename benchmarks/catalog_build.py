"""Building a catalog from a large product table: rows/s and peak memory.

    python -m benchmarks.catalog_build --out /tmp/catalog_bench              # 10,000 and 100,000 rows
    python -m benchmarks.catalog_build --out /tmp/catalog_bench --rows 1000  # a quick look

Generates, once per size (kept in `--out` for the next run), a JSONL product table of `rows`
products with one JPEG each (`--size` px, colour blocks on a fabric-like noise: about 20 KB at
256 px, like a product photo's web size) and five text columns, then builds it with the real command,
`python -m e2_jax.data.build catalog/NAME --manual-dir ...`, in a fresh process per size (the
sizes one after the other in one run). Reported per size: the build's wall time, rows/s and
its peak resident memory (the child process's `ru_maxrss`), and the built dataset's size.
What the memory is made of: the table is read as a stream (`e2_jax.data.catalog`, about a
350 bytes a product); TFDS's writer keeps a split's encoded examples in memory up to
1 GB before it spills them to disk (`tensorflow_datasets.core.shuffle.MAX_MEM_BUFFER_SIZE`),
so the peak grows with the dataset's bytes up to that bound, not with the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = np.array([[200, 30, 40], [30, 60, 160], [20, 20, 20], [240, 240, 235], [90, 140, 60], [230, 180, 40]])
WORDS = ("cotton", "wool", "linen", "silk", "denim", "leather", "slim", "relaxed", "cropped", "long")


def write_table(out: Path, rows: int, size: int) -> Path:
    """`out/products.jsonl` and `out/images/`: `rows` products, one JPEG each (kept if there)."""
    table = out / "products.jsonl"
    if table.is_file() and sum(1 for _ in table.open()) == rows:
        return table
    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with table.open("w") as f:
        for i in range(rows):
            name = f"images/{i // 1000:03d}/{i:07d}.jpg"
            path = out / name
            if not path.is_file():
                path.parent.mkdir(exist_ok=True)
                pixels = np.empty((size, size, 3), np.uint8)
                pixels[:] = COLOURS[rng.integers(len(COLOURS))]
                for _ in range(3):  # a garment, a logo, a label
                    y, x = rng.integers(0, size - size // 4, 2)
                    pixels[y : y + rng.integers(4, size // 3), x : x + rng.integers(4, size // 3)] = \
                        COLOURS[rng.integers(len(COLOURS))]
                noise = rng.integers(-12, 13, (size, size, 1), dtype=np.int16)  # the fabric's texture
                Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
            words = rng.choice(WORDS, 6)
            f.write(json.dumps({"id": f"P{i:07d}", "image": name, "title": f"{words[0]} {words[1]} shirt",
                                "description": " ".join(words) + ".", "brand": f"brand{i % 97}",
                                "material": str(words[2]), "category": f"cat{i % 13}"}) + "\n")
    return table


def build(table_dir: Path, data_dir: Path, name: str) -> dict:
    """The real build command in a child process: its wall time and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "e2_jax.data.build", f"catalog/{name}", "--manual-dir",
                           str(table_dir), "--data-dir", str(data_dir)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"build failed:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; the largest child so far
    built = sum(p.stat().st_size for p in (data_dir / "catalog" / name).rglob("*") if p.is_file())
    return {"seconds": seconds, "peak_rss_mib": peak / 1024, "peak_is_this_build": peak > before,
            "built_mib": built / 2**20, "printed": done.stdout.strip().splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/catalog_bench")
    parser.add_argument("--rows", default="10000,100000", help="comma-separated table sizes, smallest first")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args()
    out = Path(args.out)
    import tensorflow_datasets as tfds

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"TFDS {tfds.__version__}; images {args.size} px JPEG")
    print("| rows | table + images on disk | build s | rows/s | peak RSS (MiB) | built (MiB) |")
    print("|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        table_dir = out / f"table_{rows}"
        start = time.perf_counter()
        write_table(table_dir, rows, args.size)
        made = time.perf_counter() - start
        on_disk = sum(p.stat().st_size for p in table_dir.rglob("*") if p.is_file()) / 2**20
        data_dir = out / f"tfds_{rows}"
        if data_dir.exists():
            subprocess.run(["rm", "-rf", str(data_dir)], check=True)
        got = build(table_dir, data_dir, f"bench{rows}")
        peak = f"{got['peak_rss_mib']:.0f}" + ("" if got["peak_is_this_build"] else " (an earlier build's)")
        print(f"| {rows:,} | {on_disk:.0f} MiB (made in {made:.0f} s) | {got['seconds']:.0f} | "
              f"{rows / got['seconds']:.0f} | {peak} | {got['built_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
