"""Small numerical helpers shared by the models, the losses and the applications (which must not
import one another for them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps: float = 1e-12):
    """`x` scaled to unit L2 norm along the last axis (norms below `eps` count as `eps`, as
    torch's F.normalize), computed in float32 and returned in `x`'s dtype. A JAX array: times
    rsqrt of the squared norm (one fused multiply on a device; the loss's formulation since the
    first step, so training results are unchanged); a NumPy array: divided by the norm, on the host."""
    if isinstance(x, np.ndarray):
        x32 = x.astype(np.float32)
        return (x32 / np.maximum(np.linalg.norm(x32, axis=-1, keepdims=True), eps)).astype(x.dtype)
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), eps * eps))).astype(x.dtype)
