"""Retrieval evaluation (E2_METHOD.md section 6): full-candidate I2T and T2I R@1/5/10 and SumR.

One image (the first view) and one text (the global text) per product of the split; every
image is ranked against every text and back. `embed_split` runs the model over the split on
the mesh (each example once, padding dropped) and gathers the embeddings on every process;
`retrieval_metrics` ranks them on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

KS = (1, 5, 10)


def _host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded, multi-process) array on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def embed_split(embed: Callable[[dict], tuple[jax.Array, jax.Array]],
                batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image embeddings, text embeddings, example indices) of every valid row of `batches`,
    in index order. `embed(batch) -> (image [B, D], text [B, D])`."""
    images, texts, indices = [], [], []
    for batch in batches:
        image, text = embed(batch)
        valid = _host(batch["valid"])
        images.append(_host(image)[valid])
        texts.append(_host(text)[valid])
        indices.append(_host(batch["index"])[valid])
    index = np.concatenate(indices)
    order = np.argsort(index, kind="stable")
    return np.concatenate(images)[order], np.concatenate(texts)[order], index[order]


def retrieval_metrics(image: np.ndarray, text: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Row i of `image` and of `text` belong together. R@k in percent for image-to-text (`i2t`)
    and text-to-image (`t2i`), and SumR, their sum. A tie counts in the query's favour."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    similarity = image.astype(np.float64) @ text.astype(np.float64).T
    correct = np.diag(similarity)
    ranks = {"i2t": (similarity > correct[:, None]).sum(1), "t2i": (similarity.T > correct[:, None]).sum(1)}
    metrics = {f"{direction}_r{k}": 100.0 * float(np.mean(rank < k)) for direction, rank in ranks.items() for k in ks}
    metrics["sumr"] = sum(metrics.values())
    return metrics
