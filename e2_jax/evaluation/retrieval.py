"""Retrieval metrics on embeddings, under each published protocol (E2_METHOD.md section 6).

R@k is the percentage of queries whose correct candidate ranks in the top k; SumR is the sum
of R@1/5/10 both ways. A query's rank is the number of wrong candidates scoring strictly
higher than its correct one: ties count in the query's favour.

- `full_candidate(image, text)`: row i of each belongs together (the authors' protocol: the
  first view and the global text of each product, all against all).
- `full_gallery(image, image_product, text)`: every image (all views) against one text per
  product (FashionSAP's): an image's correct text is its product's; for text->image, any view
  of the product counts (its best view is the correct one, the other views are not
  candidates against it).
- `sample_100(...)`: 1,000 query products, each against 100 negative products of the same
  sub-category (topped up from other sub-categories when too few); `sample_100_candidates`
  draws the candidate lists from a seed, `sample_100_candidates_authors` as the E² authors'
  code does (every product a query, no top-up; docs/evaluation.md says what differs).

Full protocols never hold the [queries, candidates] matrix: similarities are computed in
[tile, tile] blocks on the local devices (rows split over them), and only counts are kept. The
similarity of each correct pair is read from a block computed by the same program, on the same
inputs, as the block that compares it with the others, so a correct pair can never lose to
itself by rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from e2_jax.numerics import l2_normalize

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")


def recall_at(ranks: dict[str, np.ndarray], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """{"i2t": ranks, "t2i": ranks} -> i2t_r1 ... t2i_r10 in percent, and sumr."""
    out = {f"{d}_r{k}": 100.0 * float(np.mean(np.asarray(r) < k)) for d, r in ranks.items() for k in ks}
    out["sumr"] = sum(out.values())
    return out


# --- Blocked ranks ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _block_fns(mesh: Mesh):
    rows, cols = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())

    @functools.partial(jax.jit, in_shardings=(rows, cols), out_shardings=rows)
    def similarities(a, b):
        """One [rows, cols] block of cosine similarities. Both passes read the blocks this one
        program computes, so a pair's similarity is the same number in both."""
        return jnp.einsum("rd,cd->rc", a, b, precision=jax.lax.Precision.HIGHEST)

    @functools.partial(jax.jit, in_shardings=(rows, rows, cols), out_shardings=(rows, cols))
    def positives(s, row_target, col_ids):
        """Row i is a query of product `row_target[i]` (-1: padding), column j the text of
        product `col_ids[j]` (-1: padding): the best positive similarity per row and per
        column within the block."""
        match = (row_target[:, None] == col_ids[None, :]) & (col_ids[None, :] >= 0)
        positive = jnp.where(match, s, -jnp.inf)
        return positive.max(axis=1), positive.max(axis=0)

    def beats(s, positive):
        # 1.0 where s > positive, else 0.0: the same as (s > positive), which XLA's CPU backend
        # reduces about 5x slower than this float form. Identical for every s and positive
        # whose difference is not subnormal (both above 2^-102 in magnitude, or equal), so
        # for any similarity a model gives: a flush-to-zero difference would need two
        # similarities within 1e-38 of each other, both nearly zero.
        return jnp.sign(jnp.maximum(s - positive, 0.0))

    @functools.partial(jax.jit, in_shardings=(rows, rows), out_shardings=rows)
    def row_counts(s, row_positive):
        """Per row, the columns scoring strictly higher than `row_positive`. The positive pair
        itself never counts (it equals the positive); padding is subtracted by the caller."""
        return beats(s, row_positive[:, None]).sum(axis=1).astype(jnp.int32)

    @functools.partial(jax.jit, in_shardings=(rows, cols), out_shardings=cols)
    def col_counts(s, col_positive):
        """Per column, the rows scoring strictly higher than `col_positive` (a text's other
        images of its product never count: its positive is the best of them). Its own program:
        fused with the row counts, XLA's CPU backend runs both several times slower."""
        return beats(s, col_positive[None, :]).sum(axis=0).astype(jnp.int32)

    return similarities, positives, row_counts, col_counts


def local_mesh() -> Mesh:
    """This process's devices as one axis: every process ranks the whole set on its own."""
    return Mesh(np.asarray(jax.local_devices()), ("rows",))


def _pad(x: np.ndarray, n: int, value) -> np.ndarray:
    if len(x) == n:
        return x
    pad = np.full((n - len(x), *x.shape[1:]), value, x.dtype)
    return np.concatenate([x, pad])


def ranks(image: np.ndarray, text: np.ndarray, image_product: np.ndarray | None = None, *,
          tile: int = 4096, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """Ranks of every image query (`i2t`, [images]) and every text query (`t2i`, [texts]).

    Text j belongs to product j; image i to product `image_product[i]` (default: i). For
    t2i, a text's positive is its product's best image, and its product's other images are
    not counted against it. Embeddings are L2-normalised here.
    """
    image, text = l2_normalize(np.asarray(image, np.float32)), l2_normalize(np.asarray(text, np.float32))
    n_images, n_texts = len(image), len(text)
    product = np.arange(n_images, dtype=np.int32) if image_product is None else np.asarray(image_product, np.int32)
    if product.shape != (n_images,) or (n_images and (product.min() < 0 or product.max() >= n_texts)):
        raise ValueError(f"image_product must give each of the {n_images} images a text index in [0, {n_texts})")
    mesh = mesh or local_mesh()
    tile = max(mesh.size, -(-min(tile, max(n_images, n_texts)) // mesh.size) * mesh.size)
    image_tiles, text_tiles = -(-n_images // tile), -(-n_texts // tile)
    image = _pad(image, image_tiles * tile, 0.0)
    text = _pad(text, text_tiles * tile, 0.0)
    product = _pad(product, image_tiles * tile, -1)
    col_ids = _pad(np.arange(n_texts, dtype=np.int32), text_tiles * tile, -1)
    similarities, positives, row_counts, col_counts = _block_fns(mesh)
    rows = lambda a: slice(a * tile, (a + 1) * tile)
    row_positive = np.full(len(image), -np.inf, np.float32)
    col_positive = np.full(len(text), -np.inf, np.float32)
    row_rank = np.zeros(len(image), np.int64)
    col_rank = np.zeros(len(text), np.int64)
    # The blocks holding positive pairs; a block that holds every positive of its rows and of
    # its columns (the diagonal blocks of full-candidate) is counted in pass 1, not recomputed.
    pairs = {(a, b) for a in range(image_tiles) for b in np.unique(product[rows(a)][product[rows(a)] >= 0] // tile)}
    tiles_of_rows = {a: {b for a2, b in pairs if a2 == a} for a in range(image_tiles)}
    tiles_of_cols = {b: {a for a, b2 in pairs if b2 == b} for b in range(text_tiles)}
    counted = set()

    def count(a, b, s):
        row_rank[rows(a)] += np.asarray(row_counts(s, row_positive[rows(a)]))
        col_rank[rows(b)] += np.asarray(col_counts(s, col_positive[rows(b)]))

    # Pass 1: the positive pairs' similarities, from the blocks that hold them.
    for a, b in sorted(pairs):
        s = similarities(image[rows(a)], text[rows(b)])
        row_best, col_best = positives(s, product[rows(a)], col_ids[rows(b)])
        row_positive[rows(a)] = np.maximum(row_positive[rows(a)], np.asarray(row_best))
        col_positive[rows(b)] = np.maximum(col_positive[rows(b)], np.asarray(col_best))
        if tiles_of_rows[a] == {b} and tiles_of_cols[b] == {a}:  # both positives final
            count(a, b, s)
            counted.add((a, b))

    # Pass 2: count who beats them.
    for a in range(image_tiles):
        for b in range(text_tiles):
            if (a, b) not in counted:
                count(a, b, similarities(image[rows(a)], text[rows(b)]))
    # Padding rows and columns are zero vectors: similarity 0 with everything.
    row_rank -= (len(text) - n_texts) * (row_positive < 0)
    col_rank -= (len(image) - n_images) * (col_positive < 0)
    return {"i2t": row_rank[:n_images], "t2i": col_rank[:n_texts]}


def full_candidate(image: np.ndarray, text: np.ndarray, **kw) -> dict[str, float]:
    """The authors' protocol: row i of `image` and of `text` are one product's."""
    if len(image) != len(text):
        raise ValueError(f"full-candidate needs one image per text: {len(image)} images, {len(text)} texts")
    return recall_at(ranks(image, text, **kw))


def full_gallery(image: np.ndarray, image_product: np.ndarray, text: np.ndarray, **kw) -> dict[str, float]:
    """FashionSAP's protocol: every image of every product, one text per product."""
    return recall_at(ranks(image, text, image_product, **kw))


# --- Sample-100 ---------------------------------------------------------------------------------


def sample_100_candidates(category: np.ndarray, *, queries: int = 1000, negatives: int = 100,
                          seed: int = 0) -> np.ndarray:
    """[Q, 1 + negatives] product indices: column 0 the query product, then `negatives`
    distinct other products of its category, topped up at random from other categories when
    it has too few. Q = min(queries, products). The same seed gives the same lists."""
    category = np.asarray(category)
    n = len(category)
    if n < negatives + 1:
        raise ValueError(f"sample-{negatives} needs at least {negatives + 1} products, the split has {n}")
    rng = np.random.default_rng(seed)
    query = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    members = {c: np.flatnonzero(category == c) for c in np.unique(category)}
    out = np.empty((len(query), negatives + 1), np.int64)
    for row, q in enumerate(query):
        same = members[category[q]]
        same = same[same != q]
        if len(same) >= negatives:
            chosen = rng.choice(same, size=negatives, replace=False)
        else:
            others = np.flatnonzero(category != category[q])
            chosen = np.concatenate([rng.permutation(same),
                                     rng.choice(others, size=negatives - len(same), replace=False)])
        out[row, 0], out[row, 1:] = q, chosen
    return out


def sample_100_candidates_authors(category: np.ndarray, *, negatives: int = 100, seed: int = 0) -> np.ndarray:
    """The E² authors' draw (their released evaluation code), for comparing with numbers it
    produced: every product is a query, in order; its negatives are at most `negatives` other
    products of its category, drawn at random without replacement and never topped up from
    other categories. [N, 1 + negatives], -1 after the last negative of a row that has fewer
    (a small category: fewer candidates, so higher recall than our draw)."""
    category = np.asarray(category)
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(category == c) for c in np.unique(category)}
    out = np.full((len(category), negatives + 1), -1, np.int64)
    for q in range(len(category)):
        same = members[category[q]]
        same = same[same != q]
        chosen = rng.choice(same, size=min(negatives, len(same)), replace=False)
        out[q, 0], out[q, 1 : 1 + len(chosen)] = q, chosen
    return out


def topped_up(category: np.ndarray, candidates: np.ndarray) -> int:
    """How many rows of `candidates` hold a negative of another category than their query's."""
    category = np.asarray(category)
    negatives = candidates[:, 1:]
    other = (category[np.maximum(negatives, 0)] != category[candidates[:, :1]]) & (negatives >= 0)
    return int(other.any(axis=1).sum())


def sample_100(image: np.ndarray, text: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    """`image`, `text`: one per product (image = the product's sampled view). Each row of
    `candidates` ([Q, 101], query product first; -1: no candidate) is one image query against
    those products' texts, and one text query against their images."""
    image = l2_normalize(np.asarray(image, np.float32)).astype(np.float64)
    text = l2_normalize(np.asarray(text, np.float32)).astype(np.float64)
    query, present = candidates[:, 0], candidates[:, 1:] >= 0
    held = np.maximum(candidates, 0)
    i2t = np.einsum("qd,qcd->qc", image[query], text[held])
    t2i = np.einsum("qd,qcd->qc", text[query], image[held])
    return recall_at({d: ((s[:, 1:] > s[:, :1]) & present).sum(1) for d, s in (("i2t", i2t), ("t2i", t2i))})
