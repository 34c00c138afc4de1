"""Tokenizing fashion texts: e2_jax's tokenizer against open_clip's, one run.

    python -m benchmarks.tokenizer --n 10000

Three batches of `--n` distinct texts, built from the FashionGen-like records of
e2_jax/data/fashion_texts.py: descriptions alone (about 8% contain a non-ASCII character), E² global
texts (`composition.subcategory.brand.season.description`, about 40%), and a worst case in
which every text carries accents and an HTML entity, so that every one goes through
`ftfy.fix_text` (pure Python, about 0.2 ms a text). The median of `--repeats` runs is reported;
open_clip's pure-Python tokenizer runs once (it is the slow side), and the ids must be equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from e2_jax.data.fashion_texts import fashion_records
from e2_jax.data.tokenizer import CLIPTokenizer


def batches(n: int) -> dict[str, list[str]]:
    records = fashion_records(n=n, seed=1)
    # A running number keeps every text distinct, so no cache sees a string twice.
    return {
        "descriptions": [f"{r['description']} Style {i}." for i, r in enumerate(records)],
        "E² global texts": [".".join([r["composition"], r["subcategory"], r["brand"], r["season"],
                                      f"{r['description']} Style {i}."]) for i, r in enumerate(records)],
        "worst case (all need ftfy)": [f"{r['description']} Café édition n°{i} &amp; {r['composition']}"
                                       for i, r in enumerate(records)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    tokenizer = CLIPTokenizer()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; tokenizer load "
          f"{time.perf_counter() - start:.2f} s; {args.n} texts a batch")
    try:
        from open_clip.tokenizer import SimpleTokenizer

        reference = SimpleTokenizer()
    except ImportError:
        reference = None
    print("| batch | non-ASCII | mean chars | e2_jax | open_clip | ratio |")
    print("|---|---|---|---|---|---|")
    for name, texts in batches(args.n).items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ids = tokenizer(texts)
            times.append(time.perf_counter() - start)
        ours = statistics.median(times)
        row = (f"| {name} | {np.mean([not t.isascii() for t in texts]):.0%} | "
               f"{np.mean([len(t) for t in texts]):.0f} | {ours:.2f} s |")
        if reference is not None:
            start = time.perf_counter()
            want = reference(texts).numpy()
            theirs = time.perf_counter() - start
            assert np.array_equal(ids, want), f"{name}: ids differ from open_clip's"
            row += f" {theirs:.2f} s | {theirs / ours:.1f}x |"
        print(row)


if __name__ == "__main__":
    main()
