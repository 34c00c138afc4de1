"""Optimisation (E2_METHOD.md section 4): the authors' Adam with L2 weight decay or AdamW,
linear warm-up then cosine to 0, and which parameters train.

Freezing is real: the trainer splits the parameters into a trainable and a frozen part,
differentiates with respect to the trainable part only, and builds the optimizer over that part
alone, so frozen parameters get no gradient computation, no update and no optimizer state (the
authors' code computes their gradients and applies a learning rate of 0, E2_METHOD.md quirk 6).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from flax import traverse_util

from e2_jax.errors import ConfigError

# The parameters E² adds to CLIP (its warm-up stage trains only these; logit_scale stays frozen).
E2_NEW = r"^visual/(selection_tokens|proj_cls|fusion_\d+/.*|region_[^/]+/.*)$"
TRAINABLE = {"all": r".*", "e2_new": E2_NEW}
OPTIMIZERS = ("adam_l2", "adamw")


def trainable_pattern(name_or_regex: str) -> re.Pattern:
    return re.compile(TRAINABLE.get(name_or_regex, name_or_regex))


def partition(params: dict, pattern: re.Pattern) -> tuple[dict, dict]:
    """(trainable, frozen): the leaves whose path ("visual/proj_cls") matches, and the rest."""
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = {k: v for k, v in flat.items() if pattern.search(k)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return (traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def merge(trainable: dict, frozen: dict) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen, sep="/"),
                                         **traverse_util.flatten_dict(trainable, sep="/")}, sep="/")


def schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """0 -> `peak` linearly over `warmup_steps`, then cosine to 0 at `total_steps`, per step."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, 1), end_value=0.0)


def optimizer(name: str, learning_rate: optax.Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 1e-4, grad_clip: float | None = None) -> optax.GradientTransformation:
    """"adam_l2" (the authors: `torch.optim.Adam(weight_decay=...)`, the decay added to the
    gradient of every parameter before Adam) or "adamw" (decoupled decay, on matrices only)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    if name == "adam_l2":
        chain += [optax.add_decayed_weights(weight_decay), optax.scale_by_adam(b1, b2, eps)]
    else:
        matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
        chain += [optax.scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay, mask=matrices)]
    chain.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*chain)


def count(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
