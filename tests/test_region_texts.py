"""Short contexts and de-duplication of region texts change nothing in the embeddings."""

import jax
import jax.numpy as jnp
import numpy as np

from e2_jax.data.region_texts import dedupe, trim
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import CLIP, get_config, init_params
from tests.fashion_texts import fashion_records


def test_trim_and_dedupe_shapes():
    tokens = CLIPTokenizer()(["FW2016", "SS2017", "FW2016", "FW2016", "Resort 2017"])
    short = trim(tokens)
    assert short.shape == (5, 8) and np.array_equal(short, tokens[:, :8])
    assert (tokens[:, 8:] == 0).all()
    unique, inverse = dedupe(short, multiple=2)
    assert unique.shape == (4, 8)  # 3 distinct, rounded up to 4
    np.testing.assert_array_equal(unique[inverse], short)
    assert trim(CLIPTokenizer()(["x " * 100])).shape == (1, 77)


def test_cheap_region_texts_equal_full_length_encoding():
    config = get_config("tiny")
    params = init_params(config, jax.random.key(0))
    model = CLIP(config)
    encode = jax.jit(lambda t: model.apply({"params": params}, t, method=CLIP.encode_text))
    records = fashion_records(64, seed=3)
    tokenizer = CLIPTokenizer()
    for field in ("brand", "season", "subcategory", "composition"):
        tokens = tokenizer([r[field] for r in records])
        full = np.asarray(encode(jnp.asarray(tokens)))
        unique, inverse = dedupe(trim(tokens))
        assert unique.shape[1] <= 32 and unique.shape[0] < len(tokens)
        cheap = np.asarray(encode(jnp.asarray(unique)))[inverse]
        np.testing.assert_allclose(cheap, full, rtol=1e-5, atol=1e-5)
