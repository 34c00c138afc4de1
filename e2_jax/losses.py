"""E²'s contrastive losses over the global batch (E2_METHOD.md section 3). Knows no model.

`e2_loss` = `global_weight * L_global + region_weight * mean_g L_g`, where every term is a
symmetric InfoNCE (cross-entropy both ways, labels = position in the batch, so in-batch items
that share a tag still count as negatives) at one shared `exp(logit_scale)`.

Written per shard: inside `jax.shard_map` (see `sharded`), each device holds its local slice of
the batch, all-gathers the normalised embeddings it contrasts against, and builds logits of
[local batch, global batch], never [global, global]. With `axis_name=None` the same code is
the plain single-device loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from e2_jax.numerics import l2_normalize

Array = jax.Array
AxisName = str | tuple[str, ...] | None


def _gather(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _offset(local: int, axis_name: AxisName) -> Array:
    return jnp.zeros((), jnp.int32) if axis_name is None else jax.lax.axis_index(axis_name) * local


def _sum(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def contrastive_losses(a: Array, b: Array, logit_scale: Array, axis_name: AxisName = None) -> Array:
    """[K] symmetric InfoNCE losses, the k-th between the rows of `a[:, k]` and `b[:, k]` ([n, K,
    D] local shards of [N, K, D]); each the mean over the global batch of (CE(a->b) + CE(b->a))
    / 2, as open_clip's ClipLoss.

    The K pairs travel together: one all-gather of each side, however large K is (E²: the
    global pair and one per tag group), and one sum of the totals over the devices."""
    a, b = l2_normalize(a.astype(jnp.float32)), l2_normalize(b.astype(jnp.float32))
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    local = a.shape[0]
    labels = _offset(local, axis_name) + jnp.arange(local)
    total = jnp.zeros(a.shape[1], jnp.float32)
    for queries, keys in ((a, _gather(b, axis_name)), (b, _gather(a, axis_name))):
        logits = scale * jnp.einsum("nkd,mkd->knm", queries, keys)  # [K, local, global]
        correct = jnp.take_along_axis(logits, labels[None, :, None], axis=2)[..., 0]
        total += jnp.sum(jax.nn.logsumexp(logits, axis=2) - correct, axis=1)
    summed = _sum(jnp.append(total, jnp.asarray(local, jnp.float32)), axis_name)
    return summed[:-1] / (2 * summed[-1])  # the last: the global batch


def contrastive_loss(a: Array, b: Array, logit_scale: Array, axis_name: AxisName = None) -> Array:
    """Symmetric InfoNCE between rows of `a` and `b` ([n, D] local shards of [N, D])."""
    return contrastive_losses(a[:, None], b[:, None], logit_scale, axis_name)[0]


def e2_loss(image: Array, text: Array, region_image: Array | None, region_text: Array | None,
            logit_scale: Array, *, global_weight: float = 0.5, region_weight: float = 0.5,
            pick_image: Array | None = None, pick_weight: float = 0.0,
            axis_name: AxisName = None) -> tuple[Array, dict[str, Array]]:
    """E²'s loss. `image`, `text`: [n, D] global embeddings; `region_image`, `region_text`:
    [n, G, D] (region embeddings and the embeddings of the items' tag texts), or None for plain
    CLIP fine-tuning. Returns (loss, metrics) with `loss_global` and `loss_region` ([G]). The
    global pair and the G region pairs are stacked and contrasted together
    (`contrastive_losses`): one all-gather of each side in all (docs/benchmarks.md).
    `pick_image` [n, fusion blocks, G, D] (a variant beyond the paper, `pick_weight` > 0): each
    block's picked patches through the region heads, each contrasted with its group's tag text
    too (`loss_pick`, [blocks, G]), in the same stack."""
    metrics = {"logit_scale": jnp.exp(logit_scale)}
    if region_image is None or region_weight == 0:  # CLIP fine-tuning; the "without region loss" ablation
        loss_global = contrastive_loss(image, text, logit_scale, axis_name)
        loss = loss_global if region_image is None else global_weight * loss_global
        return loss, {**metrics, "loss_global": loss_global, "loss": loss}
    picks = pick_image is not None and pick_weight > 0
    images = [image[:, None], region_image]
    texts = [text[:, None], region_text]
    if picks:
        blocks = pick_image.shape[1]
        images.append(pick_image.reshape(pick_image.shape[0], -1, pick_image.shape[-1]))
        texts += [region_text] * blocks
    stack = lambda parts: jnp.concatenate([p.astype(jnp.float32) for p in parts], 1)
    terms = contrastive_losses(stack(images), stack(texts), logit_scale, axis_name)
    groups = region_image.shape[1]
    loss_global, per_group = terms[0], terms[1 : 1 + groups]
    loss = global_weight * loss_global + region_weight * jnp.mean(per_group)
    metrics = {**metrics, "loss_global": loss_global, "loss_region": per_group}
    if picks:
        per_pick = terms[1 + groups :].reshape(blocks, groups)
        loss = loss + pick_weight * jnp.mean(per_pick)
        metrics["loss_pick"] = per_pick
    return loss, {**metrics, "loss": loss}


def sharded(loss_fn: Callable[..., tuple[Array, dict]], mesh: Mesh, batch_axes: Sequence[str],
            num_batch_args: int) -> Callable[..., tuple[Array, dict]]:
    """`loss_fn(*batch_args, *replicated_args, axis_name=...)` on global arrays sharded over
    `batch_axes` of `mesh` (their first dimension), through `jax.shard_map`: each device sees
    its slice, all-gathers what it contrasts against, and returns the global loss."""
    axes = tuple(batch_axes)
    axis_name = axes if len(axes) > 1 else axes[0]

    def wrapped(*args):
        specs = tuple(P(axes) if i < num_batch_args else P() for i in range(len(args)))
        inner = lambda *a: loss_fn(*a, axis_name=axis_name)
        return jax.shard_map(inner, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    return wrapped
