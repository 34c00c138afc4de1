"""Selection maps: which image patch each E² selection token picked, in each fusion block.

    python -m e2_jax.visualize --workdir workdirs/e2_b16 --images a.jpg b.png --out maps/
    python -m e2_jax.visualize --workdir workdirs/e2_b16 --split validation --count 16 --out maps/

One PNG per image: the image as the model sees it (resized and centre-cropped), enlarged, with
the patch grid, and one panel per group (sub-category, brand, ...). In a group's panel each of
its selection tokens' picks is a box in the group's colour: solid for the first fusion block,
dashed for the second, labelled with the token (a, b) and block (1, 2). Evaluation is
deterministic (argmax, no Gumbel noise), so a map shows what the model uses at test time.
`--split` draws the first `--count` products of the training run's evaluation split (first
views), named by product index.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from absl import logging
from etils import epath

from e2_jax import distributed, errors, storage, workdir
from e2_jax import images as images_lib
from e2_jax.data import pipeline
from e2_jax.data.preprocessing import Preprocessing
from e2_jax.data.tensorflow_cpu import tf
from e2_jax.errors import DataError
from e2_jax.evaluation import report as report_lib
from e2_jax.evaluation.evaluate import metrics_table
from e2_jax.inference import Encoder
from e2_jax.models.clip import CLIPConfig
from e2_jax.models.e2 import E2Config

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]
SCALE = 4  # the drawn image is this many times the model's input size (at least 256 px)


def _display(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [S, S, 3], the crop the model sees, without normalisation."""
    return pipeline.resize_and_crop(tf.constant(image), size).numpy()


def _dashed_rectangle(draw, box, colour, width: int, dash: int = 6) -> None:
    x0, y0, x1, y1 = box
    for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True), (y0, y1, x0, False), (y0, y1, x1, False)):
        for start in range(int(a), int(b), 2 * dash):
            stop = min(start + dash, b)
            line = [(start, fixed), (stop, fixed)] if horizontal else [(fixed, start), (fixed, stop)]
            draw.line(line, fill=colour, width=width)


def draw_selection_map(image: np.ndarray, picks: np.ndarray, groups: Sequence[tuple[str, int]], patch_size: int,
                       title: str = ""):
    """A PIL image: `image` (uint8 [S, S, 3], as the model saw it), `picks` [2, K] patch indices
    (row-major over the grid, K tokens grouped as `groups` = [(name, tokens)]), one panel per
    group."""
    from PIL import Image, ImageDraw

    size = image.shape[0]
    grid = size // patch_size
    scale = max(SCALE, -(-256 // size))
    cell = patch_size * scale
    base = Image.fromarray(image).resize((size * scale, size * scale), Image.NEAREST)
    header = 18
    panels = Image.new("RGB", (len(groups) * (size * scale + 8), size * scale + 2 * header + 4), "white")
    token = 0
    for g, (name, tokens) in enumerate(groups):
        colour = COLOURS[g % len(COLOURS)]
        panel = base.copy()
        draw = ImageDraw.Draw(panel)
        for i in range(1, grid):  # the patch grid, faint
            draw.line([(i * cell, 0), (i * cell, size * scale)], fill=(200, 200, 200), width=1)
            draw.line([(0, i * cell), (size * scale, i * cell)], fill=(200, 200, 200), width=1)
        for t in range(tokens):
            for block in (0, 1):
                p = int(picks[block, token + t])
                row, col = divmod(p, grid)
                inset = 2 + 3 * block
                box = (col * cell + inset, row * cell + inset, (col + 1) * cell - inset, (row + 1) * cell - inset)
                if block == 0:
                    draw.rectangle(box, outline=colour, width=3)
                else:
                    _dashed_rectangle(draw, box, colour, width=3)
                draw.text((box[0] + 3, box[1] + 1 + 10 * block), f"{'ab'[t % 2] if tokens <= 2 else t}{block + 1}",
                          fill=colour)
        token += tokens
        x = g * (size * scale + 8)
        panels.paste(panel, (x, header))
        ImageDraw.Draw(panels).text((x + 2, 2), name, fill=colour)
    if title:
        ImageDraw.Draw(panels).text((2, size * scale + header + 4), title, fill=(0, 0, 0))
    return panels


def write_selection_maps(encoder, images: Sequence, names: Sequence[str], out: str | os.PathLike) -> list[epath.Path]:
    """One PNG per image into `out`; returns the paths."""
    if encoder.e2.num_tokens == 0 or not encoder.e2.fusion:
        raise ValueError(f"{encoder.source} has no selection tokens or no fusion blocks: nothing picks a patch")
    out = storage.path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = [images_lib.load_image(im) for im in images]
    picks = encoder.image_outputs(arrays).picks
    groups = [(g.name, g.tokens) for g in encoder.e2.groups]
    written = []
    for array, pick, name in zip(arrays, picks, names, strict=True):
        shown = _display(array, encoder.clip.image_size)
        path = out / f"{Path(name).stem}_selection.png"
        png = io.BytesIO()  # via bytes: `out` may be in a bucket
        draw_selection_map(shown, pick, groups, encoder.clip.patch_size, title=name).save(png, format="png")
        path.write_bytes(png.getvalue())
        written.append(path)
    return written


def source_images(source: pipeline.Source, count: int) -> tuple[list[np.ndarray], list[str]]:
    """The first views of the first `count` products of a split."""
    indices = range(min(count, len(source)))
    return [image for image, _ in source.first_views(indices)], [f"{source.split}_{i:05d}" for i in indices]


def run_selection_maps(directory: str | os.PathLike, source: pipeline.Source, clip: CLIPConfig, e2: E2Config,
                       params: dict, where: str, count: int) -> None:
    """`--mode=evaluate`'s selection maps: the first `count` products of the evaluation split,
    in `<workdir>/eval/selection_maps` (E² with fusion blocks; one process: with several, draw
    them afterwards with `python -m e2_jax.visualize`)."""
    if not count or not e2.selection_tokens or not e2.fusion:
        return
    if jax.process_count() > 1:
        logging.info("selection maps are drawn by one process: run python -m e2_jax.visualize --workdir %s "
                     "--split %s", directory, source.split)
        return
    encoder = Encoder(clip, e2, params, source=where)
    images, names = source_images(source, count)
    out = storage.path(directory) / workdir.EVAL_DIR / "selection_maps"
    written = write_selection_maps(encoder, images, names, out)
    logging.info("%d selection maps in %s", len(written), written[0].parent)


def report_page(report: dict, source: pipeline.Source, encoder: Encoder) -> tuple[str, list]:
    """The blocks of an evaluation's `report.html`: its tables, then its example text queries
    (each with its top 5 images, the product's own framed in green), the worst misses (with the
    image they should have found), and, for a model with selection tokens and fusion blocks,
    where its tokens look on those products."""
    blocks = [report_lib.Text(f"Dataset {report.get('dataset', '?')}, split {report.get('split', '?')}: "
                              + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in report["counts"].items())),
              report_lib.Table(*metrics_table(report["metrics"]))]
    blocks += [report_lib.Text(f"{p}: {text}") for p, text in report["protocols"].items()]
    examples = report.get("examples")
    if not examples:
        return f"Evaluation of {report.get('checkpoint', '?')}", blocks
    text_format = report["texts"][examples["text"]]
    fields = ["product_id", *Preprocessing(text_format=text_format).fields()]
    shown = examples["queries"] + examples["misses"]
    wanted = sorted({i for e in shown for i in (e["product"], *(j for j, _ in e["top"]))})
    read = dict(zip(wanted, source.first_views(wanted, fields), strict=True))
    size = 160

    def name(i: int) -> str:
        return read[i][1].get("product_id") or f"product {i}"

    def gallery(example: dict, title: str) -> report_lib.Gallery:
        own = example["product"]
        figures = [report_lib.Figure(report_lib.png(read[j][0], size), f"{k}. {name(j)} ({score:.3f})", j == own)
                   for k, (j, score) in enumerate(example["top"], 1)]
        if own not in [j for j, _ in example["top"]]:
            figures.append(report_lib.Figure(report_lib.png(read[own][0], size),
                                             f"its own image: rank {example['rank'] + 1}", True))
        return report_lib.Gallery(title, tuple(figures))

    def query(example: dict) -> str:
        fields_of = read[example["product"]][1]
        try:
            return text_format.format(**fields_of)
        except KeyError:
            return name(example["product"])

    blocks.append(report_lib.Text(f"Text to image, {examples['text']} texts, first views (full-candidate)", 1))
    blocks += [gallery(e, f"{name(e['product'])}: \"{query(e)}\"") for e in examples["queries"]]
    blocks.append(report_lib.Text("The worst misses: the queries whose own image ranks lowest", 1))
    blocks += [gallery(e, f"{name(e['product'])}: \"{query(e)}\" (own image at rank {e['rank'] + 1})")
               for e in examples["misses"]]
    if encoder.e2.num_tokens and encoder.e2.fusion:
        products = list(dict.fromkeys(e["product"] for e in shown))
        picks = encoder.image_outputs([read[i][0] for i in products]).picks
        groups = [(g.name, g.tokens) for g in encoder.e2.groups]
        maps = [report_lib.Figure(report_lib.png(draw_selection_map(_display(read[i][0], encoder.clip.image_size),
                                                                    pick, groups, encoder.clip.patch_size), 1120),
                                  name(i)) for i, pick in zip(products, picks, strict=True)]
        blocks.append(report_lib.Text("Where the selection tokens look on these products (one panel per group; "
                                      "solid: fusion block 1, dashed: block 2)", 1))
        blocks.append(report_lib.Gallery("", tuple(maps), width=560))
    return f"Evaluation of {report.get('checkpoint', '?')}", blocks


def write_report_page(directory: str | os.PathLike, report: dict, source: pipeline.Source, clip: CLIPConfig,
                      e2: E2Config, params: dict, where: str) -> epath.Path | None:
    """`--mode=evaluate`'s `report.html` in `<workdir>/eval`, beside report.json and report.md
    (one process; with several, none)."""
    if jax.process_count() > 1:
        logging.info("report.html is written by one process: not on %d", jax.process_count())
        return None
    title, blocks = report_page(report, source, Encoder(clip, e2, params, source=where))
    return report_lib.write(storage.path(directory) / workdir.EVAL_DIR, page=(title, blocks))["html"]


def main(argv: list[str] | None = None) -> None:
    distributed.single_host_only("python -m e2_jax.visualize")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run (its best parameters)")
    parser.add_argument("--images", nargs="*", default=[], help="image files or folders")
    parser.add_argument("--split", help="draw products of this split of the run's dataset instead")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--out", help="output folder (default: WORKDIR/selection_maps)")
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.split):
        raise SystemExit("give --images FILES or --split NAME")
    encoder = Encoder.from_workdir(args.workdir)
    if args.split:
        config = workdir.read_config(args.workdir)
        images, names = source_images(pipeline.Source(config.data.dataset, args.split, config.data.data_dir or None),
                                      args.count)
        skipped = []
    else:
        loaded = images_lib.read(images_lib.find(args.images))
        if not loaded.images:
            raise DataError("no readable image in " + " ".join(args.images) + ": " + "; ".join(loaded.skipped[:3]))
        images, names, skipped = loaded.images, [str(p) for p in loaded.paths], loaded.skipped
    written = write_selection_maps(encoder, images, names, args.out or storage.path(args.workdir) / "selection_maps")
    images_lib.report(f"{len(written)} selection maps of {encoder.source} in {written[0].parent}", skipped,
                      file=sys.stdout)


if __name__ == "__main__":
    errors.main(main)
