"""The trainer's step: E² (region texts per item and packed) against CLIP-FT, and open_clip.

    python -m benchmarks.train_step --model ViT-B-32 --batch 16 --repeats 3
    python -m benchmarks.train_step --model ViT-B-16 --batch 8 --repeats 3 --no-torch

One run, one machine, the same random weights and the same batch: FashionGen-like records
(`e2_jax/data/fashion_texts.py`: the E² global text at 77 tokens, tags tokenised at FashionGen's tag
lengths), random images at 224 px. Each step is the trainer's stage program
(`e2_jax.training.step.build_stage`: forward, loss over the global batch, backward, Adam with L2 weight
decay), float32.

- e2_jax CLIP-FT: no selection tokens, the global InfoNCE only.
- e2_jax E², for the authors' five groups and the paper's four entities, with the region texts
  `per item` (`data.region_texts=per_item`: one row per item and group at its tag length, one
  text-tower call per group, as the authors encode them; the trainer before issue 19) and
  `packed` (the default: each distinct tag once, trimmed, in at most two calls).
- open_clip CLIP-FT: `open_clip.create_model(<model>-quickgelu)`, `ClipLoss`, backward,
  `torch.optim.Adam(weight_decay=1e-4)`; torch on as many threads as the machine has cores.

Steps are interleaved, median of `--repeats` after a warm-up. MFU: XLA's FLOP count of the
compiled step over the step time over the peak; on a CPU the "peak" is the best float32
matmul rate measured in the same run (a 2048^3 matmul in XLA), as there is no data-sheet figure.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads spin after each parallel region by default, slowing whatever runs
# next on the same cores (the interleaved JAX step): let them sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# open_clip (through torchvision) loads triton, whose native library segfaults when it loads
# after TensorFlow's, which the input pipeline brings in: so triton first (see tests/conftest.py).
try:
    import triton  # noqa: F401
except ImportError:
    pass

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device import place_batch
from e2_jax import config as recipes
from e2_jax import convert
from e2_jax.data.fashion_texts import fashion_records
from e2_jax.data.region_texts import describe as region_texts_describe
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.metrics import peak_flops, step_flops
from e2_jax.spec import RunSpec, resolve
from e2_jax.training import step


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


def jax_step(preset: str, groups: tuple[dict, ...] | None, region_texts: str, batch_size: int):
    """(run, FLOPs, host batch, state holder, CLIP config, region-text calls) of the trainer's step;
    `groups=None`: CLIP-FT."""
    c = recipes.base()
    c.model.preset, c.model.pretrained = preset, ""
    c.e2.enabled, c.stages, c.batch_size = groups is not None, ("finetune",), batch_size
    c.e2.groups, c.data.region_texts = groups or recipes.AUTHORS_GROUPS, region_texts
    c.finetune.steps = 1000
    setup = resolve(c)
    program = step.build_stage(setup, setup.stages[0])
    state = program.new_state(step.initial_params(setup))
    host = fashion_batch(setup, batch_size)
    batch = place_batch(setup, host)
    lowered = program.step.lower(state, batch)
    compiled = lowered.compile()
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    calls = region_texts_describe([t.shape for t in batch.get("region_tokens", ())])
    return run, step_flops(lowered, jax.device_count()), host, holder, setup.clip, calls


def fashion_batch(setup: RunSpec, batch_size: int) -> dict:
    """Host batch: FashionGen-like records' global texts and tags (tokenised as the pipeline
    does), random images."""
    records = fashion_records(batch_size, seed=0)
    tokenizer = CLIPTokenizer(setup.clip.context_length)
    size = setup.clip.image_size
    return {"images": np.random.default_rng(0).standard_normal((batch_size, size, size, 3), np.float32),
            "text": tokenizer([setup.pre.text_format.format(**r) for r in records]),
            "index": np.arange(batch_size, dtype=np.int32),
            "tags": {group: tokenizer([r[field] for r in records], context_length=length)
                     for group, field, length in setup.pre.tags}}


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
    parser.add_argument("--no-torch", action="store_true", help="leave out open_clip")
    args = parser.parse_args()

    peak = peak_flops(jax.devices()[0]) or matmul_peak()
    variants = {"e2_jax CLIP-FT": (None, "packed")}
    for label, groups in (("5 groups", recipes.AUTHORS_GROUPS), ("4 entities", recipes.PAPER_GROUPS)):
        for mode, name in (("per_item", "per item"), ("packed", "packed")):
            variants[f"e2_jax E² {label}, region texts {name}"] = (groups, mode)
    runs, flops, calls = {}, {}, {}
    for name, (groups, mode) in variants.items():
        run, flops[name], host, holder, clip_config, calls[name] = jax_step(args.model, groups, mode, args.batch)
        runs[name] = run
        if groups is None:
            ft_host, ft_holder = host, holder
    if not args.no_torch:
        params = jax.device_get(ft_holder["state"]["params"])
        runs["open_clip CLIP-FT (PyTorch)"], _ = torch_step(args.model, clip_config, params, ft_host)
        flops["open_clip CLIP-FT (PyTorch)"], calls["open_clip CLIP-FT (PyTorch)"] = flops["e2_jax CLIP-FT"], "-"
    for run in runs.values():
        run()  # warm-up
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)

    versions = f"jax {jax.__version__}"
    if not args.no_torch:
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"{args.model}, batch {args.batch}, float32, median of {args.repeats} interleaved steps; machine "
          f"{platform.machine()}, {os.cpu_count()} CPUs; {versions}; peak {peak / 1e9:.0f} GFLOP/s "
          f"({'data sheet' if peak_flops(jax.devices()[0]) else 'measured matmul'})")
    print("| step | region texts (rows x tokens per call) | s/step | vs CLIP-FT | GFLOPs/step (XLA) | "
          "FLOPs vs CLIP-FT | MFU |")
    print("|---|---|---|---|---|---|---|")
    base, base_flops = statistics.median(seconds["e2_jax CLIP-FT"]), flops["e2_jax CLIP-FT"]
    for name in runs:
        t, f = statistics.median(seconds[name]), flops[name]
        print(f"| {name} | {calls[name]} | {t:.3f} | {t / base:.2f}x | {f / 1e9:.1f} | {f / base_flops:.2f}x | "
              f"{f / t / peak:.0%} |")


if __name__ == "__main__":
    main()
