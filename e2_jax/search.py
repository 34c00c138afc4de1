"""Embed a catalog or a folder of product images, and answer text queries: the everyday use of a
fashion retrieval model.

    python -m e2_jax.search index --workdir workdirs/e2_b16 --images ~/catalog --out catalog.npz
    python -m e2_jax.search index --workdir workdirs/mystore --dataset catalog/mystore --split validation \\
        --out mystore.parquet [--views all] [--regions] [--raw]
    python -m e2_jax.search query --index catalog.npz "black leather biker jacket" "red silk dress" --top 5
    python -m e2_jax.search query --index mystore.parquet photos/look.jpg [--every-view]

`index` embeds, with the trained model (`--workdir`, its best parameters) or a converted CLIP
(`--pretrained`), either every image under `--images` (recursively: .jpg, .jpeg, .png, .webp;
unreadable files skipped, counted and listed; each identified by its path) or a built dataset's
split (`--dataset`: a catalog, or any dataset e2_jax builds; each product's first view, or
every view with `--views all`; identified by its product id and view), in batches over every
local device, with a progress bar. It writes, ready for a vector database:

| `.parquet` column | `.npz` array | what |
|---|---|---|
| `id` | `ids` [N] | the product id (a dataset) or the image's path (a folder) |
| `view` | `views` [N] | the view's position in its product's image list (a catalog counts dropped views) |
| `embedding` | `embeddings` [N, D] | the global image embedding, float32 |
| `region_<group>` | `regions` [N, G, D], `groups` [G] | E²'s region embeddings, with `--regions` |
| file metadata `e2_jax` | `meta` | JSON: the model, its origin, the input, `normalized`, what was skipped |

Embeddings are L2-normalised (cosine similarity is a dot product) unless `--raw`. `query`
embeds each query with the same model, a text or an image file (a path ending in .jpg, .jpeg,
.png or .webp; it says which it took), and prints the best matches by cosine similarity: one
line per product, its best view shown, or every matching view with `--every-view`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from e2_jax import distributed, errors, images
from e2_jax.errors import ConfigError, DataError, MissingError
from e2_jax.numerics import l2_normalize

SUFFIXES = (".npz", ".parquet")


def _encoder(workdir: str | None, pretrained: str | None, batch_size: int):
    from e2_jax.inference import load_encoder  # deferred: TensorFlow loads after main's single-host check

    if bool(workdir) == bool(pretrained):
        raise SystemExit("give exactly one of --workdir (a training run) or --pretrained (a converted CLIP)")
    return load_encoder(workdir, pretrained, batch_size=batch_size)


def _bar(total: int, unit: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not show, dynamic_ncols=True, leave=False)


def _out_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ConfigError(f"an index is written as .npz or .parquet, not {out.name}")
    return out


def build_index(encoder, folder: str | Path, out: str | Path, chunk: int = 256, *, normalize: bool = True,
                regions: bool = False, progress: bool = False) -> dict:
    """Embeds the folder's readable images into `out` (.npz or .parquet), `chunk` images in
    memory at a time; returns a summary (the unreadable files skipped, each named)."""
    out = _out_path(out)
    found = images.find(folder)
    paths, parts, skipped = [], [], []
    with _bar(len(found), "img", progress) as bar:
        for start in range(0, len(found), chunk):
            loaded = images.read(found[start : start + chunk])
            paths += loaded.paths
            skipped += loaded.skipped
            if loaded.images:
                got = encoder.image_outputs(loaded.images, normalize=normalize)
                parts.append((got.global_embedding, got.region_embeddings))
            bar.update(len(found[start : start + chunk]))
    if not paths:
        raise DataError(f"no readable image under {folder}: " + "; ".join(skipped[:3]))
    meta = {"model": encoder.source, "origin": encoder.origin, "folder": str(Path(folder).absolute()),
            "normalized": normalize, "skipped": skipped}
    embeddings = np.concatenate([p[0] for p in parts])
    region = np.concatenate([p[1] for p in parts]) if regions and parts[0][1] is not None else None
    write_index(out, np.array([str(p) for p in paths]), embeddings, meta, regions=region,
                groups=_groups(encoder, regions))
    return {"indexed": len(paths), "skipped": skipped, "out": str(out)}


def index_split(encoder, dataset: str, split: str, out: str | Path, *, data_dir: str | None = None,
                views: str = "first", normalize: bool = True, regions: bool = False, progress: bool = False,
                batch_size: int = 256) -> dict:
    """Embeds a built dataset's split (each product's first view, or every view with
    `views="all"`) into `out` (.npz or .parquet), identified by product id and view."""
    from e2_jax.data import pipeline  # deferred: TensorFlow loads after main's single-host check

    out = _out_path(out)
    if views not in ("first", "all"):
        raise ConfigError(f"--views is first or all, not {views!r}")
    source = pipeline.Source(dataset, split, data_dir)
    scan = source.scan([f for f in ("product_id", "image_positions") if f in source.features.keys()])
    n = len(source)
    ids = scan["product_id"].astype(str) if "product_id" in scan else np.arange(n).astype(str)
    items = pipeline.every_view(scan["views"]) if views == "all" else None  # None: each first view
    got = encoder.split_outputs(source, items, batch_size=batch_size, normalize=normalize, progress=progress)
    meta = {"model": encoder.source, "origin": encoder.origin, "dataset": dataset, "split": split,
            "data_dir": data_dir, "views": views, "normalized": normalize, "skipped": []}
    views_in_table = pipeline.table_views(scan, got["index"], got["view"])
    write_index(out, ids[got["index"]], got["global"], meta, views=views_in_table,
                regions=got.get("regions") if regions else None, groups=_groups(encoder, regions))
    return {"indexed": len(got["global"]), "products": n, "skipped": [], "out": str(out)}


def _groups(encoder, regions: bool) -> list[str]:
    if regions and not encoder.e2.groups:
        raise ConfigError(f"--regions: {encoder.source} has no region groups (CLIP and CLIP-FT have none)")
    return [g.name for g in encoder.e2.groups] if regions else []


def write_index(out: Path, ids: np.ndarray, embeddings: np.ndarray, meta: dict, *, views: np.ndarray | None = None,
                regions: np.ndarray | None = None, groups: list[str] = ()) -> None:
    """The index file, written whole or not at all (a partial file, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial" + out.suffix)
    embeddings = np.asarray(embeddings, np.float32)
    if out.suffix == ".npz":
        extra = {} if views is None else {"views": np.asarray(views, np.int32)}
        if regions is not None:
            extra.update(regions=np.asarray(regions, np.float32), groups=np.array(groups))
        np.savez(tmp, ids=ids, embeddings=embeddings, meta=json.dumps(meta), **extra)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def vectors(x: np.ndarray) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float32).reshape(-1)),
                                                     x.shape[-1])

        columns = {"id": pa.array([str(i) for i in ids], pa.string())}
        if views is not None:
            columns["view"] = pa.array(np.asarray(views, np.int32))
        columns["embedding"] = vectors(embeddings)
        for g, name in enumerate(groups if regions is not None else ()):
            columns[f"region_{name}"] = vectors(regions[:, g])
        table = pa.table(columns).replace_schema_metadata({"e2_jax": json.dumps(meta)})
        pq.write_table(table, tmp)
    tmp.replace(out)


class Index(NamedTuple):
    ids: np.ndarray  # [N] str
    embeddings: np.ndarray  # [N, D] float32
    meta: dict
    views: np.ndarray | None = None  # [N] int, each row's view within its product (a dataset's index)


def load_index(path: str | Path) -> Index:
    """An index file (.npz or .parquet) as written by `index`; an .npz of before product ids
    (`paths`) reads too."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"no index {path}: write one with python -m e2_jax.search index ... --out {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"e2_jax", b"{}"))
        column = table.column("embedding").combine_chunks()
        embeddings = column.values.to_numpy().reshape(len(table), column.type.list_size)
        views = np.array(table.column("view").to_pylist()) if "view" in table.column_names else None
        return Index(np.array(table.column("id").to_pylist()), embeddings.astype(np.float32), meta, views)
    with np.load(path) as data:
        return Index(data["ids"] if "ids" in data else data["paths"], data["embeddings"], json.loads(str(data["meta"])),
                     data["views"] if "views" in data else None)


class Match(NamedTuple):
    id: str  # the product id (a dataset) or the image's path (a folder)
    score: float  # cosine similarity
    view: int | None  # the matching view within its product (a dataset's index), else None


def query_kind(text: str) -> str:
    """The kind of a query: "image" where it names an image file (a path ending in .jpg, .jpeg,
    .png or .webp), else "text"."""
    if Path(text).suffix.lower() not in images.SUFFIXES:
        return "text"
    if not Path(text).is_file():
        raise MissingError(f"query {text!r} names an image file that does not exist; give an image's path, or a "
                           "text that does not end in " + ", ".join(images.SUFFIXES))
    return "image"


def query(index: str | Path, queries: list[str], encoder, top: int = 5, every_view: bool = False) -> list[list[Match]]:
    """The `top` matches of the index for each query, a text or an image file (`query_kind`),
    by cosine similarity: one per product (its best view) unless `every_view`."""
    found = load_index(index)
    embeddings = l2_normalize(found.embeddings)  # (a no-op unless written raw)
    kinds = [query_kind(q) for q in queries]
    wanted = np.zeros((len(queries), embeddings.shape[1]), np.float32)
    for kind, embed in (("text", encoder.encode_texts), ("image", encoder.encode_images)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            wanted[rows] = embed([queries[i] for i in rows])
    scores = wanted @ embeddings.T
    out = []
    for row in scores:
        matches, seen = [], set()
        for j in np.argsort(-row, kind="stable"):
            product = str(found.ids[j])
            if not every_view and product in seen:
                continue
            seen.add(product)
            matches.append(Match(product, float(row[j]), None if found.views is None else int(found.views[j])))
            if len(matches) == top:
                break
        out.append(matches)
    return out


def main(argv: list[str] | None = None) -> None:
    distributed.single_host_only("python -m e2_jax.search")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="embed a folder of images or a dataset's split")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", help="a folder of images (searched recursively)")
    what.add_argument("--dataset", help="a built dataset, e.g. catalog/mystore")
    p.add_argument("--split", default="validation", help="the dataset's split (default: %(default)s)")
    p.add_argument("--data-dir", help="where the dataset was built (default: TFDS's)")
    p.add_argument("--views", default="first", choices=("first", "all"), help="a dataset's views to embed")
    p.add_argument("--out", required=True, help="the index file, .npz or .parquet")
    p.add_argument("--regions", action="store_true", help="also E²'s region embeddings, one per group")
    p.add_argument("--raw", action="store_true", help="embeddings before the L2 normalisation")
    q = sub.add_parser("query", help="best matches for text or image queries")
    q.add_argument("--index", required=True)
    q.add_argument("queries", nargs="+", help="texts, or image files (a path ending in .jpg, .jpeg, .png, .webp)")
    q.add_argument("--top", type=int, default=5)
    q.add_argument("--every-view", action="store_true", help="list each matching view, not only each product's "
                   "best one")
    for s in (p, q):
        s.add_argument("--workdir")
        s.add_argument("--pretrained")
        s.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "index":
        encoder = _encoder(args.workdir, args.pretrained, args.batch_size)
        how = {"normalize": not args.raw, "regions": args.regions, "progress": True}
        if args.images:
            summary = build_index(encoder, args.images, args.out, **how)
            images.report(f"indexed {summary['indexed']} images into {summary['out']}", summary["skipped"])
        else:
            summary = index_split(encoder, args.dataset, args.split, args.out, data_dir=args.data_dir,
                                  views=args.views, batch_size=args.batch_size, **how)
            images.report(f"indexed {summary['indexed']} images of {summary['products']} products of "
                          f"{args.dataset}/{args.split} into {summary['out']}", [])
        return
    if not (args.workdir or args.pretrained):  # the model the index was built with
        origin = load_index(args.index).meta["origin"]
        args.workdir, args.pretrained = origin.get("workdir"), origin.get("pretrained")
    encoder = _encoder(args.workdir, args.pretrained, args.batch_size)
    answers = query(args.index, args.queries, encoder, args.top, every_view=args.every_view)
    for text, matches in zip(args.queries, answers, strict=True):
        print(f"{query_kind(text)}: {text}")
        for rank, match in enumerate(matches, 1):
            print(f"  {rank}. {match.score:.3f}  {match.id}" + ("" if match.view is None else f"  (view {match.view})"))


if __name__ == "__main__":
    errors.main(main)
