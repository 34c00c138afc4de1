"""The evaluation run: every protocol through the real pipeline and model, on 1 and 2
processes (tests/multiprocess/eval_worker.py), and the report it writes."""

from pathlib import Path

import numpy as np

from e2_jax import config as recipes
from e2_jax.data import pipeline
from e2_jax.evaluation import evaluate, retrieval
from tests.processes import run_workers

WORKER = Path(__file__).parent / "multiprocess" / "eval_worker.py"


def eval_config(data_dir: str):
    """A random tiny model on SynthFashion/tiny (16 validation products, 3 views each); an
    evaluation batch of 40 divides neither the 16 texts nor the 48 images."""
    c = recipes.base()
    recipes.runlocal(c)
    c.data.data_dir, c.data.build_if_missing = data_dir, False
    c.eval.batch_size = 40
    return c


def test_every_protocol_on_one_and_two_processes(synth_tiny, tmp_path):
    (alone,) = run_workers(WORKER, 1, synth_tiny, tmp_path)
    first, second = run_workers(WORKER, 2, synth_tiny, tmp_path)
    assert alone["devices"] == 1 and first["devices"] == second["devices"] == 2
    report = alone["report"]
    # The report says what ran: 16 queries (of 1,000 asked), and how many had to be topped up
    # (those whose sub-category has fewer than 8 other products).
    subcategory = pipeline.Source("synth_fashion/tiny", "validation", synth_tiny).scan(["subcategory"])["subcategory"]
    sizes = {c: int(np.sum(subcategory == c)) for c in subcategory}
    short = sum(sizes[c] - 1 < 8 for c in subcategory)
    assert short > 0  # SynthFashion/tiny: every sub-category is small
    assert report["counts"] == {"products": 16, "images": 48, "sample_100_queries": 16,
                                "sample_100_topped_up": short, "sample_100_short": 0}
    assert report["protocols"]["sample_100"].startswith(
        f"16 query products (of 1,000 asked: the split has 16 products), each against 8 negatives of the same "
        f"subcategory; {short} of them topped up")
    keys = {f"{p}/{t}/{m}" for p in evaluate.PROTOCOLS for t in ("tags", "description")
            for m in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "sumr")}
    assert set(report["metrics"]) == keys
    # Two processes: the same embeddings on both, equal to one process's, and the same numbers.
    for other in (first, second):
        assert other["report"] == report
        for name in ("image", "text"):
            np.testing.assert_allclose(np.array(other["embeddings"][name]), np.array(alone["embeddings"][name]),
                                       rtol=1e-5, atol=1e-6)
    # The plumbing: images are every view of every product in order (3 each), texts the two
    # formats one after the other; the report's numbers are the metrics of those rows.
    image, text = np.array(alone["embeddings"]["image"]), np.array(alone["embeddings"]["text"])
    assert image.shape[0] == 48 and text.shape[0] == 32
    tags, description = text[:16], text[16:]
    product = np.repeat(np.arange(16), 3)
    for name, t in (("tags", tags), ("description", description)):
        want = retrieval.full_candidate(image[::3], t)
        assert {k: report["metrics"][f"full_candidate/{name}/{k}"] for k in want} == want
        want = retrieval.full_gallery(image, product, t)
        assert {k: report["metrics"][f"full_gallery/{name}/{k}"] for k in want} == want
    assert not np.allclose(tags, description)  # two texts really were encoded
