"""SynthFashion-CIR: composed-retrieval triplets made from SynthFashion, in FashionIQ's layout.

Each reference is a SynthFashion validation product's front view (the logo and the season tag
show on it); its target is the same product with one or two attributes changed, drawn again
from another pose (a new product id seeds the jitter): the colour, the garment (within its
category), the logo's brand or the season tag. The modification names each change as a
FashionIQ annotator might ("is navy", "is a shirt", "has a Maison Kobo logo", "has an SS2017
tag"), one caption per change. Galleries, per category (tops, layers, bottoms), hold every
reference and target image of that category, so a query's own reference is a distractor, as in
FashionIQ. Written as FashionIQ's files (captions/, image_splits/, images/), the `fashion_iq`
code reads it: the TFDS builder `synth_fashion_cir/{images,triplets}` writes this layout and
builds it, no download. Deterministic: the same arguments give the same files.

    python -m e2_jax.data.synth_cir OUT [--variant medium --triplets 600]   # the layout alone
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from e2_jax.data import synth_fashion
from e2_jax.data.synth_fashion import COLOURS, GARMENT_NOUN, SEASONS, SUBCATEGORIES, SynthConfig

CATEGORIES = {"tops": ("T-SHIRTS", "SHIRTS", "TOPS"), "layers": ("SWEATERS", "JACKETS & COATS"),
              "bottoms": ("DRESSES", "SKIRTS", "PANTS")}
CHANGES = ("colour", "garment", "brand", "season")
VARIANT, TRIPLETS = "medium", 600  # what the `synth_fashion_cir` builder makes
TARGET_IDS = 10_000_000  # target product ids start here: their own jitter, never a real product's


def category_of(subcategory: str) -> str:
    return next(name for name, members in CATEGORIES.items() if subcategory in members)


def vocabulary(config: SynthConfig) -> dict[str, list[str]]:
    """Each changeable attribute's values as the texts name them (the template recomposer's
    rules; DeCap's captions use the same words)."""
    return {"colour": list(COLOURS), "garment": sorted(set(GARMENT_NOUN.values())),
            "brand": synth_fashion.brand_names(config.num_brands), "season": list(SEASONS)}


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _change(record: dict, change: str, rng: np.random.Generator, config: SynthConfig) -> tuple[dict, str]:
    """The record with `change` applied (a different value, drawn) and its caption."""
    out = dict(record)
    if change == "colour":
        options = [i for i in range(len(COLOURS)) if i != record["colour_id"]]
        out["colour_id"] = int(rng.choice(options))
        return out, f"is {list(COLOURS)[out['colour_id']]}"
    if change == "garment":
        members = CATEGORIES[category_of(record["subcategory"])]
        subcategory = str(rng.choice([s for s in members if s != record["subcategory"]]))
        out["subcategory"], out["subcategory_id"] = subcategory, SUBCATEGORIES.index(subcategory)
        garment = GARMENT_NOUN[subcategory]
        return out, f"is {_article(garment)} {garment}"
    if change == "brand":
        out["brand_id"] = int(rng.choice([i for i in range(config.num_brands) if i != record["brand_id"]]))
        out["brand"] = synth_fashion.brand_names(config.num_brands)[out["brand_id"]]
        return out, f"has {_article(out['brand'])} {out['brand']} logo"
    out["season_id"] = int(rng.choice([i for i in range(len(SEASONS)) if i != record["season_id"]]))
    out["season"] = SEASONS[out["season_id"]]
    return out, f"has {_article(out['season'])} {out['season']} tag"


def triplets(config: SynthConfig, count: int, seed: int = 0) -> list[dict]:
    """`count` triplets from the first `count` validation products: {"reference": record,
    "target": record, "captions": [...], "changes": [...]}, one or two changes each (half and
    half), the changes drawn uniformly."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for index in range(count):
        record = synth_fashion.product_record(config, "validation", index)
        changes = list(rng.choice(CHANGES, size=1 + index % 2, replace=False))
        target, captions = record, []
        for change in changes:
            target, caption = _change(target, change, rng, config)
            captions.append(caption)
        target = {**target, "product_id": TARGET_IDS + index}
        out.append({"reference": record, "target": target, "captions": captions, "changes": changes})
    return out


def image_name(record: dict) -> str:
    return f"sf{record['product_id']:08d}"


def write_layout(out: str | Path, config: SynthConfig, count: int, seed: int = 0) -> Path:
    """Writes FashionIQ's layout of `count` triplets into `out` (the `val` split); returns it."""
    out = Path(out)
    for folder in ("captions", "image_splits", "images"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    front = config.replace(views=1)
    captions: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    gallery: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for triplet in triplets(config, count, seed):
        reference, target = triplet["reference"], triplet["target"]
        category = category_of(reference["subcategory"])
        for record in (reference, target):
            name = image_name(record)
            images, _ = synth_fashion.render(front, record)
            Image.fromarray(images[0]).save(out / "images" / f"{name}.png")
            gallery[category].append(name)
        captions[category].append({"candidate": image_name(reference), "target": image_name(target),
                                   "captions": triplet["captions"], "changes": triplet["changes"]})
    for category in CATEGORIES:
        (out / "captions" / f"cap.{category}.val.json").write_text(json.dumps(captions[category], indent=1))
        (out / "image_splits" / f"split.{category}.val.json").write_text(json.dumps(gallery[category]))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m e2_jax.data.synth_cir", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--variant", default=VARIANT, choices=list(synth_fashion.VARIANTS))
    parser.add_argument("--triplets", type=int, default=TRIPLETS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = synth_fashion.VARIANTS[args.variant][1]
    path = write_layout(args.out, config, min(args.triplets, config.num_validation), args.seed)
    print(f"{path}: {args.triplets} triplets of synth_fashion/{args.variant} in FashionIQ's layout")


if __name__ == "__main__":
    from e2_jax import errors

    errors.main(main)
