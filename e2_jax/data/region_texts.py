"""Cheap region texts: encode tags at the context they need, and each distinct tag once.

Tags are short ("FW2016", "SHIRTS"). With CLIP's causal mask and pooling at the end token, a
text's embedding does not depend on the padding after its end token, so a batch of tags can be
encoded at the batch's longest tag instead of 77 tokens, with the same result; and a tag that
several items share (seasons, sub-categories) need be encoded once and gathered back. Both are
host-side NumPy steps that shrink what the jitted step encodes; shapes are rounded up to a
multiple, so that a training run compiles only a handful of variants.
"""

from __future__ import annotations

import numpy as np


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def trim(tokens: np.ndarray, multiple: int = 8) -> np.ndarray:
    """[N, L] ids -> [N, L'] with L' the longest text (end token included) rounded up to
    `multiple`, at most L. The end token is the largest id, so its position is the argmax."""
    longest = int(np.argmax(tokens, axis=1).max()) + 1 if len(tokens) else 1
    return tokens[:, : min(tokens.shape[1], _round_up(longest, multiple))]


def dedupe(tokens: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """[N, L] ids -> (unique [U', L], inverse [N]) with `unique[inverse] == tokens`.

    U' is the number of distinct rows rounded up to `multiple` (at most N); the extra rows
    repeat the first one, so every row is a valid text."""
    unique, inverse = np.unique(tokens, axis=0, return_inverse=True)
    rows = min(len(tokens), _round_up(len(unique), multiple))
    padded = np.concatenate([unique, np.repeat(unique[:1], rows - len(unique), axis=0)])
    return padded, inverse.reshape(-1).astype(np.int32)
