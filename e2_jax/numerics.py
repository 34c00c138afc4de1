"""Small numerical helpers shared by the models, the losses and the applications (which must not
import one another for them)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps: float = 1e-12):
    """`x / max(||x||, eps)` along the last axis (torch's F.normalize), computed in float32 and
    returned in `x`'s dtype. NumPy in, NumPy out (on the host); a JAX array in, a JAX array out."""
    xp = np if isinstance(x, np.ndarray) else jnp
    x32 = x.astype(xp.float32)
    return (x32 / xp.maximum(xp.linalg.norm(x32, axis=-1, keepdims=True), eps)).astype(x.dtype)
