"""The training step, E² and CLIP-FT, against open_clip's PyTorch training step, side by side.

    python -m benchmarks.train_step --model ViT-B-32 --batch 16 --repeats 3
    python -m benchmarks.train_step --model ViT-B-16 --batch 8 --repeats 3

One run, one machine, the same random weights (converted with e2_jax.convert) and the same
batch (from the input pipeline: SynthFashion images at 224 px, the authors' global text and
tags). Each step is a whole optimizer step: forward, loss, backward, Adam with L2 weight decay.

- e2_jax E²: the trainer's own step (`e2_jax.train.make_train_step`, 5 groups, tags at the
  lengths of the FashionGen configs).
- e2_jax CLIP-FT: the same step without selection tokens (global InfoNCE only).
- open_clip CLIP-FT: `open_clip.create_model(<model>-quickgelu)`, `ClipLoss`, backward,
  `torch.optim.Adam(weight_decay=1e-4)`; torch on as many threads as the machine has cores.

Steps are interleaved, median of `--repeats` after a warm-up. MFU: XLA's FLOP count of the
compiled step over the step time over the peak; on a CPU the "peak" is the best float32
matmul rate measured in the same run (a 2048^3 matmul in XLA), as there is no data-sheet figure.
"""

from __future__ import annotations

# open_clip (through torchvision) loads triton, whose native library segfaults when it loads
# after TensorFlow's, which the input pipeline brings in: so triton first (see tests/conftest.py).
try:
    import triton  # noqa: F401
except ImportError:
    pass

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from e2_jax import config as recipes
from e2_jax import convert, train
from e2_jax.data import pipeline
from e2_jax.metrics import peak_flops, step_flops
from e2_jax.sharding import batch_sharding


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def jax_step(preset: str, e2: bool, batch_size: int, data_dir: str):
    c = recipes.base()
    c.model.preset, c.model.pretrained = preset, ""
    c.data.dataset, c.data.data_dir, c.data.build_if_missing = "synth_fashion/small", data_dir, True
    c.e2.enabled, c.stages, c.batch_size = e2, "finetune", batch_size
    c.finetune.steps = 1000
    setup = train.prepare(c, tempfile.mkdtemp())
    stage = setup.stages[0]
    tx, schedule = train.stage_optimizer(setup, stage)
    _, shardings = train.state_shardings(setup, stage, tx)
    state = train.new_state(train.initial_params(setup), stage, tx, shardings)
    batch = next(pipeline.train_batches(setup.train_source, setup.pre, global_batch=batch_size,
                                        sharding=batch_sharding(setup.mesh)))
    step = jax.jit(train.make_train_step(setup, stage, tx, schedule), donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    return run, step_flops(compiled), batch, holder, setup.clip


def torch_step(preset: str, clip_config, jax_params: dict, batch: dict):
    import open_clip
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = open_clip.create_model(f"{preset}-quickgelu", pretrained=None)
    weights = convert.flax_to_openai(jax_params, clip_config)  # the same random weights as the JAX CLIP-FT
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)
    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    images = torch.from_numpy(np.array(batch["images"])).permute(0, 3, 1, 2).contiguous()
    text = torch.from_numpy(np.asarray(batch["text"]).astype(np.int64))

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, scale = model(images, text)
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()

    return run, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default="/tmp/e2_bench_tfds")
    args = parser.parse_args()

    peak = peak_flops(jax.devices()[0]) or matmul_peak()
    e2_run, e2_flops, _, _, _ = jax_step(args.model, True, args.batch, args.data_dir)
    ft_run, ft_flops, batch, ft_holder, clip_config = jax_step(args.model, False, args.batch, args.data_dir)
    params = jax.device_get(ft_holder["state"]["params"])
    pt_run, _ = torch_step(args.model, clip_config, params, batch)
    runs = {"e2_jax E²": e2_run, "e2_jax CLIP-FT": ft_run, "open_clip CLIP-FT (PyTorch)": pt_run}
    flops = {"e2_jax E²": e2_flops, "e2_jax CLIP-FT": ft_flops, "open_clip CLIP-FT (PyTorch)": ft_flops}
    for run in runs.values():
        run()  # warm-up
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)

    import torch

    print(f"{args.model}, batch {args.batch}, float32, median of {args.repeats} interleaved steps; machine "
          f"{platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); peak {peak / 1e9:.0f} GFLOP/s "
          f"({'data sheet' if peak_flops(jax.devices()[0]) else 'measured matmul'})")
    print("| step | s/step | examples/s | GFLOPs/step (XLA) | MFU | vs open_clip |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(seconds["open_clip CLIP-FT (PyTorch)"])
    for name in runs:
        t = statistics.median(seconds[name])
        f = flops[name]
        print(f"| {name} | {t:.3f} | {args.batch / t:.2f} | {f / 1e9:.0f} | {f / t / peak:.0%} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
