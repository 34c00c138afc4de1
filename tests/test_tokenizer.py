"""The offline CLIP tokenizer against open_clip's SimpleTokenizer (OpenAI's ids)."""

import random
import string

import numpy as np
import pytest

from e2_jax.data.tokenizer import CLIPTokenizer, clean

open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import SimpleTokenizer, _clean_lower  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers():
    return CLIPTokenizer(), SimpleTokenizer()


def test_corpus_is_big_and_varied(tokenizers, fashion_corpus):
    assert len(fashion_corpus) >= 200
    assert "" in fashion_corpus
    assert any("&amp;" in t for t in fashion_corpus)
    assert any(any(ord(c) > 0x1F000 for c in t) for t in fashion_corpus)  # emoji
    assert any(len(tokenizers[0].encode(t)) > 75 for t in fashion_corpus)  # truncated ones


def test_ids_equal_open_clip_on_fashion_corpus(tokenizers, fashion_corpus):
    ours, ref = tokenizers
    got = ours(fashion_corpus)
    want = ref(fashion_corpus).numpy()
    assert got.shape == want.shape == (len(fashion_corpus), 77)
    bad = [t for t, g, w in zip(fashion_corpus, got, want, strict=True) if not np.array_equal(g, w)]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]!r}"
    # Untruncated ids too, so that differences past the context are caught.
    for text in fashion_corpus:
        assert ours.encode(text) == ref.encode(text), text


def test_truncation_keeps_first_76_tokens_and_ends_with_eot(tokenizers):
    ours, _ = tokenizers
    text = " ".join(f"word{i}" for i in range(200))
    full = ours.encode(text)
    ids = ours([text])[0]
    assert ids[0] == ours.sot_id == 49406
    assert list(ids[1:76]) == full[:75]
    assert ids[76] == ours.eot_id == 49407
    assert int(np.argmax(ids)) == 76


def test_short_text_padding_and_eot_is_argmax(tokenizers):
    ours, _ = tokenizers
    ids = ours(["Raf Simons", ""])
    assert list(ids[1, :3]) == [49406, 49407, 0]
    n = len(ours.encode("Raf Simons"))
    assert ids[0, n + 1] == 49407 and (ids[0, n + 2 :] == 0).all()
    assert (np.argmax(ids, axis=1) == [n + 1, 1]).all()


def test_other_context_lengths(tokenizers):
    ours, ref = tokenizers
    texts = ["Long sleeve cotton shirt in black. Spread collar. Button closure at front."]
    for length in (8, 16, 77):
        assert np.array_equal(ours(texts, context_length=length), ref(texts, context_length=length).numpy())


def test_clean_matches_open_clip_on_random_strings():
    # The fast path skips ftfy on plain ASCII; random strings over ASCII and a few tricky
    # characters check that it changes nothing.
    rng = random.Random(0)
    alphabet = string.printable + "&;#\x00\x07\x1b\x7f\x85\xa0éÃ©€™\u2019\u200b👗"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert clean(text) == _clean_lower(text), repr(text)


def test_decode_equals_open_clip(tokenizers):
    ours, ref = tokenizers
    text = "long sleeve shirt in black, 96% cotton."
    ids = ours([text])[0]
    # CLIP splits numbers into digits and marks word ends, so decoding spaces them out.
    assert ours.decode(ids) == ref.decode(ours.encode(text)).strip() == (
        "long sleeve shirt in black , 9 6 % cotton .")
