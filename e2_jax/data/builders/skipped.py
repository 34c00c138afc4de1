"""What a builder leaves out, and why: bad data is skipped, counted and reported, never a crash.

Every builder records each skipped product or view here (split, product id, reason). The
counts are logged when a split is done and stored in the dataset's `metadata.json`
(`builder.info.metadata["skipped"]`), so they stay with the data:

    {"train": {"count": 2, "by_reason": {"blank image": 1, ...},
               "examples": [{"product": "12345", "reason": "blank image (row 17)"}, ...]}}
"""

from __future__ import annotations

import collections
from typing import Any

from absl import logging

MAX_LISTED = 1000  # entries listed per split in metadata.json; the counts are always complete


class SkippedLog:
    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self._entries: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)

    def add(self, split: str, product: Any, reason: str) -> None:
        entries = self._entries[split]
        if len(entries) < 20:  # the first few in the log as they happen; all in the summary
            logging.warning("%s/%s: skipped product %s: %s", self.dataset, split, product, reason)
        entries.append((str(product), reason))

    def count(self, split: str) -> int:
        return len(self._entries[split])

    def summary(self, split: str) -> dict[str, Any]:
        entries = self._entries[split]
        # "blank image (row 17)" and "blank image (row 90)" are one reason.
        by_reason = collections.Counter(reason.split(" (")[0] for _, reason in entries)
        return {"count": len(entries), "by_reason": dict(by_reason),
                "examples": [{"product": p, "reason": r} for p, r in entries[:MAX_LISTED]]}

    def finish(self, split: str, metadata: dict) -> None:
        """Logs the split's count and stores its summary in the builder's metadata."""
        summary = self.summary(split)
        if summary["count"]:
            logging.warning("%s/%s: skipped %d: %s (listed in metadata.json)", self.dataset, split,
                            summary["count"], summary["by_reason"])
        metadata.setdefault("skipped", {})[split] = summary
