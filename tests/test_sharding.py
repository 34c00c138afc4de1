"""Mesh sizes from config: -1 takes the devices left; mistakes are named."""

import pytest

from e2_jax.sharding import mesh_shape


def test_minus_one_takes_the_rest():
    assert mesh_shape((("data", -1), ("fsdp", 2)), 8) == (4, 2)
    assert mesh_shape((("data", -1),), 1) == (1,)
    assert mesh_shape((("data", 2), ("fsdp", 4)), 8) == (2, 4)


@pytest.mark.parametrize(("axes", "devices", "message"), [
    ((("data", -1), ("fsdp", 3)), 8, "not a multiple of 3"),
    ((("data", 2), ("fsdp", 2)), 8, "has 4 devices, but there are 8"),
    ((("data", -1), ("fsdp", -1)), 8, "at most one -1"),
    ((("data", 2), ("data", 4)), 8, "unique"),
])
def test_mistakes_are_named(axes, devices, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(axes, devices)
