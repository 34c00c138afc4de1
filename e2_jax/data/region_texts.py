"""Cheap region texts: each distinct tag encoded once, at the length it needs, in few calls.

E²'s region loss compares each item's region embedding with the CLIP text embedding of the
item's raw tag, per group (E2_METHOD.md section 3). Encoded as the authors do, that is one
text-tower row per item and group at a fixed context: five more text batches per step. Tags
are short ("FW2016", "SHIRTS") and repeat within a batch (seasons, sub-categories, brands), so
the input pipeline hands the step something smaller:

- **De-duplicated** across items *and groups*: a text's embedding depends only on its tokens,
  so each distinct tag of a process's batch is encoded once.
- **Trimmed**: with CLIP's causal mask and pooling at the end token, an embedding does not
  depend on the padding after its end token, so a text can be cut there.
- **Packed into at most two text-tower calls**: tags of at most `SHORT_TOKENS` tokens in one
  call (trimmed to a multiple of 8), longer ones (descriptions) in another (trimmed to a
  multiple of 16, at most the configured context).
- **Bucketed**, so that shapes stay static: a call's rows are rounded up to a multiple of half
  the process's batch (and of its devices), so a run compiles a few step variants (the trainer
  logs each; on SynthFashion/small at batch 64, two: the count of long tags straddles 32).
  Finer buckets waste less padding and compile more variants; the rounding of rows and
  lengths is a pure function of the batch, so a resumed run computes exactly what an
  uninterrupted one does. With several processes, every process must present the
  same shapes: each works out what it needs (`Packing.needs`), they agree on the element-wise
  maximum (`e2_jax.distributed.agree_max`), and each pads to the agreed `Packing.shapes`.

The step receives `region_tokens`, one int32 [rows, tokens] array per call (global: each
process's rows of it are its own distinct tags, the rest padding), and `region_index`, int32
[batch, groups]: the row of the calls' concatenated outputs that holds item i's tag of group g.
It encodes each call, concatenates and gathers (`e2_jax.training.train`). The loss and its gradients
are those of encoding every item's tag separately (tests/test_train.py checks it).

`mode="per_item"` is the authors' encoding in the same format: one call per group, one row per
item at the group's configured tag length, `region_index` pointing at the item's own row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MODES = ("packed", "per_item")
SHORT_TOKENS = 16  # a tag of at most this many tokens (end token included) is "short"
NEEDS = 4  # Packing.needs: short count, longest short, long count, longest long


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def text_lengths(tokens: np.ndarray) -> np.ndarray:
    """[N, L] ids -> [N] lengths (end token included): the end token is the largest id."""
    return np.argmax(tokens, axis=1) + 1 if len(tokens) else np.zeros(0, np.int64)


@dataclasses.dataclass(frozen=True)
class Packed:
    """One process's region texts: `tokens` per call (local rows), `index` [items, groups]
    into the global concatenation of the calls, and the `shapes` (rows per process, tokens)."""

    tokens: tuple[np.ndarray, ...]
    index: np.ndarray
    shapes: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a process's tags become the step's region texts.

    `local_rows`: items per process; `processes`: how many feed one global batch;
    `row_multiple`: the rows of a call are a multiple of it (the process's batch shards)."""

    mode: str = "packed"
    local_rows: int = 1
    processes: int = 1
    row_multiple: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.region_texts must be one of {MODES}, got {self.mode!r}")

    @property
    def agrees(self) -> bool:
        """Whether processes must agree on shapes (only the packed mode's depend on the data)."""
        return self.mode == "packed" and self.processes > 1

    def _distinct(self, tags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(distinct texts [U, L], inverse [items, groups]) over all groups' tags."""
        width = max(t.shape[1] for t in tags)
        stacked = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]))) for t in tags])
        texts, inverse = np.unique(stacked, axis=0, return_inverse=True)
        return texts, inverse.reshape(len(tags), -1).T

    def needs(self, tags: Sequence[np.ndarray]) -> np.ndarray:
        """What this process's batch needs, int64 [NEEDS]; the element-wise maximum over
        processes gives `shapes` that fit every process."""
        if self.mode == "per_item":
            return np.zeros(NEEDS, np.int64)
        texts, _ = self._distinct(tags)
        lengths = text_lengths(texts)
        short, long = lengths[lengths <= SHORT_TOKENS], lengths[lengths > SHORT_TOKENS]
        return np.array([len(short), short.max(initial=0), len(long), long.max(initial=0)], np.int64)

    def _rows(self, count: int) -> int:
        quantum = _round_up(max(1, self.local_rows // 2), self.row_multiple)
        return _round_up(count, quantum)

    def shapes(self, needs: np.ndarray, tag_lengths: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """(rows per process, tokens) of each call, for the agreed `needs`."""
        if self.mode == "per_item":
            return tuple((self.local_rows, length) for length in tag_lengths)
        n_short, short, n_long, long = (int(x) for x in needs)
        out = []
        if n_short:
            # Never wider than the tags themselves (tags of fewer than 8 tokens: their own length).
            out.append((self._rows(n_short), min(SHORT_TOKENS, max(tag_lengths), _round_up(short, 8))))
        if n_long:
            out.append((self._rows(n_long), min(max(tag_lengths), _round_up(long, 16))))
        return tuple(out)

    def pack(self, tags: Sequence[np.ndarray], shapes: tuple[tuple[int, int], ...],
             global_rows: Sequence[np.ndarray]) -> Packed:
        """`tags`: one int [items, length] array per group. `global_rows[k]`: the rows of call
        k's global array (`processes * rows`) that this process holds, in order."""
        offsets = np.cumsum([0] + [self.processes * rows for rows, _ in shapes])
        if self.mode == "per_item":
            index = np.stack([offsets[g] + global_rows[g] for g in range(len(tags))], axis=1)
            return Packed(tuple(tags), index.astype(np.int32), shapes)
        texts, inverse = self._distinct(tags)
        lengths = text_lengths(texts)
        slot = np.empty(len(texts), np.int64)  # a distinct text's row in the concatenation
        tokens = []
        for k, (call, (rows, width)) in enumerate(zip(self._calls(lengths, shapes), shapes, strict=True)):
            if len(call) > rows or (len(call) and lengths[call].max() > width):
                raise ValueError(f"region texts: {len(call)} texts of up to {lengths[call].max()} tokens do not "
                                 f"fit the agreed call shape {rows}x{width}")
            block = np.zeros((rows, width), texts.dtype)  # padding rows: token 0, a valid text
            block[: len(call)] = texts[call, :width]
            tokens.append(block)
            slot[call] = offsets[k] + np.asarray(global_rows[k])[: len(call)]
        return Packed(tuple(tokens), slot[inverse].astype(np.int32), shapes)

    def _calls(self, lengths: np.ndarray, shapes: tuple[tuple[int, int], ...]) -> list[np.ndarray]:
        """Which distinct texts go to which call (short ones first)."""
        short = np.flatnonzero(lengths <= SHORT_TOKENS)
        long = np.flatnonzero(lengths > SHORT_TOKENS)
        calls = [c for c in (short, long) if len(c)]
        while len(calls) < len(shapes):  # another process needed a call this one has nothing for
            calls.insert(0 if not len(short) else len(calls), np.zeros(0, np.int64))
        return calls


def describe(shapes: Sequence[tuple[int, int]]) -> str:
    """'112x16 + 64x80': the rows x tokens of each call (per process)."""
    return " + ".join(f"{rows}x{tokens}" for rows, tokens in shapes) or "none"
