"""The retrieval protocols by name (E2_METHOD.md section 6), as big_vision registers its
evaluators: each is registered here with whether it needs every view's embedding, what it says
it does, and how it scores a split's embeddings. `eval.protocols` in the config names them
(`Protocols`, the `eval` fields, resolved by `spec.resolve`);
`evaluate.retrieval_report` embeds the split once and runs each. Adding a protocol touches this
file only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from e2_jax.data.preprocessing import FASHIONGEN_TEXT, Preprocessing
from e2_jax.errors import ConfigError
from e2_jax.evaluation import retrieval


@dataclasses.dataclass(frozen=True)
class Split:
    """A split's image embeddings, computed once for every protocol: the first view of each
    product, or every view where a protocol asks for it."""

    image: np.ndarray  # [M, D] one row per (product, view) embedded
    product: np.ndarray  # [M] each row's product
    view: np.ndarray  # [M] each row's view
    views: np.ndarray  # [n] views per product
    scan: dict[str, np.ndarray]  # the split's scanned fields (sample-100's category)

    @functools.cached_property
    def _row(self) -> dict[tuple[int, int], int]:
        """{(product, view): row}, built once for every protocol and text."""
        return {(int(p), int(v)): r for r, (p, v) in enumerate(zip(self.product, self.view, strict=True))}

    def rows(self, views: np.ndarray) -> np.ndarray:
        """The rows of product i's view views[i], for every product."""
        return np.array([self._row[(i, int(v))] for i, v in enumerate(views)])


Score = Callable[[Split, np.ndarray, "Protocols"], tuple[dict[str, float], dict[str, int]]]


@dataclasses.dataclass(frozen=True)
class Protocol:
    every_view: bool  # needs every view of every product embedded
    describe: Callable[[Protocols], str]  # what it does, as configured
    score: Score  # (split, text embeddings [n, D], config) -> (metrics, counts)
    ran: Callable[[Protocols, dict[str, int]], str] | None = None  # what it did, from its counts


REGISTRY: dict[str, Protocol] = {}


def register(name: str, *, every_view: bool, describe: Callable[[Protocols], str],
             ran: Callable[[Protocols, dict[str, int]], str] | None = None) -> Callable[[Score], Score]:
    def add(score: Score) -> Score:
        REGISTRY[name] = Protocol(every_view, describe, score, ran)
        return score
    return add


def _field(p: Protocols) -> str:
    return p.sample_field or "any category"


@register("full_candidate", every_view=False,
          describe=lambda p: "one image (the first view) and one text per product, all against all (the authors')")
def _full_candidate(split: Split, text: np.ndarray, p: Protocols):
    return retrieval.full_candidate(split.image[split.rows(np.zeros(len(split.views), np.int64))], text), {}


@register("full_gallery", every_view=True,
          describe=lambda p: "every image of every product against one text per product; for text->image any view "
                             "of the product counts (FashionSAP's)")
def _full_gallery(split: Split, text: np.ndarray, p: Protocols):
    return retrieval.full_gallery(split.image, split.product, text), {}


SAMPLE_DRAWS = ("ours", "authors")


def _sample_100_describe(p: Protocols) -> str:
    if p.sample_draw == "authors":
        return (f"every product a query, each against at most {p.sample_negatives} negatives of the same {_field(p)} "
                "(no top-up), a random view as each product's image (the E² authors' code)")
    return (f"{p.sample_queries} query products, each against {p.sample_negatives} negatives of the same "
            f"{_field(p)} (topped up from others when too few), a random view as each product's image "
            "(FashionBERT/FashionSAP's)")


def _sample_100_ran(p: Protocols, counts: dict[str, int]) -> str:
    """What sample-100 did on this split, from what ran (not what was asked)."""
    queries, products = counts["sample_100_queries"], counts["products"]
    if p.sample_draw == "authors":
        return (f"every product ({queries:,}) a query, each against at most {p.sample_negatives} negatives "
                f"of the same {_field(p)}, no top-up ({counts['sample_100_short']:,} queries had fewer); a random view "
                "as each product's image (the E² authors' draw)")
    asked = "" if queries == p.sample_queries else f" (of {p.sample_queries:,} asked: the split " \
                                                   f"has {products:,} products)"
    return (f"{queries:,} query products{asked}, each against {p.sample_negatives} negatives of the same "
            f"{_field(p)}; {counts['sample_100_topped_up']:,} of them topped up from other values of {_field(p)} (too "
            "few products of their own); a random view as each product's image (FashionBERT/FashionSAP's)")


def sampled_views(views: np.ndarray, seed: int) -> np.ndarray:
    """One view per product, drawn from `seed` (sample-100's query and candidate images)."""
    return np.random.default_rng([seed, 100]).integers(0, np.maximum(views, 1))


@register("sample_100", every_view=True, describe=_sample_100_describe, ran=_sample_100_ran)
def _sample_100(split: Split, text: np.ndarray, p: Protocols):
    n = len(split.views)
    category = split.scan[p.sample_field] if p.sample_field else np.zeros(n, np.int64)
    if p.sample_draw == "authors":
        candidates = retrieval.sample_100_candidates_authors(category, negatives=p.sample_negatives, seed=p.seed)
    else:
        candidates = retrieval.sample_100_candidates(category, queries=p.sample_queries,
                                                     negatives=p.sample_negatives, seed=p.seed)
    sampled = split.image[split.rows(sampled_views(split.views, p.seed))]
    counts = {"sample_100_queries": len(candidates), "sample_100_topped_up": retrieval.topped_up(category, candidates),
              "sample_100_short": int((candidates[:, -1] < 0).sum())}  # fewer negatives (authors' draw)
    return retrieval.sample_100(sampled, text, candidates), counts


@dataclasses.dataclass(frozen=True)
class Protocols:
    """Which evaluations to run (the `eval` fields of the config)."""

    protocols: tuple[str, ...] = ("full_candidate",)
    texts: dict[str, str] = dataclasses.field(default_factory=lambda: {"tags": FASHIONGEN_TEXT})
    sample_field: str = "subcategory"  # "" = negatives drawn from every other product
    sample_queries: int = 1000
    sample_negatives: int = 100
    seed: int = 0
    sample_draw: str = "ours"  # "authors": the E² authors' draw (retrieval.sample_100_candidates_authors)

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in REGISTRY]
        if unknown:
            raise ConfigError(f"unknown evaluation protocols {unknown}; known: {tuple(REGISTRY)}")
        if not self.texts:
            raise ConfigError("no evaluation texts")
        if self.sample_draw not in SAMPLE_DRAWS:
            raise ConfigError(f"eval.sample_draw must be one of {SAMPLE_DRAWS}, got {self.sample_draw!r}")

    def describe(self) -> dict[str, str]:
        """What each protocol does, as configured (the report says what ran: evaluate.retrieval_report)."""
        return {p: REGISTRY[p].describe(self) for p in self.protocols}

    def fields(self) -> list[str]:
        """The text fields these protocols read (their texts' and sample-100's)."""
        named = [name for text in self.texts.values() for name in Preprocessing(text_format=text).fields()]
        if "sample_100" in self.protocols and self.sample_field:
            named.append(self.sample_field)
        return list(dict.fromkeys(named))
