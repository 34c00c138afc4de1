"""Index a folder of product images and answer text queries: the everyday use of a fashion
retrieval model.

    python -m e2_jax.search index --workdir workdirs/e2_b16 --images ~/catalog --out catalog.npz
    python -m e2_jax.search query --index catalog.npz "black leather biker jacket" "red silk dress" --top 5

`index` embeds every image under `--images` (recursively: .jpg, .jpeg, .png, .webp) with the
trained model (`--workdir`, its best parameters) or a converted CLIP (`--pretrained`), and
writes the L2-normalised embeddings with the paths and the model they came from. `query`
embeds each text with the same model and prints the best matches by cosine similarity.
Unreadable images are skipped, counted and listed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from e2_jax import distributed, errors, images
from e2_jax.errors import DataError


def _encoder(workdir: str | None, pretrained: str | None, batch_size: int):
    from e2_jax.inference import load_encoder  # deferred: TensorFlow loads after main's single-host check

    if bool(workdir) == bool(pretrained):
        raise SystemExit("give exactly one of --workdir (a training run) or --pretrained (a converted CLIP)")
    return load_encoder(workdir, pretrained, batch_size=batch_size)


def build_index(encoder, folder: str | Path, out: str | Path, chunk: int = 1024) -> dict:
    """Embeds the folder's readable images into `out` (.npz), `chunk` images in memory at a
    time; returns a summary (the unreadable files skipped, each named)."""
    found = images.find(folder)
    paths, parts, skipped = [], [], []
    for start in range(0, len(found), chunk):
        loaded = images.read(found[start : start + chunk])
        paths += loaded.paths
        skipped += loaded.skipped
        if loaded.images:
            parts.append(encoder.encode_images(loaded.images))
    if not paths:
        raise DataError(f"no readable image under {folder}: " + "; ".join(skipped[:3]))
    meta = {"model": encoder.source, "origin": encoder.origin, "folder": str(Path(folder).absolute()),
            "skipped": skipped}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, embeddings=np.concatenate(parts), paths=np.array([str(p) for p in paths]), meta=json.dumps(meta))
    tmp.replace(out)
    return {"indexed": len(paths), "skipped": skipped, "out": str(out)}


def query(index: str | Path, texts: list[str], encoder, top: int = 5) -> list[list[tuple[str, float]]]:
    """The `top` (path, cosine similarity) of the index for each text."""
    with np.load(index) as data:
        embeddings, paths = data["embeddings"], data["paths"]
    scores = encoder.encode_texts(texts) @ embeddings.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return [[(str(paths[j]), float(s[j])) for j in row] for s, row in zip(scores, order, strict=True)]


def main(argv: list[str] | None = None) -> None:
    distributed.single_host_only("python -m e2_jax.search")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="embed a folder of images")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    q = sub.add_parser("query", help="best matches for text queries")
    q.add_argument("--index", required=True)
    q.add_argument("texts", nargs="+")
    q.add_argument("--top", type=int, default=5)
    for s in (p, q):
        s.add_argument("--workdir")
        s.add_argument("--pretrained")
        s.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "index":
        summary = build_index(_encoder(args.workdir, args.pretrained, args.batch_size), args.images, args.out)
        images.report(f"indexed {summary['indexed']} images into {summary['out']}", summary["skipped"])
        return
    if not (args.workdir or args.pretrained):  # the model the index was built with
        with np.load(args.index) as data:
            origin = json.loads(str(data["meta"]))["origin"]
        args.workdir, args.pretrained = origin.get("workdir"), origin.get("pretrained")
    encoder = _encoder(args.workdir, args.pretrained, args.batch_size)
    for text, matches in zip(args.texts, query(args.index, args.texts, encoder, args.top), strict=True):
        print(text)
        for rank, (path, score) in enumerate(matches, 1):
            print(f"  {rank}. {score:.3f}  {path}")


if __name__ == "__main__":
    errors.main(main)
