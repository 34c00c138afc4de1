"""SynthFashion: procedural product photos and FashionGen-like records, with no download.

Built so that E²'s claim is measurable on a CPU. The dominant look of a product (its
sub-category's silhouette and its colour) is shared by many products, while the entities E²
attends to live in small regions:

- **brand**: a small logo on the chest (a glyph shape in a colour, one pair per brand);
- **composition**: a care label inside the neck on the back view (stripes: count and colour);
- **season**: a small hang tag at the hem (colour and number of dots).

Products come in families of the same sub-category and colour that differ only in those
details (hard negatives). Each product has `views` images: front, back, and a detail crop of
the chest and label, and the box of each detail in each view (`render`). The details are
painted anti-aliased, so each one's value can be read from every view that shows it at each
variant's resolution (`readability`, tested). Everything is a pure function of (config,
split, index): the same seed gives the same dataset, byte for byte, and train and validation
products are disjoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from e2_jax.data import fashion_gen_h5

SUBCATEGORIES = ("T-SHIRTS", "SHIRTS", "SWEATERS", "DRESSES", "SKIRTS", "PANTS", "JACKETS & COATS", "TOPS")
GARMENT_NOUN = {"T-SHIRTS": "t-shirt", "SHIRTS": "shirt", "SWEATERS": "sweater", "DRESSES": "dress",
                 "SKIRTS": "skirt", "PANTS": "trousers", "JACKETS & COATS": "coat", "TOPS": "top"}
_CATEGORY = {"T-SHIRTS": "TOPS", "SHIRTS": "TOPS", "SWEATERS": "KNITWEAR", "DRESSES": "DRESSES",
             "SKIRTS": "SKIRTS", "PANTS": "PANTS", "JACKETS & COATS": "OUTERWEAR", "TOPS": "TOPS"}
COLOURS = {"black": (0.12, 0.12, 0.13), "white": (0.93, 0.93, 0.9), "navy": (0.12, 0.17, 0.38),
           "red": (0.72, 0.12, 0.13), "olive": (0.42, 0.45, 0.2), "camel": (0.76, 0.6, 0.4),
           "grey": (0.55, 0.56, 0.58), "burgundy": (0.45, 0.1, 0.2)}
COMPOSITIONS = ("100% cotton.", "96% cotton, 4% elastane.", "100% wool.", "70% wool, 30% polyamide.",
                "100% polyester.", "55% linen, 45% cotton.", "100% silk.", "80% viscose, 20% nylon.",
                "100% cashmere.", "60% cotton, 40% polyester.")
SEASONS = ("SS2015", "FW2015", "SS2016", "FW2016", "SS2017", "FW2017")
_GLYPHS = ("disc", "square", "triangle", "diamond", "cross", "ring")
_ACCENTS = ((0.95, 0.8, 0.1), (0.1, 0.65, 0.9), (0.95, 0.35, 0.6), (0.2, 0.8, 0.35))
_BRAND_FIRST = ("Maison", "Atelier", "Studio", "Casa", "Haus", "Officine")
_BRAND_LAST = ("Vérane", "Kobo", "Lindqvist", "Arden", "Solène", "Mirö", "Baxter", "Orsini")
_FITS = ("Relaxed-fit", "Slim-fit", "Oversized", "Cropped", "Regular-fit")
_DETAILS = ("Tonal stitching.", "Dropped shoulders.", "Ribbed cuffs and hem.", "Welt pockets.",
            "Concealed button closure.", "Raw-edge hem.", "Logo at chest.", "Care label at neck.")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """What SynthFashion generates. Difficulty: `detail_size` (logo, label and tag size as a
    fraction of the image side), `num_brands` (at most 24), `clutter` (background texture)."""

    image_size: int = 128
    views: int = 3
    num_train: int = 10_000
    num_validation: int = 1_000
    num_brands: int = 24
    detail_size: float = 0.14
    clutter: float = 0.25
    family_size: int = 6  # products sharing sub-category and colour, differing in details
    seed: int = 0

    def replace(self, **changes: Any) -> SynthConfig:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if not 1 <= self.num_brands <= len(_GLYPHS) * len(_ACCENTS):
            raise ValueError(f"num_brands must be in 1..{len(_GLYPHS) * len(_ACCENTS)}, got {self.num_brands}")
        if not 1 <= self.views <= 3:
            raise ValueError(f"views must be 1 (front), 2 (+back) or 3 (+detail), got {self.views}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")


# The TFDS builder's configs (`synth_fashion/<name>`): what each renders and for what.
VARIANTS = {
    "default": ("128 px, 10,000 + 1,000 products", SynthConfig()),
    "medium": ("64 px, 4,096 + 1,024 products (the seed study)",
               SynthConfig(image_size=64, num_train=4096, num_validation=1024)),
    "small": ("64 px, 1,024 + 256 products", SynthConfig(image_size=64, num_train=1024, num_validation=256)),
    # At 32 px a detail of 0.14 of the side (4.5 px) cannot be read (test_synth_fashion's readability).
    "tiny": ("32 px, 64 + 16 products, details 0.25 of the side (tests)",
             SynthConfig(image_size=32, num_train=64, num_validation=16, detail_size=0.25)),
}


def brand_names(n: int) -> list[str]:
    names = [f"{first} {last}" for last in _BRAND_LAST for first in _BRAND_FIRST]
    return names[:n]


def _split_offset(split: str, config: SynthConfig) -> int:
    # Validation products are numbered after the training ones: disjoint by construction.
    return {"train": 0, "validation": config.num_train}[split]


def product_record(config: SynthConfig, split: str, index: int) -> dict[str, Any]:
    """The attributes and texts of one product (no pixels)."""
    product_id = _split_offset(split, config) + index
    rng = np.random.default_rng([config.seed, product_id, 0])
    family = np.random.default_rng([config.seed, product_id // config.family_size, 1])
    subcategory = SUBCATEGORIES[family.integers(len(SUBCATEGORIES))]
    colour = list(COLOURS)[family.integers(len(COLOURS))]
    brand_id = int(rng.integers(config.num_brands))
    composition_id = int(rng.integers(len(COMPOSITIONS)))
    season_id = int(rng.integers(len(SEASONS)))
    garment = GARMENT_NOUN[subcategory]
    details = " ".join(rng.choice(_DETAILS, size=int(rng.integers(1, 4)), replace=False))
    return {
        "product_id": product_id,
        "subcategory_id": SUBCATEGORIES.index(subcategory), "colour_id": list(COLOURS).index(colour),
        "brand_id": brand_id, "composition_id": composition_id, "season_id": season_id,
        "name": f"{colour.capitalize()} {garment}",
        "description": f"{rng.choice(_FITS)} {garment} in {colour}. {details}",
        "caption": f"a {colour} {garment}",  # generic: what plain CLIP pre-training would see
        "brand": brand_names(config.num_brands)[brand_id],
        "category": _CATEGORY[subcategory],
        "subcategory": subcategory,
        "composition": COMPOSITIONS[composition_id],
        "season": SEASONS[season_id],
        "gender": "WOMEN" if subcategory in ("DRESSES", "SKIRTS") or rng.random() < 0.5 else "MEN",
    }


# --- Rendering ----------------------------------------------------------------------------------


def _silhouette(subcategory: str, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mask of the garment in unit coordinates (y down, x right, both in [0, 1])."""
    cx = np.abs(x - 0.5)
    if subcategory in ("T-SHIRTS", "TOPS", "SHIRTS", "SWEATERS", "JACKETS & COATS"):
        bottom = {"JACKETS & COATS": 0.95, "TOPS": 0.72}.get(subcategory, 0.85)
        sleeve_end = {"T-SHIRTS": 0.38, "TOPS": 0.3}.get(subcategory, 0.8)
        body = (cx < 0.2) & (y > 0.15) & (y < bottom)
        sleeves = (cx < 0.2 + 0.22 * np.clip((y - 0.15) / 0.1, 0, 1)) & (y > 0.15) & (y < sleeve_end) & (cx > 0.15)
        sleeves &= cx < 0.2 + 0.12 + 0.08 * (subcategory in ("SHIRTS", "SWEATERS", "JACKETS & COATS"))
        neck = (cx < 0.07) & (y < 0.2)
        return (body | sleeves) & ~neck
    if subcategory == "DRESSES":
        half_width = 0.12 + 0.25 * np.clip((y - 0.3) / 0.65, 0, 1)
        return (cx < half_width) & (y > 0.12) & (y < 0.95) & ~((cx < 0.06) & (y < 0.18))
    if subcategory == "SKIRTS":
        return (cx < 0.15 + 0.22 * np.clip((y - 0.3) / 0.5, 0, 1)) & (y > 0.3) & (y < 0.8)
    # PANTS: a waistband and two legs.
    legs = (cx < 0.22) & (cx > 0.02 + 0.02 * np.clip((y - 0.3) / 0.6, 0, 1)) & (y > 0.25) & (y < 0.95)
    return legs | ((cx < 0.22) & (y > 0.12) & (y < 0.32))


def _glyph(shape: str, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mask of a logo glyph in coordinates centred on 0 with radius 1."""
    r = np.hypot(x, y)
    return {
        "disc": r < 1,
        "square": np.maximum(np.abs(x), np.abs(y)) < 0.85,
        "triangle": (y < 0.8) & (y > -0.9 + 2 * np.abs(x)),
        "diamond": np.abs(x) + np.abs(y) < 1,
        "cross": (np.minimum(np.abs(x), np.abs(y)) < 0.3) & (np.maximum(np.abs(x), np.abs(y)) < 1),
        "ring": (r < 1) & (r > 0.55),
    }[shape]


class _Canvas:
    SAMPLES = 4  # a detail's pixel takes its colour in proportion to cover, from 4 x 4 samples

    def __init__(self, size: int) -> None:
        self.size = size
        self.y, self.x = (np.mgrid[0:size, 0:size] + 0.5) / size
        self.pixels = np.zeros((size, size, 3), np.float32)

    def paint(self, shape: Callable[[np.ndarray, np.ndarray], np.ndarray], colour, extent) -> None:
        """Paints `shape` (unit y, x -> bool) in `colour`, anti-aliased: each pixel of `extent`
        (y0, x0, y1, x1, in unit coordinates) is blended by the part of it the shape covers, so a
        detail's value survives any sub-pixel position (a 0.7 px stripe is a fainter stripe, not
        a stripe that vanishes or doubles with the jitter)."""
        size, n = self.size, self.SAMPLES
        r0, c0 = max(int(np.floor(extent[0] * size)), 0), max(int(np.floor(extent[1] * size)), 0)
        r1, c1 = min(int(np.ceil(extent[2] * size)), size), min(int(np.ceil(extent[3] * size)), size)
        if r1 <= r0 or c1 <= c0:
            return
        sub = (np.arange(n) + 0.5) / n
        ys = ((np.arange(r0, r1)[:, None] + sub).ravel() / size)[:, None]
        xs = ((np.arange(c0, c1)[:, None] + sub).ravel() / size)[None, :]
        cover = shape(ys, xs).reshape(r1 - r0, n, c1 - c0, n).mean(axis=(1, 3), dtype=np.float32)[..., None]
        region = self.pixels[r0:r1, c0:c1]
        region += cover * (np.asarray(colour, np.float32) - region)

    def paint_box(self, cy: float, cx: float, h: float, w: float, colour) -> tuple[float, float, float, float]:
        box = _box((cy, cx), h, w)
        self.paint(lambda y, x: (np.abs(y - cy) < h / 2) & (np.abs(x - cx) < w / 2), colour, box)
        return box


def _background(canvas: _Canvas, rng: np.random.Generator, clutter: float) -> None:
    base = 0.82 + 0.12 * rng.random(3)
    gradient = 0.08 * (canvas.y[..., None] - 0.5)
    blobs = np.zeros_like(canvas.y)
    for _ in range(int(6 * clutter * 4)):
        cy, cx, s = rng.random(), rng.random(), 0.03 + 0.1 * rng.random()
        blobs += np.exp(-((canvas.y - cy) ** 2 + (canvas.x - cx) ** 2) / (2 * s * s)) * rng.uniform(-1, 1)
    canvas.pixels[:] = base + gradient + clutter * 0.25 * blobs[..., None]


def _garment(canvas: _Canvas, record: dict, rng: np.random.Generator, back: bool) -> tuple[float, float]:
    """Draws the garment, slightly jittered; returns its (scale, shift) for the details."""
    scale, shift = 1 + 0.06 * rng.standard_normal(), 0.03 * rng.standard_normal()
    y, x = (canvas.y - 0.5) / scale + 0.5, (canvas.x - 0.5 - shift) / scale + 0.5
    mask = _silhouette(SUBCATEGORIES[record["subcategory_id"]], y, x)
    colour = np.array(list(COLOURS.values())[record["colour_id"]], np.float32)
    shade = 1 - 0.12 * (x - 0.5) - (0.05 if back else 0) + 0.03 * np.sin(y * 40)
    canvas.pixels[mask] = np.clip(colour * shade[mask, None], 0, 1)
    return scale, shift


def _anchor(subcategory: str, part: str) -> tuple[float, float]:
    """Unit (y, x) of the logo (chest), the care label (neck) and the hang tag (hem)."""
    top = {"SKIRTS": 0.36, "PANTS": 0.2}.get(subcategory, 0.3)
    hem = {"SKIRTS": 0.74, "PANTS": 0.88, "TOPS": 0.66}.get(subcategory, 0.8)
    return {"logo": (top + 0.02, 0.6), "label": (top - 0.06, 0.5), "tag": (hem, 0.36)}[part]


def _place(anchor, scale: float, shift: float) -> tuple[float, float]:
    return (anchor[0] - 0.5) * scale + 0.5, (anchor[1] - 0.5) * scale + 0.5 + shift


def _logo(canvas: _Canvas, record: dict, at, size: float) -> tuple[float, float, float, float]:
    """Logo: a glyph (6 shapes) in an accent colour (4) on a white patch (24 brands)."""
    glyph = _GLYPHS[record["brand_id"] % len(_GLYPHS)]
    accent = _ACCENTS[record["brand_id"] // len(_GLYPHS)]
    radius = size / 2
    box = canvas.paint_box(at[0], at[1], size * 1.15, size * 1.15, (0.97, 0.97, 0.97))
    canvas.paint(lambda y, x: _glyph(glyph, (y - at[0]) / radius, (x - at[1]) / radius), accent, box)
    return box


def _label(canvas: _Canvas, record: dict, at, size: float) -> tuple[float, float, float, float]:
    """Care label: white, with 1-5 stripes in one of two colours (10 compositions). Each stripe
    is an eighth of the label's height, a sixteenth apart, filled from the top: as thick at any
    count, so the striped area grows with the count."""
    h, w = size * 1.1, size * 0.9
    box = canvas.paint_box(at[0], at[1], h, w, (0.98, 0.98, 0.95))
    stripes = record["composition_id"] % 5 + 1
    colour = (0.1, 0.1, 0.1) if record["composition_id"] < 5 else (0.85, 0.15, 0.15)
    for i in range(stripes):
        canvas.paint_box(box[0] + h * (2 + 3 * i) / 16, at[1], h / 8, w * 0.7, colour)
    return box


def _tag(canvas: _Canvas, record: dict, at, size: float) -> tuple[float, float, float, float]:
    """Hang tag: one of three colours with one or two dots (6 seasons)."""
    colour = ((0.95, 0.55, 0.1), (0.3, 0.5, 0.95), (0.55, 0.85, 0.3))[record["season_id"] % 3]
    box = canvas.paint_box(at[0], at[1], size, size * 0.8, colour)
    dots = record["season_id"] // 3 + 1
    for i in range(dots):
        cx = at[1] - size * 0.2 + size * 0.4 * i if dots == 2 else at[1]
        canvas.paint(lambda y, x, cx=cx: np.hypot(y - at[0], x - cx) < size * 0.14, (0.05, 0.05, 0.05), box)
    return box


DETAILS = ("logo", "label", "tag")  # the small details, in the order of `render`'s boxes
DETAIL_FIELDS = ("brand", "composition", "season")  # the tag each detail shows
DETAIL_BOXES = "detail_boxes"  # the example's field holding `render`'s boxes
VIEWS = ("front", "back", "detail")
# Which views show which detail, by design.
SHOWN = (("logo", ("front", "detail")), ("label", ("back", "detail")), ("tag", ("front", "back")))
_ABSENT = (-1.0, -1.0, -1.0, -1.0)


def _box(at, h: float, w: float) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) in unit coordinates of a detail of size (h, w) centred at `at`."""
    return at[0] - h / 2, at[1] - w / 2, at[0] + h / 2, at[1] + w / 2


def render(config: SynthConfig, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(images, boxes): uint8 [views, size, size, 3], front (logo, tag), back (care label,
    tag), detail crop (logo, label); float32 [views, 3, 4], each detail's box (`DETAILS`
    order; y0, x0, y1, x1 in unit coordinates of the view), -1 where a view does not show it."""
    rng = np.random.default_rng([config.seed, record["product_id"], 2])
    subcategory = SUBCATEGORIES[record["subcategory_id"]]
    size = config.detail_size
    views, boxes = [], []
    for view in range(min(config.views, 2)):
        canvas = _Canvas(config.image_size)
        _background(canvas, rng, config.clutter)
        scale, shift = _garment(canvas, record, rng, back=view == 1)
        box = dict.fromkeys(DETAILS)  # None: not in this view
        if view == 0:
            box["logo"] = _logo(canvas, record, _place(_anchor(subcategory, "logo"), scale, shift), size * scale)
        else:
            box["label"] = _label(canvas, record, _place(_anchor(subcategory, "label"), scale, shift), size * scale)
        box["tag"] = _tag(canvas, record, _place(_anchor(subcategory, "tag"), scale, shift), size * 0.8 * scale)
        views.append(canvas.pixels)
        boxes.append([_zoom(box[d], 0.0, 0.0, 1.0) for d in DETAILS])  # clipped to the view
    if config.views == 3:
        # Detail: the upper garment of the front view, twice as large, with the care label
        # folded out beside the logo.
        canvas = _Canvas(config.image_size)
        canvas.pixels[:] = views[0]
        box = dict(zip(DETAILS, boxes[0], strict=True))  # the front view's (the crop is of it)
        box["label"] = _label(canvas, record, _place(_anchor(subcategory, "logo"), 1.0, -0.2), size)
        half = config.image_size // 2
        top = int(np.clip((_anchor(subcategory, "logo")[0] - 0.25) * config.image_size, 0, half))
        left = half // 2
        crop = canvas.pixels[top : top + half, left : left + half]
        views.append(np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1))
        side = config.image_size
        boxes.append([_zoom(box[d], top / side, left / side, half / side) for d in DETAILS])
    noise = rng.normal(0, 0.01, (len(views), config.image_size, config.image_size, 3))
    images = (np.clip(np.stack(views) + noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    return images, np.asarray([[_ABSENT if b is None else b for b in view] for view in boxes], np.float32)


def _zoom(box, top: float, left: float, side: float) -> tuple[float, float, float, float] | None:
    """A box of the full view in the coordinates of its crop [top, top + side) x [left, left +
    side), clipped to it; None (absent) unless its centre lies in the crop."""
    if box is None:
        return None
    y0, x0, y1, x1 = (box[0] - top) / side, (box[1] - left) / side, (box[2] - top) / side, (box[3] - left) / side
    if not (0 <= (y0 + y1) / 2 < 1 and 0 <= (x0 + x1) / 2 < 1):
        return None
    return max(y0, 0.0), max(x0, 0.0), min(y1, 1.0), min(x1, 1.0)


def readability(config: SynthConfig, fit: int = 600, test: int = 300, grid: int = 12,
                ridge: float = 1.0) -> dict[tuple[str, str], float]:
    """{(detail, view): accuracy} of reading each detail's value (brand, composition, season)
    from each view that shows it, with a linear classifier on pixels: the detail's box (a pixel
    wider each side) cropped from the rendered view, resized to `grid` x `grid`, ridge
    regression onto the one-hot value, fitted on `fit` training products and scored on `test`
    validation products. It is told where the detail is (its box): it measures whether the
    value survives the jitter and the rendering, not whether a model finds it."""
    labels = {detail: f"{field}_id" for detail, field in zip(DETAILS, DETAIL_FIELDS, strict=True)}
    config = config.replace(num_train=fit, num_validation=test)  # disjoint products, any counts
    side = config.image_size

    def crops(split: str, count: int) -> dict[tuple[str, str], tuple[list, list]]:
        out: dict[tuple[str, str], tuple[list, list]] = {}
        for i in range(count):
            example = product(config, split, i)
            for v, (image, boxes) in enumerate(zip(example["images"], example[DETAIL_BOXES], strict=True)):
                for detail, box in zip(DETAILS, boxes, strict=True):
                    if box[0] < 0:
                        continue
                    y0, x0 = (max(round(c * side) - 1, 0) for c in box[:2])
                    y1, x1 = (min(round(c * side) + 1, side) for c in box[2:])
                    crop = Image.fromarray(image[y0:y1, x0:x1]).resize((grid, grid), Image.BILINEAR)
                    features, values = out.setdefault((detail, VIEWS[v]), ([], []))
                    features.append(np.asarray(crop, np.float64).ravel() / 255)
                    values.append(example[labels[detail]])
        return out

    train, held_out = crops("train", fit), crops("validation", test)
    accuracy = {}
    for key, (features, values) in train.items():
        x = np.asarray(features)
        mean = x.mean(axis=0)
        x = x - mean
        targets = np.eye(max(values) + 1)[values]
        weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ targets)
        test_x, test_values = np.asarray(held_out[key][0]) - mean, np.asarray(held_out[key][1])
        accuracy[key] = float(((test_x @ weights).argmax(axis=1) == test_values).mean())
    return accuracy


def readability_table() -> str:
    """`readability` of every variant, as docs/data.md's Markdown table (percent)."""
    lines = ["| variant | px | detail | " + " | ".join(f"{d} ({v})" for d, views in SHOWN for v in views) + " |",
             "|---|---|---|" + "---|" * sum(len(views) for _, views in SHOWN)]
    for name, (_, config) in VARIANTS.items():
        accuracy = readability(config)
        lines.append(f"| {name} | {config.image_size} | {config.detail_size} | "
                     + " | ".join(f"{100 * accuracy[(d, v)]:.1f}" for d, views in SHOWN for v in views) + " |")
    return "\n".join(lines)



def product(config: SynthConfig, split: str, index: int) -> dict[str, Any]:
    """One product: its record plus `render`'s `images` (uint8 [views, size, size, 3]) and
    `detail_boxes` (float32 [views, 3, 4])."""
    record = product_record(config, split, index)
    images, boxes = render(config, record)
    return {**record, "images": images, DETAIL_BOXES: boxes}


def num_products(config: SynthConfig, split: str) -> int:
    return {"train": config.num_train, "validation": config.num_validation}[split]


def contact_sheet(config: SynthConfig, indices: list[int], split: str = "train") -> tuple[np.ndarray, list[dict]]:
    """A picture of some products (one row each: front, back, detail) and their records."""
    products = [product(config, split, i) for i in indices]
    rows = [np.concatenate(list(p["images"]), axis=1) for p in products]
    return np.concatenate(rows, axis=0), [{k: v for k, v in p.items() if k != "images"} for p in products]


_VIEW_POSES = ("id_gridfs_1", "id_gridfs_2", "id_gridfs_3")  # FashionGen's pose names


def write_fashiongen_h5(config: SynthConfig, directory: str | Path, split: str, *, shuffle_rows: bool = True,
                        chunk_products: int = 64) -> Path:
    """Writes a split as FashionGen's h5 file (`fashiongen_256_256_<split>.h5`, 256 px, one row
    per view, texts latin-1), so the `fashion_gen` builder can be exercised on realistic data.

    With `shuffle_rows` the rows are in a random order (a product's views are not contiguous,
    as the FashionGen reader must not assume they are); rendering and writing go in chunks of
    `chunk_products`, so memory stays bounded for any size."""
    config = config.replace(image_size=256)  # the FashionGen format is 256 x 256
    count = num_products(config, split)
    records = [product_record(config, split, i) for i in range(count)]
    rows = [(i, view) for i in range(count) for view in range(config.views)]
    if shuffle_rows:
        rows = [rows[j] for j in np.random.default_rng([config.seed, 3]).permutation(len(rows))]
    first_rows = [_fashiongen_row(r, 0) for r in records]
    lengths = {t: max(len(row[t].encode("latin-1")) for row in first_rows) for t in fashion_gen_h5.TEXT_FIELDS
               if t != "pose"} | {"pose": max(map(len, _VIEW_POSES))}
    path = Path(directory) / fashion_gen_h5.file_name(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fashion_gen_h5.Writer(path, lengths) as writer:
        for start in range(0, len(rows), chunk_products * config.views):
            batch = rows[start : start + chunk_products * config.views]
            images = {i: render(config, records[i])[0] for i in sorted({i for i, _ in batch})}
            writer.append([{**_fashiongen_row(records[i], view), "image": images[i][view],
                            "index": start + k, "index_2": records[i]["product_id"]}
                           for k, (i, view) in enumerate(batch)])
    return path


def _fashiongen_row(record: dict, view: int) -> dict[str, Any]:
    """A FashionGen row of a product's view, without the image."""
    return {"product_id": record["product_id"], "msrp": 50.0 + 10 * (record["product_id"] % 40),
            **{k: record[k] for k in ("name", "description", "brand", "category", "subcategory", "composition",
                                      "season", "gender")},
            "concat_description": f"{record['name']} {record['description']}", "department": "CLOTHING",
            "pose": _VIEW_POSES[view]}


def main(argv: list[str] | None = None) -> None:
    """`python -m e2_jax.data.synth_fashion --out sheet.png`: sample products and records;
    `--fashiongen-h5 DIR`: write the splits as FashionGen h5 files instead."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m e2_jax.data.synth_fashion", description=main.__doc__)
    parser.add_argument("--out", help="PNG file to write (a contact sheet)")
    parser.add_argument("--indices", default="0,1,2,6,12,18,24,30",
                        help="products to show (0-2 share a family: the same look, other details)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--fashiongen-h5", metavar="DIR", help="write fashiongen_256_256_{train,validation}.h5 here")
    parser.add_argument("--num-train", type=int, default=SynthConfig.num_train)
    parser.add_argument("--num-validation", type=int, default=SynthConfig.num_validation)
    parser.add_argument("--readability", action="store_true",
                        help="print how well each detail reads from each view, per variant (`readability`)")
    args = parser.parse_args(argv)
    if args.readability:
        print(readability_table())
        return
    if args.fashiongen_h5:
        config = SynthConfig(num_train=args.num_train, num_validation=args.num_validation)
        for split in ("train", "validation"):
            print(write_fashiongen_h5(config, args.fashiongen_h5, split))
        return
    if not args.out:
        parser.error("give --out (a contact sheet) or --fashiongen-h5 (FashionGen-format files)")

    indices = [int(i) for i in args.indices.split(",")]
    sheet, records = contact_sheet(SynthConfig(image_size=args.image_size), indices)
    Image.fromarray(np.asarray(sheet, np.uint8)).save(args.out)
    fields = ("product_id", "subcategory", "name", "brand", "composition", "season", "description")
    print("| " + " | ".join(fields) + " |")
    print("|" + "---|" * len(fields))
    for record in records:
        print("| " + " | ".join(str(record[f]) for f in fields) + " |")


if __name__ == "__main__":
    main()
