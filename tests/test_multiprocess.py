"""The input pipeline on 2 local processes (4 CPU devices each, collectives over localhost), on
a mesh that interleaves them (as a TPU pod slice's does): each process reads only its rows,
together they cover every example once per epoch, every process sees the same global batch
(equal to the one-process pipeline's), resume is exact, and evaluation visits every example
once."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from e2_jax.data import pipeline as pl
from tests.processes import run_workers

WORKER = Path(__file__).parent / "multiprocess" / "pipeline_worker.py"
GLOBAL_BATCH, STEPS, RESUME_AT, SEED = 24, 8, 5, 5  # as in the worker


@pytest.mark.slow
def test_pipeline_on_two_processes(synth_tiny, tmp_path):
    first, second = run_workers(WORKER, 2, synth_tiny, tmp_path)
    # Devices of process 0, 1, 0, 1, ... hold 3 rows each: each process reads its 4 blocks of 3.
    assert first["rows"] == [r for block in (0, 6, 12, 18) for r in range(block, block + 3)]
    assert second["rows"] == [r + 3 for r in first["rows"]]
    # Every process sees the same global batch, made of the two processes' rows.
    assert first["train"]["global"] == second["train"]["global"]
    for step in range(STEPS):
        whole = np.array(first["train"]["global"][step])
        for result in (first, second):
            assert whole[result["rows"]].tolist() == result["train"]["local"][step]
    # ... and it is the one-process pipeline's batch, images and texts included.
    source = pl.Source("synth_fashion/tiny", "train", synth_tiny)
    pre = pl.Preprocessing(image_size=16, tags=(("brand", "brand", 8),))
    alone = list(itertools.islice(pl.local_train_batches(source, pre, global_batch=GLOBAL_BATCH,
                                                         rows=range(GLOBAL_BATCH), seed=SEED), STEPS))
    for step, batch in enumerate(alone):
        assert first["train"]["global"][step] == batch["index"].tolist()
        # Row sums of 768 normalised values, summed in another order by XLA: float32 rounding.
        np.testing.assert_allclose(first["train"]["image_sums"][step], batch["images"].sum(axis=(1, 2, 3)),
                                   rtol=1e-5, atol=1e-3)
        assert first["train"]["text"][step] == batch["text"].tolist()
    # Every example once per epoch (64 examples, 24 a step: epochs end mid-batch).
    stream = np.concatenate(first["train"]["global"])
    for epoch in range(len(stream) // 64):
        assert sorted(stream[epoch * 64 : (epoch + 1) * 64]) == list(range(64))
    # Resuming at step 5 gives the uninterrupted run's batches, on both processes.
    for result in (first, second):
        assert result["resumed"]["global"] == result["train"]["global"][RESUME_AT:]
        assert result["resumed"]["local"] == result["train"]["local"][RESUME_AT:]
        assert result["resumed"]["image_sums"] == result["train"]["image_sums"][RESUME_AT:]
    # Evaluation: 16 examples, one padded batch of 24; each example once across processes.
    index = [i for r in (first, second) for b in r["eval"] for i in b["index"]]
    valid = [v for r in (first, second) for b in r["eval"] for v in b["valid"]]
    assert len(index) == 24 and sum(valid) == 16
    assert sorted(i for i, v in zip(index, valid, strict=True) if v) == list(range(16))


REGION_WORKER = Path(__file__).parent / "multiprocess" / "region_worker.py"


@pytest.mark.slow
def test_packed_region_texts_on_two_processes(synth_tiny, tmp_path):
    """Each process packs its own rows' tags; they agree on one set of call shapes (what the
    process needing most needs) and the step equals the per-item encoding (checked in each)."""
    first, second = run_workers(REGION_WORKER, 2, synth_tiny, tmp_path)
    assert first["calls"] == second["calls"] and first["loss"] == second["loss"]
    assert first["needs"] != second["needs"]  # the agreement had work to do
    short_rows, short_tokens = first["calls"][0]
    assert short_rows >= 2 * max(first["needs"][0], second["needs"][0])
    assert short_tokens >= max(first["needs"][1], second["needs"][1])
    assert abs(first["loss"] - first["per_item_loss"]) <= 1e-6 * abs(first["loss"])
