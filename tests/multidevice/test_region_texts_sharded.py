"""Packed region texts on 8 devices (batch and parameters sharded): the trainer's step gives the
per-item encoding's loss and gradients, and the calls' rows split evenly over the devices."""

from tests import region_equality


def test_packed_region_texts_on_eight_devices(synth_tiny, tmp_path):
    c = region_equality.config(synth_tiny, mesh=(("data", 4), ("fsdp", 2)))
    packed = region_equality.one_step(c, "packed")
    per_item = region_equality.one_step(c, "per_item")
    region_equality.assert_equal_steps(packed, per_item)
    assert all(rows % 8 == 0 for rows, _ in packed["calls"])
