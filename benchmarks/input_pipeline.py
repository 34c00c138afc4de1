"""Examples/s of the training input pipeline against what the E² training step consumes.

    python -m benchmarks.input_pipeline --data-dir /tmp/e2_bench_tfds

One run, one machine. Builds what it needs in `--data-dir` (kept for the next run):
SynthFashion default (128 px) and small (64 px), and a FashionGen-format set (SynthFashion
written as FashionGen h5 files, 256 px like the real one, built by the `fashion_gen` builder).

1. Pipeline alone: examples/s of `local_train_batches` (read by index, random view, decode,
   bicubic resize + centre crop, normalise, global text and the authors' five tags tokenised),
   after a warm-up, at 224 px (from 256 px FashionGen-format images, and from 128 px
   SynthFashion) and at the demo's 64 px.
2. Step alone: examples/s the trainer's E² step consumes (`e2_jax.training.step.build_stage`: forward,
   loss, backward, Adam; region texts packed as the trainer packs them) for each model at its
   resolution, on one fixed batch.
3. Fed: the fastest of those steps fed by the pipeline (global arrays, `train_batches`) against
   the same step on a fixed batch, interleaved: what sharing the CPU with the pipeline costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import tensorflow_datasets as tfds

from benchmarks.device import place_batch
from e2_jax import config as recipes
from e2_jax.data import pipeline as pl
from e2_jax.data.build import build
from e2_jax.data.synth_fashion import SynthConfig, write_fashiongen_h5
from e2_jax.data.tensorflow_cpu import tf
from e2_jax.models.e2 import AUTHORS_GROUPS
from e2_jax.sharding import batch_sharding
from e2_jax.spec import resolve
from e2_jax.training import step

# The authors' five groups; tags at lengths that cover SynthFashion's and FashionGen's.
TAGS = tuple((g.name, g.text_field, 77 if g.name == "description" else 16) for g in AUTHORS_GROUPS)
MODELS = {"ViT-B-16": ("ViT-B-16", {}, 224, 8), "ViT-B-32": ("ViT-B-32", {}, 224, 16),
          "small@64": ("small", {"image_size": 64, "patch_size": 8}, 64, 64),
          "tiny@64": ("tiny", {"image_size": 64}, 64, 64)}


def ensure_datasets(data_dir: Path, fashiongen_products: int) -> None:
    for name in ("synth_fashion", "synth_fashion/small"):
        if not tfds.builder(name, data_dir=str(data_dir)).is_prepared():
            build(name, str(data_dir))
    if not tfds.builder("fashion_gen", data_dir=str(data_dir)).is_prepared():
        manual = data_dir / "fashiongen_manual"
        config = SynthConfig(num_train=fashiongen_products, num_validation=64)
        for split in ("train", "validation"):
            write_fashiongen_h5(config, manual, split)
        build("fashion_gen", str(data_dir), str(manual))


def pipeline_rate(source: pl.Source, pre: pl.Preprocessing, batch: int, steps: int) -> float:
    batches = pl.local_train_batches(source, pre, global_batch=batch, rows=range(batch))
    for _ in range(3):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return batch * steps / (time.perf_counter() - start)


def step_fn(model: str):
    """(run(batch), image size, batch size, setup): the trainer's E² step for `model`; `run`
    takes a local NumPy batch with per-item tags (packed here) or a global batch."""
    preset, overrides, size, batch = MODELS[model]
    c = recipes.base()
    c.model.preset, c.model.pretrained, c.model.overrides = preset, "", overrides
    c.stages, c.batch_size, c.finetune.steps = ("finetune",), batch, 1000
    c.e2.groups = recipes.with_tag_lengths(recipes.AUTHORS_GROUPS, **{group: length for group, _, length in TAGS})
    setup = resolve(c)
    program = step.build_stage(setup, setup.stages[0])
    holder = {"state": program.new_state(step.initial_params(setup))}

    def run(b: dict) -> None:
        global_batch = b if "region_tokens" in b else place_batch(setup, b)
        holder["state"], metrics = program.step(holder["state"], global_batch)
        jax.block_until_ready(metrics)

    return run, size, batch, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="/tmp/e2_bench_tfds")
    parser.add_argument("--batch", type=int, default=64, help="pipeline batch")
    parser.add_argument("--steps", type=int, default=30, help="pipeline batches timed")
    parser.add_argument("--models", default="ViT-B-16,ViT-B-32,small@64,tiny@64")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model")
    parser.add_argument("--fashiongen-products", type=int, default=512)
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    ensure_datasets(data_dir, args.fashiongen_products)

    rates = {}
    for label, dataset, size in (("FashionGen-format 256 px -> 224", "fashion_gen", 224),
                                 ("SynthFashion 128 px -> 224", "synth_fashion", 224),
                                 ("SynthFashion/small 64 px (demo)", "synth_fashion/small", 64)):
        source = pl.Source(dataset, "train", str(data_dir))
        rates[label] = (size, pipeline_rate(source, pl.Preprocessing(image_size=size, tags=TAGS), args.batch,
                                            args.steps))

    consumed, fastest = {}, None
    for model in args.models.split(","):
        run, size, batch, _ = step_fn(model)
        dataset = "fashion_gen" if size == 224 else "synth_fashion/small"
        pre = pl.Preprocessing(image_size=size, tags=TAGS)
        fixed = next(pl.local_train_batches(pl.Source(dataset, "train", str(data_dir)), pre, global_batch=batch,
                                            rows=range(batch)))
        run(fixed)  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(fixed)
            times.append(time.perf_counter() - start)
        consumed[model] = (size, batch, statistics.median(times))
        if fastest is None or batch / consumed[model][2] > batch / consumed[fastest][2]:
            fastest = model

    # The fastest consumer, fed by the pipeline (global arrays on a 1-device mesh) vs a fixed batch.
    run, size, batch, setup = step_fn(fastest)
    dataset = "fashion_gen" if size == 224 else "synth_fashion/small"
    feed = pl.train_batches(pl.Source(dataset, "train", str(data_dir)), pl.Preprocessing(image_size=size, tags=TAGS),
                            global_batch=batch, sharding=batch_sharding(setup.mesh))
    fixed = next(feed)
    run(fixed)
    for _ in range(8):  # the packed region texts come in a few shapes: compile them before timing
        run(next(feed))
    fed_times, fixed_times = [], []
    for _ in range(max(5, 4 * args.repeats)):
        for times, get in ((fed_times, lambda: next(feed)), (fixed_times, lambda: fixed)):
            start = time.perf_counter()
            run(get())
            times.append(time.perf_counter() - start)

    print(f"machine {platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__}, tensorflow {tf.__version__}, "
          f"tensorflow-datasets {tfds.__version__}; pipeline batch {args.batch}, {args.steps} batches")
    print("\n| pipeline | px | examples/s |\n|---|---|---|")
    for label, (size, rate) in rates.items():
        print(f"| {label} | {size} | {rate:.0f} |")
    print("\n| E² step (trainer's) | px | batch | s/step | examples/s consumed | pipeline at that px | ratio |")
    print("|---|---|---|---|---|---|---|")
    for model, (size, batch, seconds) in consumed.items():
        pipeline = min(rate for s, rate in rates.values() if s == size)  # the slower source at this size
        print(f"| {model} | {size} | {batch} | {seconds:.3f} | {batch / seconds:.1f} | {pipeline:.0f} | "
              f"{pipeline * seconds / batch:.0f}x |")
    fed, alone = statistics.median(fed_times), statistics.median(fixed_times)
    print(f"\n{fastest} step fed by the pipeline: {fed:.3f} s/step; on a fixed batch: {alone:.3f} s/step "
          f"({(fed / alone - 1) * 100:+.1f}%), medians of {len(fed_times)} interleaved steps")


if __name__ == "__main__":
    main()
