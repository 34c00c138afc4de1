"""Packed region texts (e2_jax.data.region_texts): each item's tag comes back from the packed
calls, shapes are bucketed and agreed across processes, and the embeddings are unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2_jax.data.fashion_texts import fashion_records
from e2_jax.data.region_texts import SHORT_TOKENS, Packing, describe, text_lengths
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import CLIP, get_config, init_params

GROUPS = (("subcategory", 16), ("brand", 24), ("description", 77), ("season", 8), ("composition", 32))


def _tags(records) -> list[np.ndarray]:
    tokenizer = CLIPTokenizer()
    return [tokenizer([r[field] for r in records], context_length=length) for field, length in GROUPS]


def unpack(tokens, index, group: int, width: int) -> np.ndarray:
    """Each item's row of group `group`, from the concatenated calls, padded to `width`."""
    widest = max(width, *(t.shape[1] for t in tokens))
    rows = np.concatenate([np.pad(np.asarray(t), ((0, 0), (0, widest - t.shape[1]))) for t in tokens])
    rows = rows[np.asarray(index)[:, group]]
    assert not rows[:, width:].any()
    return rows[:, :width]


def test_every_item_gets_its_own_tag_back_from_fewer_shorter_rows():
    records = fashion_records(64, seed=3)
    tags = _tags(records)
    packing = Packing("packed", local_rows=64)
    shapes = packing.shapes(packing.needs(tags), [length for _, length in GROUPS])
    packed = packing.pack(tags, shapes, [np.arange(rows) for rows, _ in shapes])
    assert len(packed.tokens) == 2 and packed.tokens[0].shape[1] <= SHORT_TOKENS
    assert sum(t.size for t in packed.tokens) < sum(t.size for t in tags) / 1.9
    assert all(rows % 32 == 0 for rows, _ in shapes)  # rows in halves of the local batch
    for g, tag in enumerate(tags):
        np.testing.assert_array_equal(unpack(packed.tokens, packed.index, g, tag.shape[1]), tag)
    assert describe(shapes) == " + ".join(f"{r}x{t}" for r, t in shapes)


def test_per_item_is_one_row_per_item_and_group():
    tags = _tags(fashion_records(8, seed=0))
    packing = Packing("per_item", local_rows=8)
    shapes = packing.shapes(packing.needs(tags), [length for _, length in GROUPS])
    assert shapes == tuple((8, length) for _, length in GROUPS)
    packed = packing.pack(tags, shapes, [np.arange(8)] * len(GROUPS))
    assert np.array_equal(packed.index, np.arange(5)[None, :] * 8 + np.arange(8)[:, None])


def test_processes_agree_on_shapes_and_each_finds_its_rows():
    """Two processes (rows 0-7 and 8-15 of a batch of 16, and of each call): the element-wise
    maximum of their needs fits both, even when one has no long tag at all."""
    records = fashion_records(16, seed=5)
    for record in records[8:]:
        record["description"], record["composition"] = "short", "100% cotton"
    tags = _tags(records)
    local = [[t[:8] for t in tags], [t[8:] for t in tags]]
    packing = Packing("packed", local_rows=8, processes=2)
    needs = [packing.needs(part) for part in local]
    assert needs[1][2] == 0 < needs[0][2]  # process 1 has no long tag
    shapes = packing.shapes(np.maximum(*needs), [length for _, length in GROUPS])
    packs = [packing.pack(part, shapes, [np.arange(rows) + p * rows for rows, _ in shapes])
             for p, part in enumerate(local)]
    # The global calls: process 0's rows, then process 1's.
    calls = [np.concatenate([p.tokens[k] for p in packs]) for k in range(len(shapes))]
    index = np.concatenate([p.index for p in packs])
    for g, tag in enumerate(tags):
        np.testing.assert_array_equal(unpack(calls, index, g, tag.shape[1]), tag)
    with pytest.raises(ValueError, match="do not fit"):
        packing.pack(local[0], ((8, 8),), [np.arange(8)])
    with pytest.raises(ValueError, match="region_texts"):
        Packing("dedupe")


@pytest.mark.slow
def test_trimmed_and_deduplicated_texts_embed_as_the_full_length_ones():
    config = get_config("tiny")
    params = init_params(config, jax.random.key(0))
    encode = jax.jit(lambda t: CLIP(config).apply({"params": params}, t, method=CLIP.encode_text))
    tags = _tags(fashion_records(32, seed=3))
    packing = Packing("packed", local_rows=32)
    shapes = packing.shapes(packing.needs(tags), [length for _, length in GROUPS])
    packed = packing.pack(tags, shapes, [np.arange(rows) for rows, _ in shapes])
    cheap = np.concatenate([np.asarray(encode(jnp.asarray(t))) for t in packed.tokens])
    for g, tag in enumerate(tags):
        full = np.asarray(encode(jnp.asarray(np.pad(tag, ((0, 0), (0, 77 - tag.shape[1]))))))
        np.testing.assert_allclose(cheap[packed.index[:, g]], full, rtol=1e-5, atol=1e-5)
    assert text_lengths(tags[3]).max() <= 8
