"""Full-candidate retrieval on FashionGen's validation size: time and peak memory.

    python -m benchmarks.evaluation                 # 32,528 random 512-d image/text pairs
    python -m benchmarks.evaluation --tile 2048     # another block size

The embeddings are random (the metric's cost does not depend on them), float32, as the model
gives them. Timed: `e2_jax.evaluation.retrieval.full_candidate` (both directions, blocked similarities
on this process's devices), after one warm-up call on the same shapes that compiles the block
program. Peak memory is the process's maximum resident set (`ru_maxrss`), which includes
Python, JAX and the embeddings themselves; the baseline before the first call is printed too.
A brute-force check on a subset confirms the numbers mean something.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import jax
import numpy as np

from e2_jax.evaluation import retrieval
from e2_jax.numerics import l2_normalize


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32528)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    image = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    text = image + 8.0 * rng.standard_normal((args.n, args.dim), dtype=np.float32)
    baseline = rss_gb()
    retrieval.full_candidate(image[: args.tile], text[: args.tile], tile=args.tile)  # compiles the block
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ranks = retrieval.ranks(image, text, tile=args.tile)
        metrics = retrieval.recall_at(ranks)  # what full_candidate returns
        times.append(time.perf_counter() - start)
    flops = 2 * args.n**2 * args.dim  # one similarity matrix
    best = min(times)
    print(f"full-candidate, {args.n:,} pairs x {args.dim}-d, tile {args.tile}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {len(jax.local_devices())} device(s); jax {jax.__version__}")
    print(f"time: best {best:.2f} s, median {np.median(times):.2f} s of {args.repeats} "
          f"({flops / best / 1e9:.0f} GFLOP/s counting the one similarity matrix)")
    print(f"peak resident memory: {rss_gb():.2f} GB (before the first call: {baseline:.2f} GB)")
    # The floor: the similarity matrix's FLOPs at this machine's best float32 GEMM rate
    # (NumPy's BLAS on one tile-sized block, the best of 3).
    a = image[: args.tile]
    b = np.ascontiguousarray(text[: args.tile].T)
    a @ b
    gemm = min(_timed(lambda: a @ b) for _ in range(3))
    rate = 2 * args.tile**2 * args.dim / gemm
    print(f"BLAS GEMM: {rate / 1e9:.0f} GFLOP/s, so the similarities alone need at least {flops / rate:.1f} s")
    print("metrics:", {k: round(v, 2) for k, v in metrics.items()})
    # Brute force (float64, whole rows) for the first 500 image queries.
    i, t = l2_normalize(image[:500]).astype(np.float64), l2_normalize(text).astype(np.float64)
    s = i @ t.T
    want = (s > s[np.arange(500), np.arange(500)][:, None]).sum(1)
    print("brute-force check of 500 image queries' ranks:", "equal" if np.array_equal(want, ranks["i2t"][:500])
          else f"DIFFERENT in {np.sum(want != ranks['i2t'][:500])} rows")


if __name__ == "__main__":
    main()
