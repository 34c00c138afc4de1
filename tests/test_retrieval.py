"""Retrieval metrics under each protocol against brute-force references and known answers."""

import numpy as np
import pytest

from e2_jax.evaluation import retrieval
from e2_jax.numerics import l2_normalize


def _brute(image, text, product=None):
    """Float64, whole matrix, loops: the definition, written out."""
    image, text = l2_normalize(image).astype(np.float64), l2_normalize(text).astype(np.float64)
    product = np.arange(len(image)) if product is None else np.asarray(product)
    s = image @ text.T
    i2t = np.array([sum(s[i, j] > s[i, product[i]] for j in range(len(text)) if j != product[i])
                    for i in range(len(image))])
    t2i = []
    for j in range(len(text)):
        own = product == j
        t2i.append(int(np.sum(s[~own, j] > s[own, j].max())))
    return {"i2t": i2t, "t2i": np.array(t2i)}


def _embeddings(n, d=16, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, d)).astype(np.float32)
    return image, image + noise * rng.standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("n, tile", [(300, 64), (257, 4096), (50, 7)])
def test_full_candidate_equals_brute_force(n, tile):
    image, text = _embeddings(n)
    got = retrieval.ranks(image, text, tile=tile)
    want = _brute(image, text)
    np.testing.assert_array_equal(got["i2t"], want["i2t"])
    np.testing.assert_array_equal(got["t2i"], want["t2i"])
    metrics = retrieval.full_candidate(image, text, tile=tile)
    assert metrics == retrieval.recall_at(want)
    assert 0 < metrics["i2t_r1"] < 100 and 0 < metrics["t2i_r1"] < 100  # a case that can fail


def test_full_gallery_equals_brute_force():
    rng = np.random.default_rng(1)
    views = rng.integers(1, 5, size=120)
    product = np.repeat(np.arange(120), views)
    text = rng.standard_normal((120, 16)).astype(np.float32)
    image = text[product] + 1.2 * rng.standard_normal((len(product), 16)).astype(np.float32)
    got = retrieval.ranks(image, text, product, tile=32)
    want = _brute(image, text, product)
    np.testing.assert_array_equal(got["i2t"], want["i2t"])
    np.testing.assert_array_equal(got["t2i"], want["t2i"])
    # The other views of a product are not candidates against its text: a product whose views
    # are all better than every other image ranks first whichever of its views is best.
    m = retrieval.full_gallery(image, product, text, tile=32)
    assert m == retrieval.recall_at(want) and 0 < m["t2i_r1"] < 100


def test_identical_embeddings_give_100_and_ties_favour_the_query():
    image, _ = _embeddings(100)
    assert retrieval.full_candidate(image, image.copy(), tile=16)["sumr"] == 600.0
    same = np.ones((40, 8), np.float32)  # every similarity ties
    assert retrieval.full_candidate(same, same, tile=16)["sumr"] == 600.0


def test_a_permuted_set_gives_its_fixed_points():
    image, _ = _embeddings(200, d=64)
    perm = np.arange(200)
    rng = np.random.default_rng(3)
    moved = rng.choice(200, size=150, replace=False)
    perm[moved] = np.roll(moved, 1)  # 150 moved, 50 fixed
    m = retrieval.full_candidate(image, image[perm], tile=64)
    assert m["i2t_r1"] == m["t2i_r1"] == 25.0


def test_mismatched_inputs_are_named():
    image, text = _embeddings(10)
    with pytest.raises(ValueError, match="one image per text"):
        retrieval.full_candidate(image, text[:9])
    with pytest.raises(ValueError, match="image_product"):
        retrieval.full_gallery(image, np.full(10, 10), text)


def _categories(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    # One big category, several mid-sized ones and some with fewer than 100 products.
    return rng.choice(12, size=n, p=[0.4, 0.15, 0.15, 0.1, 0.06, 0.04, 0.03, 0.03, 0.02, 0.01, 0.005, 0.005])


def test_sample_100_candidates():
    category = _categories()
    c = retrieval.sample_100_candidates(category, seed=7)
    assert c.shape == (1000, 101)
    assert len(np.unique(c[:, 0])) == 1000
    for row in c:
        assert len(set(row.tolist())) == 101  # distinct, the positive included once
        same = np.sum(category == category[row[0]]) - 1
        in_category = np.sum(category[row[1:]] == category[row[0]])
        assert in_category == min(100, same)  # same category first, topped up only when too few
    assert any(np.sum(category == category[r[0]]) <= 100 for r in c)  # the top-up path ran
    np.testing.assert_array_equal(c, retrieval.sample_100_candidates(category, seed=7))
    assert not np.array_equal(c, retrieval.sample_100_candidates(category, seed=8))
    with pytest.raises(ValueError, match="at least 101"):
        retrieval.sample_100_candidates(category[:100])


def test_sample_100_equals_brute_force():
    category = _categories(400)
    image, text = _embeddings(400, noise=1.5)
    c = retrieval.sample_100_candidates(category, queries=1000, seed=0)
    assert c.shape == (400, 101)
    i, t = l2_normalize(image).astype(np.float64), l2_normalize(text).astype(np.float64)
    i2t = [sum(i[r[0]] @ t[j] > i[r[0]] @ t[r[0]] for j in r[1:]) for r in c]
    t2i = [sum(t[r[0]] @ i[j] > t[r[0]] @ i[r[0]] for j in r[1:]) for r in c]
    got = retrieval.sample_100(image, text, c)
    assert got == retrieval.recall_at({"i2t": np.array(i2t), "t2i": np.array(t2i)})
    assert 0 < got["i2t_r1"] < 100


def _authors_draw(category: np.ndarray, negatives: int, seed: int) -> list[list[int]]:
    """The E² authors' sample-100 draw as their code describes it, written out plainly: every
    product in turn is a query; its negatives are at most `negatives` other products of its
    category, without replacement, never topped up."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(len(category)):
        same = [j for j in range(len(category)) if category[j] == category[q] and j != q]
        take = min(negatives, len(same))
        rows.append([q, *(int(j) for j in rng.choice(np.array(same, np.int64), size=take, replace=False))])
    return rows


def test_the_authors_draw_and_its_metrics():
    category = _categories(400)
    image, text = _embeddings(400, noise=1.5)
    c = retrieval.sample_100_candidates_authors(category, negatives=100, seed=3)
    want = _authors_draw(category, 100, 3)
    assert c.shape == (400, 101) and [[int(x) for x in row if x >= 0] for row in c] == want
    assert retrieval.topped_up(category, c) == 0  # never topped up
    small = [row for row in want if len(row) < 101]
    assert small and int((c[:, -1] < 0).sum()) == len(small)  # rows of small categories are shorter
    i, t = l2_normalize(image).astype(np.float64), l2_normalize(text).astype(np.float64)
    i2t = [sum(i[r[0]] @ t[j] > i[r[0]] @ t[r[0]] for j in r[1:]) for r in want]
    t2i = [sum(t[r[0]] @ i[j] > t[r[0]] @ i[r[0]] for j in r[1:]) for r in want]
    assert retrieval.sample_100(image, text, c) == retrieval.recall_at({"i2t": np.array(i2t), "t2i": np.array(t2i)})
    # Ours tops those rows up from other categories: harder, and the count says how many.
    ours = retrieval.sample_100_candidates(category, queries=400, seed=3)
    assert retrieval.topped_up(category, ours) == sum(np.sum(category == category[q]) - 1 < 100 for q in ours[:, 0])
