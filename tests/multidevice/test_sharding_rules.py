"""The sharding rules table on 8 devices: FSDP splits each large array's largest divisible
dimension, small arrays stay replicated, explicit specs apply, and optimizer state follows."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from e2_jax.models.clip import get_config
from e2_jax.models.e2 import E2Config, init_e2_params
from e2_jax.sharding import batch_sharding, make_mesh, tree_shardings


def _specs(tree, mesh, rules, min_size=2**10):
    shardings = tree_shardings(tree, mesh, rules, min_size=min_size)
    return jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def test_fsdp_rule_on_e2_parameters_and_their_adam_state():
    mesh = make_mesh((("data", 2), ("fsdp", 4)))
    params = jax.eval_shape(lambda r: init_e2_params(get_config("tiny"), E2Config(), r), jax.random.key(0))
    specs = _specs(params, mesh, ((".*", "fsdp"),))
    assert specs["text"]["token_embedding"]["embedding"] == P("fsdp", None)  # [49408, 64]: the larger dim
    assert specs["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"] == P(None, "fsdp")  # [64, 256]
    assert specs["visual"]["class_embedding"] == P()  # 64 elements: replicated
    assert specs["logit_scale"] == P()
    state = jax.eval_shape(optax.adam(1e-3).init, params)
    state_specs = _specs(state, mesh, ((".*", "fsdp"),))
    assert state_specs[0].mu["text"]["token_embedding"]["embedding"] == P("fsdp", None)
    assert state_specs[0].count == P()


def test_first_matching_rule_wins_and_explicit_specs_are_checked():
    mesh = make_mesh((("data", 2), ("model", 4)))
    tree = {"a": jax.ShapeDtypeStruct((8, 64), jnp.float32), "b": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    specs = _specs(tree, mesh, (("^a$", "None,model"), (".*", "replicated")))
    assert specs == {"a": P(None, "model"), "b": P()}
    with pytest.raises(ValueError, match="not divisible by mesh axis model"):
        _specs({"c": jax.ShapeDtypeStruct((8, 6), jnp.float32)}, mesh, ((".*", "None,model"),))


def test_batch_is_split_over_the_data_parallel_axes():
    assert batch_sharding(make_mesh((("data", 2), ("fsdp", 4)))).spec == P(("data", "fsdp"))
    assert batch_sharding(make_mesh((("data", -1), ("model", 2)))).spec == P(("data",))
