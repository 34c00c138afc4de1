"""End-to-end smoke job with no download: make a random-weight PyTorch-format CLIP checkpoint,
convert it with the real converter, and embed fashion images and texts with the Flax model.

    python -m e2_jax.quickstart --workdir /tmp/e2_quickstart [--model ViT-B-32]

Weights are random, so the similarities mean nothing; what it shows is that the whole path
(export -> import -> tokenizer -> both encoders) runs and how fast, on this machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from e2_jax import convert, pretrained
from e2_jax.data.preprocessing import MEAN, STD
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import CLIP, count_params, get_config, init_params

TEXTS = [
    "SHIRTS.Raf Simons.FW2016.Long sleeve cotton shirt in black. Spread collar.",
    "96% cotton, 4% polyurethane.",
    "Comme des Garçons Shirt",
    "Crêpe de Chine blouse in ivory &amp; gold. Pleated détail at yoke.",
]


def striped_garments(size: int, n: int, seed: int = 0) -> np.ndarray:
    """n images of a coloured 'garment' with stripes on a light background, CLIP-normalised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.ones((n, size, size, 3), np.float32) * 0.9
    for image in images:
        body = (np.abs(xx - 0.5) < 0.25) & (yy > 0.15) & (yy < 0.9)
        stripes = (np.sin(yy * rng.uniform(20, 60)) > 0)[..., None]
        colour, accent = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        image[body] = np.where(stripes[body], colour, accent)
    return (images - np.array(MEAN, np.float32)) / np.array(STD, np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2_jax.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model", default="ViT-B-32", help="a preset: ViT-B-32, ViT-B-16, small, tiny ...")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    config = get_config(args.model)
    print(f"1. random {args.model} CLIP ({count_params(config):,} parameters) -> open_clip state dict")
    params = pretrained.to_numpy(init_params(config, jax.random.key(0)))
    checkpoint = workdir / f"{args.model}-random.safetensors"
    convert.export_open_clip(config, params, checkpoint, overwrite=True)

    print(f"2. convert {checkpoint.name} -> {workdir / 'model'} (python -m e2_jax.convert to-flax)")
    status = convert.main(["to-flax", str(checkpoint), str(workdir / "model"),
                           "--activation", config.activation, "--overwrite"])
    if status:
        raise SystemExit(status)
    config, params = pretrained.load(workdir / "model")

    print("3. tokenize texts and embed them and 4 images")
    tokens = CLIPTokenizer()(TEXTS)
    images = striped_garments(config.image_size, 4)
    model = CLIP(config)
    forward = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t))
    start = time.perf_counter()
    image_emb, text_emb, scale = jax.block_until_ready(forward(params, images, tokens))
    seconds = time.perf_counter() - start
    print(f"   image embeddings {image_emb.shape}, text embeddings {text_emb.shape}, "
          f"logit scale {float(scale):.2f} ({seconds:.1f} s with compilation)")
    print("   cosine similarity, images (rows) x texts (columns):")
    for row in np.asarray(image_emb @ text_emb.T):
        print("   " + " ".join(f"{v:+.3f}" for v in row))
    print(f"done: {workdir}")


if __name__ == "__main__":
    main()
