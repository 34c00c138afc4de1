"""The E² loss over a batch sharded on 8 devices equals the 1-device loss, gradients too, and
each device's logits are [local batch, global batch]."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from e2_jax import losses
from e2_jax.models.clip import get_config
from e2_jax.models.e2 import E2Config, E2Model, init_e2_params

AXES = ("data", "fsdp")


def _mesh(n: int) -> Mesh:
    devices = np.array(jax.devices()[:n]).reshape((n // 2, 2) if n > 1 else (1, 1))
    return Mesh(devices, AXES)


def _embeddings(batch: int, groups: int = 5, dim: int = 16):
    keys = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(keys[0], (batch, dim)), jax.random.normal(keys[1], (batch, dim)),
            jax.random.normal(keys[2], (batch, groups, dim)), jax.random.normal(keys[3], (batch, groups, dim)),
            jnp.log(jnp.asarray(20.0)))


def _loss_and_grads(mesh: Mesh | None, args):
    if mesh is None:
        fn = lambda *a: losses.e2_loss(*a)[0]
    else:
        inner = losses.sharded(losses.e2_loss, mesh, AXES, num_batch_args=4)
        fn = lambda *a: inner(*a)[0]
        args = [jax.device_put(a, NamedSharding(mesh, P(AXES) if i < 4 else P())) for i, a in enumerate(args)]
    return jax.jit(jax.value_and_grad(fn, argnums=range(5)))(*args)


def test_eight_devices():
    assert jax.device_count() == 8


def test_loss_and_gradients_equal_on_1_and_8_devices():
    args = _embeddings(32)
    plain = _loss_and_grads(None, args)
    one = _loss_and_grads(_mesh(1), args)
    eight = _loss_and_grads(_mesh(8), args)
    for other in (one, eight):
        np.testing.assert_allclose(other[0], plain[0], rtol=1e-5)
        for g, want in zip(other[1], plain[1], strict=True):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    assert float(np.abs(plain[1][4])) > 0  # the shared logit scale gets a gradient


def test_model_gradients_equal_on_1_and_8_devices():
    config, e2 = get_config("tiny", vision_layers=4), E2Config()
    params = init_e2_params(config, e2, jax.random.key(0))
    model = E2Model(config, e2)
    images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (16, 12), 1, 49406).at[:, -1].set(49407)
    tags = jax.random.randint(jax.random.key(3), (16, 5, 6), 1, 49406).at[:, :, -1].set(49407)

    def step(mesh, params, images, tokens, tags):
        def loss_fn(params):
            out = model.apply({"params": params}, images, True, method=E2Model.encode_image,
                              rngs={"gumbel": jax.random.key(4)})
            text = model.apply({"params": params}, tokens, method=E2Model.encode_text)
            tag_emb = model.apply({"params": params}, tags.reshape(-1, 6), method=E2Model.encode_text)
            inner = losses.sharded(losses.e2_loss, mesh, AXES, num_batch_args=4)
            return inner(out.global_embedding, text, out.region_embeddings,
                         tag_emb.reshape(16, 5, -1), params["logit_scale"])[0]
        return jax.value_and_grad(loss_fn)(params)

    results = []
    for n in (1, 8):
        mesh = _mesh(n)
        batch = NamedSharding(mesh, P(AXES))
        placed = [jax.device_put(x, batch) for x in (images, tokens, tags)]
        replicated = jax.device_put(params, NamedSharding(mesh, P()))
        results.append(jax.jit(functools.partial(step, mesh))(replicated, *placed))
    (loss_1, grads_1), (loss_8, grads_8) = results
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8), strict=True):
        # Within 1e-5 of the tensor's scale: a gradient's tiny entries carry the float32
        # rounding of sums taken in another order (seen: 1.3e-6 on an entry of 0.007, in a
        # tensor whose entries reach 0.9).
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
    assert np.abs(grads_8["visual"]["fusion_1"]["proj_q"]).max() > 0


@pytest.mark.parametrize("global_batch", [64, 256])
def test_logits_per_device_are_local_by_global(global_batch):
    mesh = _mesh(8)
    local = global_batch // 8
    args = [jax.device_put(a, NamedSharding(mesh, P(AXES) if i < 4 else P()))
            for i, a in enumerate(_embeddings(global_batch))]
    fn = jax.value_and_grad(lambda *a: losses.sharded(losses.e2_loss, mesh, AXES, 4)(*a)[0], argnums=range(5))
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    # Every matrix of scores in the compiled program, forward and backward (the global pair's
    # and the groups' stacked: [terms, local, global]).
    shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[(\d+(?:,\d+)+)\]", hlo)}
    assert any(shape[-2:] == (local, global_batch) for shape in shapes), sorted(shapes)
    assert not any(shape[-2:] == (global_batch, global_batch) for shape in shapes), sorted(shapes)
