"""Composed image retrieval metrics: FashionIQ's protocol, as CIReVL and CLIP4Cir compute it.

Per category, each validation triplet is one query (its predicted target embedding: a
recomposed caption's text embedding, or a baseline's); the gallery is the category's
validation image list (the reference image is *not* removed, as in FashionIQ's protocol); a
query scores a hit at K when its target image is among the K gallery images most similar to it
by cosine similarity. R@10 and R@50 per category; their means over the categories (the E²
paper's "average R@10", 28.3 -> 31.7 with CIReVL, is the mean R@10); and `average`, the mean of
those two means (CIR papers' "Avg."). Ties are broken by gallery order (a stable sort).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from e2_jax.numerics import l2_normalize

KS = (1, 5, 10, 50)


def join_captions(first: str, second: str, keep_empty: bool = True) -> str:
    """FashionIQ's two modification captions as one instruction, as CIReVL joins them:
    "is darker and has a logo" (each stripped of '.', '?', ',' and spaces at its ends), even
    when one is empty (" and is grey"); `keep_empty=False` leaves an empty one out ("is grey")."""
    parts = [c.strip(".?, ") for c in (first, second)]
    return " and ".join(p for p in parts if p or keep_empty)


def target_ranks(queries: np.ndarray, gallery: np.ndarray, gallery_ids: Sequence[str],
                 targets: Sequence[str]) -> np.ndarray:
    """[Q] 0-based rank of each query's target among the gallery, by cosine similarity (ties
    by gallery order). Each target must be in `gallery_ids` exactly once."""
    queries, gallery = l2_normalize(np.asarray(queries)), l2_normalize(np.asarray(gallery))
    position = {}
    for i, name in enumerate(map(str, gallery_ids)):
        if name in position:
            raise ValueError(f"gallery id {name!r} appears twice; a gallery lists each image once")
        position[name] = i
    missing = sorted({str(t) for t in targets} - position.keys())
    if missing:
        raise ValueError(f"{len(missing)} targets are not in the gallery (e.g. {missing[:3]}); drop their queries "
                         "first (`in_gallery`)")
    column = np.array([position[str(t)] for t in targets], np.int64)
    scores = queries @ gallery.T
    own = scores[np.arange(len(column)), column][:, None]
    before = np.arange(gallery.shape[0])[None, :] < column[:, None]
    return ((scores > own) | ((scores == own) & before)).sum(axis=1)


def recalls(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """{"r1": ..., "r50": ...}: percent of queries whose target ranks within K."""
    return {f"r{k}": float(100.0 * np.mean(ranks < k)) if len(ranks) else float("nan") for k in ks}


def in_gallery(targets: Sequence[str], gallery_ids: Sequence[str]) -> np.ndarray:
    """[Q] bool: which queries' targets are in the gallery (the others cannot be scored)."""
    have = set(map(str, gallery_ids))
    return np.array([str(t) in have for t in targets], bool)


def summary(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The means over categories of each recall, and `average`: the mean of R@10 and R@50."""
    keys = next(iter(per_category.values())).keys()
    out = {k: float(np.mean([m[k] for m in per_category.values()])) for k in keys}
    if "r10" in out and "r50" in out:
        out["average"] = (out["r10"] + out["r50"]) / 2
    return out
