"""Where a ViT-B/16 residual block's time goes: XLA (jax) against PyTorch, op by op, on CPU.

    python -m benchmarks.block_ops

One ViT-B/16 block at batch 8 (197 tokens, width 768, 12 heads), float32: the MLP matmul and
its two gradients, attention forward and backward (`jax.nn.dot_product_attention` against
`torch.nn.functional.scaled_dot_product_attention`), QuickGELU and LayerNorm backward, and
the whole block forward and forward + backward (e2_jax's `ResidualAttentionBlock` against
open_clip's). Same inputs on both sides; median of 10 after warm-up, the two interleaved per op.
"""

from __future__ import annotations

# open_clip (through torchvision) loads triton, which segfaults when it loads after TensorFlow
# (see tests/conftest.py); nothing here loads TensorFlow, but keep the safe order.
try:
    import triton  # noqa: F401
except ImportError:
    pass

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from e2_jax.models.clip import LayerNorm, ResidualAttentionBlock

B, L, W, H = 8, 197, 768, 12


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def compare(jax_fn, torch_fn, repeats: int = 10) -> tuple[float, float]:
    """Median milliseconds of each, interleaved."""
    for fn in (jax_fn, torch_fn, jax_fn, torch_fn):
        fn()
    j, t = [], []
    for _ in range(repeats):
        j += _time(jax_fn, 1)
        t += _time(torch_fn, 1)
    return 1e3 * float(np.median(j)), 1e3 * float(np.median(t))


def _torch_grad(fn, *leaves):
    def run():
        for leaf in leaves:
            leaf.grad = None
        fn().backward()
    return run


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B * L, W), np.float32)
    w = rng.standard_normal((W, 4 * W), np.float32) / W**0.5
    y = rng.standard_normal((B * L, 4 * W), np.float32)
    q = rng.standard_normal((B, L, H, W // H), np.float32)
    jx, jw, jy, jq = map(jnp.asarray, (x, w, y, q))
    tx, tw, ty = map(torch.from_numpy, (x, w, y))
    tq = torch.from_numpy(q).transpose(1, 2).contiguous()  # torch wants [B, H, L, D]
    ready = jax.block_until_ready
    rows: list[tuple[str, tuple[float, float]]] = []

    matmul, dw, dx = (jax.jit(lambda a, b: a @ b), jax.jit(lambda a, b: a.T @ b), jax.jit(lambda a, b: a @ b.T))
    rows.append(("MLP matmul [1576, 768] x [768, 3072]", compare(lambda: ready(matmul(jx, jw)), lambda: tx @ tw)))
    rows.append(("its weight gradient", compare(lambda: ready(dw(jx, jy)), lambda: tx.T @ ty)))
    rows.append(("its input gradient", compare(lambda: ready(dx(jy, jw)), lambda: ty @ tw.T)))

    attention = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        rows.append(("attention forward", compare(lambda: ready(attention(jq)), lambda: sdpa(tq, tq, tq))))
    attention_grad = jax.jit(jax.grad(lambda q: jnp.sum(jax.nn.dot_product_attention(q, q, q) ** 2)))
    tqg = tq.clone().requires_grad_(True)
    rows.append(("attention forward + backward", compare(lambda: ready(attention_grad(jq)), _torch_grad(
        lambda: (sdpa(tqg, tqg, tqg) ** 2).sum(), tqg))))

    gelu = jax.jit(jax.grad(lambda y: jnp.sum(y * jax.nn.sigmoid(1.702 * y))))
    tyg = ty.clone().requires_grad_(True)
    rows.append(("QuickGELU forward + backward", compare(lambda: ready(gelu(jy)), _torch_grad(
        lambda: (tyg * torch.sigmoid(1.702 * tyg)).sum(), tyg))))
    ln = LayerNorm()
    ln_params = ln.init(jax.random.key(0), jx)
    ln_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(ln.apply(p, x) ** 2), argnums=(0, 1)))
    tln, txg = torch.nn.LayerNorm(W), tx.clone().requires_grad_(True)
    rows.append(("LayerNorm forward + backward", compare(lambda: ready(ln_grad(ln_params, jx)), _torch_grad(
        lambda: (tln(txg) ** 2).sum(), txg))))

    from open_clip.model import QuickGELU
    from open_clip.transformer import ResidualAttentionBlock as TorchBlock

    block = ResidualAttentionBlock(W, H, 4.0, "quick_gelu")
    xb = jnp.asarray(x.reshape(B, L, W))
    params = block.init(jax.random.key(0), xb)
    forward = jax.jit(lambda p, x: jnp.sum(block.apply(p, x) ** 2))
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x) ** 2), argnums=(0, 1)))
    torch_block = TorchBlock(W, H, 4.0, act_layer=QuickGELU, batch_first=True)
    txb = torch.from_numpy(x.reshape(B, L, W)).requires_grad_(True)
    with torch.no_grad():
        rows.append(("whole block forward", compare(lambda: ready(forward(params, xb)),
                                                    lambda: (torch_block(txb) ** 2).sum())))

    def torch_block_grad():
        torch_block.zero_grad(set_to_none=True)
        txb.grad = None
        (torch_block(txb) ** 2).sum().backward()

    rows.append(("whole block forward + backward", compare(lambda: ready(grad(params, xb)), torch_block_grad)))

    print(f"ViT-B/16 block ops, batch {B}, float32; {platform.machine()}, {os.cpu_count()} CPUs; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| op | XLA (jax) ms | PyTorch ms | jax / torch time |")
    print("|---|---|---|---|")
    for name, (j, t) in rows:
        print(f"| {name} | {j:.1f} | {t:.1f} | {j / t:.2f} |")


if __name__ == "__main__":
    main()
