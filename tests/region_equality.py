"""One step of the trainer's own program with packed region texts and with the per-item
encoding (the authors'): loss and gradients, for the 1-device, 8-device and 2-process tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e2_jax import config as recipes
from e2_jax.data import pipeline
from e2_jax.sharding import batch_sharding
from e2_jax.training import step, train


def config(data_dir: str, batch_size: int = 16, mesh=(("data", -1), ("fsdp", 1))):
    """The authors' five groups at FashionGen's tag lengths (short tags and long descriptions:
    both text-tower calls), a tiny CLIP, SynthFashion/tiny."""
    c = recipes.base()
    c.model.preset, c.model.pretrained = "tiny", ""
    c.data.dataset, c.data.data_dir = "synth_fashion/tiny", data_dir
    c.stages, c.finetune.steps, c.batch_size, c.mesh = ("finetune",), 1, batch_size, mesh
    return c


def _capture_gradients() -> optax.GradientTransformation:
    """An 'optimizer' whose state after one update is the gradients, exactly."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    assert x.is_fully_replicated  # several processes: the config's mesh does not shard parameters
    return np.asarray(x.addressable_shards[0].data)


def one_step(c, mode: str) -> dict:
    """{"loss", "loss_region", "gradients" (host arrays), "calls" (the region texts' global
    rows x tokens per call)} of the first step of `c` with `data.region_texts = mode`."""
    c = c.copy_and_resolve_references()
    c.data.region_texts = mode
    spec, data = train.prepare(c, validate=False)
    program = step.build_stage(spec, spec.stages[0], _capture_gradients(), optax.constant_schedule(0.0))
    state = program.new_state(step.initial_params(spec))
    batch = next(pipeline.train_batches(data.train, spec.pre, global_batch=c.batch_size,
                                        sharding=batch_sharding(spec.mesh), seed=c.seed))
    calls = [tuple(t.shape) for t in batch["region_tokens"]]
    new, metrics = program.step(state, batch)
    gradients = jax.tree.map(_host, new["opt_state"])
    return {"loss": float(metrics["loss"]), "loss_region": np.asarray(metrics["loss_region"]).tolist(),
            "gradients": gradients, "calls": calls}


def assert_equal_steps(packed: dict, per_item: dict) -> None:
    np.testing.assert_allclose(packed["loss"], per_item["loss"], rtol=1e-6)
    np.testing.assert_allclose(packed["loss_region"], per_item["loss_region"], rtol=1e-6)
    # Gradients: the same sums in another order (one row per distinct tag, then a gather's
    # scatter-add, against one row per item): float32 rounding, relative to each tensor's scale.
    leaves = jax.tree_util.tree_leaves_with_path(packed["gradients"])
    for (path, a), b in zip(leaves, jax.tree.leaves(per_item["gradients"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))
    # Packed: fewer text-tower rows and tokens than one row per item and group.
    rows_tokens = lambda r: sum(rows * tokens for rows, tokens in r["calls"])
    assert len(packed["calls"]) <= 2 < len(per_item["calls"])
    assert rows_tokens(packed) < rows_tokens(per_item)
