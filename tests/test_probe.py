"""Linear probes: separable classes are learnt, noise is not, rare classes are dropped and
counted; and the probe runs end to end on a trained tiny model."""

import json

import numpy as np
import pytest

from e2_jax.evaluation import probe
from e2_jax.evaluation.report import markdown_table


def _clusters(n, classes, d=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    y = rng.integers(0, classes, n)
    return (centres[y] + spread * rng.standard_normal((n, d))).astype(np.float32), np.array([f"c{v}" for v in y])


def test_separable_classes_are_learnt_and_noise_is_not():
    x, y = _clusters(600, 5)
    result = probe.linear_probe(x[:500], y[:500], x[500:], y[500:])
    assert result.accuracy > 95 and result.classes == 5 and result.eval_examples == 100
    rng = np.random.default_rng(1)
    noise = rng.permutation(y)  # labels unrelated to the features
    chance = probe.linear_probe(x[:500], noise[:500], x[500:], noise[500:])
    assert chance.accuracy < 40


def test_rare_and_unseen_classes_are_dropped_and_counted():
    x, y = _clusters(400, 4)
    y = y.copy()
    y[:3] = "rare"  # 3 training examples: below min_count 5
    y[390:] = "unseen"  # only in the evaluation part
    result = probe.linear_probe(x[:300], y[:300], x[300:], y[300:], min_count=5)
    assert result.classes == 4 and result.dropped_classes == 1
    assert result.train_examples == 297 and result.eval_left_out == 10 and result.eval_examples == 90
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        probe.linear_probe(x[:300], np.array(["a"] * 300), x[300:], y[300:])


def test_probe_of_a_trained_model(synth_tiny, trained_tiny, tmp_path, capsys):
    from e2_jax.inference import Encoder

    workdir, _ = trained_tiny
    encoders = {"e2": Encoder.from_workdir(workdir, batch_size=8)}
    report = probe.probe_models(encoders, "synth_fashion/tiny", ["season", "subcategory"], data_dir=synth_tiny,
                                min_count=2, batch_size=24)
    for field in ("season", "subcategory"):
        r = report["e2"][field]
        assert r["train_examples"] + 0 <= 64 and r["eval_examples"] + r["eval_left_out"] == 16
        assert 0 <= r["accuracy"] <= 100
    assert "| e2 |" in markdown_table(*probe.table(report, ["season", "subcategory"]))
    # The command: the table printed, and the report in --out's folder, as every evaluation's.
    probe.main(["--model", str(workdir), "--dataset", "synth_fashion/tiny", "--data-dir", synth_tiny, "--fields",
                "season", "--min-count", "2", "--out", str(tmp_path / "probes")])
    saved = json.loads((tmp_path / "probes" / "report.json").read_text())
    assert set(saved) == {str(workdir)} and set(saved[str(workdir)]) == {"season"}
    assert f"| {workdir} |" in capsys.readouterr().out
    assert "<table>" in (tmp_path / "probes" / "report.html").read_text()


def test_probe_embeds_the_view_it_is_asked_for(synth_tiny, trained_tiny):
    # SynthFashion's care label (composition) is only on the back view: a probe of it must be able
    # to embed that view, and the embedding must be the back image's, not the front's.
    import tensorflow_datasets as tfds

    from e2_jax.data import pipeline
    from e2_jax.inference import Encoder

    workdir, _ = trained_tiny
    encoder = Encoder.from_workdir(workdir, batch_size=8)
    source = pipeline.Source("synth_fashion/tiny", "validation", synth_tiny)
    index = np.array([0, 3, 7, 11])
    images = tfds.data_source("synth_fashion/tiny", split="validation", data_dir=synth_tiny)
    for view in (0, 1):
        got = probe.view_embeddings(encoder, source, index, view, batch_size=8)
        want = encoder.encode_images([np.asarray(images[int(i)]["images"][view]) for i in index])
        np.testing.assert_allclose(got, want, atol=1e-5)
    front, back = (probe.view_embeddings(encoder, source, index, v, batch_size=8) for v in (0, 1))
    assert np.abs(front - back).max() > 1e-3
    with pytest.raises(ValueError, match="view must be >= 0"):
        probe.view_embeddings(encoder, source, index, -1)
