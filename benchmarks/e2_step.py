"""Forward + backward time of E²'s loss step against the same step of plain CLIP fine-tuning.

    python -m benchmarks.e2_step --model ViT-B-32 --batch 16 --repeats 3
    python -m benchmarks.e2_step --model tiny --batch 64 --repeats 5
    python -m benchmarks.e2_step --model ViT-B-32 --batch 64 --dtype bfloat16   # on a GPU

One run, same machine, same images and global texts (the E² global text of FashionGen-like
records at 77 tokens); variants are timed interleaved, median of `--repeats` after a warm-up.
Each step is `jax.value_and_grad` of the loss over every parameter (no optimizer update).

- CLIP-FT: global InfoNCE only (E2Config(selection_tokens=False)).
- E² "naive": every region text encoded at 77 tokens, one row per item (as the authors do).
- E² "short contexts": each group's tags trimmed to the batch's longest tag (rounded up to
  8 tokens); "de-duplicated": each distinct tag encoded once; and both
  (`e2_jax.data.region_texts`), for the authors' five groups and the paper's four entities.

Also printed: the step's FLOPs as XLA counts them (`cost_analysis`), to compare with the floor
set by arithmetic in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from e2_jax import losses
from e2_jax.data.region_texts import dedupe, trim
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import get_config
from e2_jax.models.e2 import AUTHORS_GROUPS, PAPER_GROUPS, E2Config, E2Model, init_e2_params
from tests.fashion_texts import fashion_records


def make_step(config, e2):
    model = E2Model(config, e2)

    def loss_fn(params, images, tokens, region_inputs, key):
        out = model.apply({"params": params}, images, True, method=E2Model.encode_image, rngs={"gumbel": key})
        text = model.apply({"params": params}, tokens, method=E2Model.encode_text)
        regions = None
        if e2.selection_tokens:
            regions = jnp.stack([model.apply({"params": params}, unique, method=E2Model.encode_text)[inverse]
                                 for unique, inverse in region_inputs], axis=1)
        return losses.e2_loss(out.global_embedding, text, out.region_embeddings, regions,
                              params["logit_scale"])[0]

    return jax.jit(jax.value_and_grad(loss_fn))


def region_inputs(records, groups, short: bool, unique: bool):
    tokenizer = CLIPTokenizer()
    inputs = []
    for group in groups:
        tokens = tokenizer([r[group.text_field] for r in records])
        if short:
            tokens = trim(tokens)
        if unique:
            rows, inverse = dedupe(tokens)
        else:
            rows, inverse = tokens, np.arange(len(tokens), dtype=np.int32)
        inputs.append((jnp.asarray(rows), jnp.asarray(inverse)))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the matmuls' compute dtype (parameters stay float32), as --config.model.compute_dtype")
    parser.add_argument("--modes", default="naive,short contexts,de-duplicated,short + de-duplicated",
                        help="which region-text modes to time, comma-separated")
    args = parser.parse_args()

    config = get_config(args.model, compute_dtype=args.dtype)
    records = fashion_records(args.batch, seed=0)
    global_texts = [".".join([r["composition"], r["subcategory"], r["brand"], r["season"], r["description"]])
                    for r in records]
    images = jax.random.normal(jax.random.key(0), (args.batch, config.image_size, config.image_size, 3))
    tokens = jnp.asarray(CLIPTokenizer()(global_texts))
    key = jax.random.key(1)

    variants = {"CLIP-FT": (E2Config(selection_tokens=False), [])}
    modes = {"naive": (False, False), "short contexts": (True, False), "de-duplicated": (False, True),
             "short + de-duplicated": (True, True)}
    for label, groups in (("5 groups", AUTHORS_GROUPS), ("4 entities", PAPER_GROUPS)):
        for mode in args.modes.split(","):
            variants[f"E² {label}, {mode}"] = (E2Config(groups=groups),
                                               region_inputs(records, groups, *modes[mode]))

    runs, flops, shapes = {}, {}, {}
    for name, (e2, inputs) in variants.items():
        params = init_e2_params(config, e2, jax.random.key(0))
        step = make_step(config, e2)
        call_args = (params, images, tokens, inputs, key)
        cost = step.lower(*call_args).compile().cost_analysis()
        flops[name] = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
        shapes[name] = " ".join(f"{u.shape[0]}x{u.shape[1]}" for u, _ in inputs) or "-"
        runs[name] = lambda step=step, call_args=call_args: jax.block_until_ready(step(*call_args))
        runs[name]()  # warm-up
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)

    base_time = statistics.median(seconds["CLIP-FT"])
    device = jax.devices()[0]
    print(f"model {args.model}, batch {args.batch}, {args.dtype}, median of {args.repeats}; machine "
          f"{platform.machine()}, {os.cpu_count()} CPUs, {device.platform} ({device.device_kind}); "
          f"jax {jax.__version__}")
    print("| step | region texts encoded (rows x tokens per group) | s/step | vs CLIP-FT | XLA GFLOPs | "
          "FLOPs vs CLIP-FT |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        t = statistics.median(seconds[name])
        print(f"| {name} | {shapes[name]} | {t:.3f} | {t / base_time:.2f}x | {flops[name] / 1e9:.1f} | "
              f"{flops[name] / flops['CLIP-FT']:.2f}x |")


if __name__ == "__main__":
    main()
