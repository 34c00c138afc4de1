"""The input pipeline on 8 devices: global arrays laid out over the mesh's data axes, every
training example once per epoch, and evaluation of every example once."""

import itertools

import jax
import numpy as np
import pytest

from e2_jax.data import pipeline as pl
from e2_jax.sharding import batch_sharding
from tests.test_region_texts import unpack

PRE = pl.Preprocessing(image_size=16, tags=(("brand", "brand", 8), ("season", "season", 8)))
AUTO = jax.sharding.AxisType.Auto


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


@pytest.mark.parametrize(("shape", "names", "data_axes"), [
    ((4, 2), ("data", "fsdp"), ("data", "fsdp")),  # batch over all 8 devices
    ((4, 2), ("data", "model"), ("data",)),  # batch over 4; pairs of devices hold the same rows
])
def test_global_batches_are_laid_out_over_the_data_axes(synth_tiny, shape, names, data_axes):
    source = pl.Source("synth_fashion/tiny", "train", synth_tiny)
    sharding = batch_sharding(_mesh(shape, names), data_axes)
    global_batch = 16
    batches = list(itertools.islice(pl.train_batches(source, PRE, global_batch=global_batch, sharding=sharding,
                                                     seed=1), 3))
    whole = list(itertools.islice(pl.local_train_batches(source, PRE, global_batch=global_batch,
                                                         rows=range(global_batch), seed=1), 3))
    shards = int(np.prod([dict(zip(names, shape, strict=True))[a] for a in data_axes]))
    for batch, want in zip(batches, whole, strict=True):
        tags = want.pop("tags")
        assert set(batch) == {*want, "region_tokens", "region_index"}
        for key, expected in want.items():
            leaf = batch[key]
            assert leaf.sharding == sharding and leaf.shape == expected.shape
            np.testing.assert_array_equal(np.asarray(leaf), expected)
            for shard in leaf.addressable_shards:  # each device holds its slice of the rows
                assert shard.data.shape[0] == global_batch // shards
                np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
        # The packed region texts: laid out the same way, and each item's tag comes back.
        for leaf in jax.tree.leaves((batch["region_tokens"], batch["region_index"])):
            assert leaf.sharding == sharding
            assert all(s.data.shape[0] == leaf.shape[0] // shards for s in leaf.addressable_shards)
        for g, (group, _, length) in enumerate(PRE.tags):
            np.testing.assert_array_equal(unpack(batch["region_tokens"], batch["region_index"], g, length),
                                          tags[group])


def test_every_training_example_once_per_epoch_with_no_overlap(synth_tiny):
    source = pl.Source("synth_fashion/tiny", "train", synth_tiny)  # 64 examples
    sharding = batch_sharding(_mesh((8,), ("data",)), ("data",))
    global_batch = 24  # epochs end mid-batch: nothing is dropped or repeated
    batches = itertools.islice(pl.train_batches(source, PRE, global_batch=global_batch, sharding=sharding), 8)
    per_device = {d: [] for d in jax.devices()}
    for batch in batches:
        for shard in batch["index"].addressable_shards:
            per_device[shard.device].append(np.asarray(shard.data))
    # Device d holds rows [3d, 3d + 3) of every batch: put the stream back together.
    stream = np.stack([np.concatenate(v) for v in per_device.values()], 0)  # [device, steps * 3]
    stream = stream.reshape(8, 8, 3).transpose(1, 0, 2).reshape(-1)
    for epoch in range(3):
        assert sorted(stream[epoch * 64 : (epoch + 1) * 64]) == list(range(64))


def test_evaluation_covers_each_example_once_across_devices(synth_tiny):
    source = pl.Source("synth_fashion/tiny", "validation", synth_tiny)  # 16 examples
    sharding = batch_sharding(_mesh((8,), ("data",)), ("data",))
    batches = list(pl.eval_batches(source, PRE, global_batch=24, sharding=sharding))
    assert len(batches) == 1
    valid, index = np.asarray(batches[0]["valid"]), np.asarray(batches[0]["index"])
    assert valid.sum() == 16 and sorted(index[valid]) == list(range(16))
    assert [int(np.asarray(s.data).sum()) for s in batches[0]["valid"].addressable_shards] == [3, 3, 3, 3, 3, 1, 0, 0]
