"""What a builder leaves out, and why: bad data is skipped, counted and reported, never a crash.

Every builder records each skipped product or view here (split, product id, reason). The
counts are logged when a split is done and stored in the dataset's `metadata.json`
(`builder.info.metadata["skipped"]`), so they stay with the data:

    {"train": {"products": 1, "views": 1, "by_reason": {"blank image": 1, "empty description": 1},
               "views_by_reason": {"blank image": 1},
               "product_ids": ["12346"],   (every product left out)
               "examples": [{"product": "12345", "reason": "blank image (row 17)", "view": "row 17"},
                            {"product": "12346", "reason": "empty description (row 18)"}, ...]}}

A product is left out (counted in `products`, named in `product_ids`), or one of its views is
dropped and the product kept (counted in `views`, the view named).
"""

from __future__ import annotations

import collections
from typing import Any

from absl import logging

MAX_LISTED = 1000  # entries listed per split in metadata.json; the counts are always complete


class SkippedLog:
    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self._entries: dict[str, list[tuple[str, str, str | None]]] = collections.defaultdict(list)

    def add(self, split: str, product: Any, reason: str, view: str | None = None) -> None:
        """A product left out, or (`view` names it) one view of a product that is kept."""
        entries = self._entries[split]
        if len(entries) < 20:  # the first few in the log as they happen; all in the summary
            if view is None:
                logging.warning("%s/%s: skipped product %s: %s", self.dataset, split, product, reason)
            else:
                logging.warning("%s/%s: dropped view %s of product %s: %s", self.dataset, split, view, product,
                                reason)
        entries.append((str(product), reason, view))

    def count(self, split: str) -> int:
        """Products left out of `split`."""
        return sum(view is None for _, _, view in self._entries[split])

    def summary(self, split: str) -> dict[str, Any]:
        entries = self._entries[split]
        # "blank image (row 17)" and "blank image (row 90)" are one reason.
        by_reason = collections.Counter(reason.split(" (")[0] for _, reason, _ in entries)
        of_views = collections.Counter(reason.split(" (")[0] for _, reason, view in entries if view is not None)
        return {"products": self.count(split), "views": sum(view is not None for _, _, view in entries),
                "by_reason": dict(by_reason), "views_by_reason": dict(of_views),
                "product_ids": [p for p, _, view in entries if view is None],  # every one
                "examples": [{"product": p, "reason": r, **({"view": v} if v is not None else {})}
                             for p, r, v in entries[:MAX_LISTED]]}

    def finish(self, split: str, metadata: dict) -> None:
        """Logs the split's counts and stores its summary in the builder's metadata."""
        summary = self.summary(split)
        if summary["products"] or summary["views"]:
            logging.warning("%s/%s: skipped %d products and %d views of kept products: %s (listed in "
                            "metadata.json)", self.dataset, split, summary["products"], summary["views"],
                            summary["by_reason"])
        metadata.setdefault("skipped", {})[split] = summary


def describe(summary: dict[str, Any]) -> str:
    """A split's summary in words, products and views apart: 'skipped 2 products (empty brand: 1,
    no usable image: 1) and 1 view of a kept product (missing image: 1)'."""
    of_views = collections.Counter(summary.get("views_by_reason", {}))
    of_products = collections.Counter(summary["by_reason"]) - of_views
    products, views = summary["products"], summary["views"]
    parts = [f"{products:,} product{'s' * (products != 1)} ({_reasons(of_products)})" if products else "",
             f"{views:,} view{'s' * (views != 1)} of {'a kept product' if views == 1 else 'kept products'} "
             f"({_reasons(of_views)})" if views else ""]
    return "skipped " + (" and ".join(filter(None, parts)) or "nothing")


def _reasons(counts: collections.Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
